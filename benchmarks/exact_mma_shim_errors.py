"""Accuracy of the tensor-core exact kernels under the host shim (no GPU needed).

``python benchmarks/exact_mma_shim_errors.py [--out docs/measurements/exact-mma-shim-errors.txt]``

Runs ``exact/kernels/exact_mma.cu`` (forward) and ``exact_mma_backward.cu`` (training
pair) on the fake CuPy of ``tests/cuda`` (the CUDA C under the host shim, its warps and
mma.sync emulated) for the shapes and masks of ``tests/cuda/test_exact_mma_cuda.py`` and
prints, per case, the relative (Frobenius) error against float64 attention on the inputs
rounded to the tensor cores' type, in unit roundoffs u of that type (2^-11 float16 and
tf32, 2^-8 bfloat16; tf32 is forward only), and against float64 on the unrounded
float32 inputs. The tests hold the forward to 0.5 u and the gradients to 1 u.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "tf32": 2.0**-11}


def _round(a, precision):
    if precision == "float16":
        return a.astype(np.float16).astype(np.float64)
    if precision == "tf32":  # nearest, ties away from zero (cvt.rna)
        m, e = np.frexp(a.astype(np.float64))
        return np.sign(m) * np.floor(np.abs(m) * 2.0**11 + 0.5) * 2.0 ** (e - 11)
    import ml_dtypes

    return a.astype(ml_dtypes.bfloat16).astype(np.float64)


def _reference(q, k, v, dout, mask=None, is_causal=False, scale=None):
    """Float64 output and gradients of dense attention."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * (q @ np.swapaxes(k, -1, -2))
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    if is_causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    top = s.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.exp(s - top)
    total = p.sum(-1, keepdims=True)
    p = np.where(total > 0, p / np.where(total > 0, total, 1.0), 0.0)
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    return p @ v, scale * ds @ k, scale * np.swapaxes(ds, -1, -2) @ q, np.swapaxes(p, -1, -2) @ dout


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _case(cp, precision, d, case, train):
    import mcattn
    from mcattn.exact import grad

    rng = np.random.default_rng(d + len(case))
    nq, nk = (75, 75) if case == "causal" else (70, 130 if not train else 90)
    q, k, v = (rng.standard_normal((1, 2, n, d)).astype(np.float32) for n in (nq, nk, nk))
    dout = rng.standard_normal((1, 2, nq, d)).astype(np.float32)
    mask, kwargs = None, {}
    if case == "causal":
        kwargs = {"is_causal": True}
    elif case == "padding":
        kpm = rng.random((1, nk)) > 0.3
        mask, kwargs = kpm[:, None, None, :], {"key_padding_mask": cp.asarray(kpm)}
    elif case == "bias":
        mask = rng.standard_normal((1, 2, nq, nk)).astype(np.float32)
        kwargs = {"attn_mask": cp.asarray(mask)}
    causal = {"is_causal": True} if case == "causal" else {}
    mcattn.config.EXACT_TENSOR_CORES = precision
    try:
        args = [cp.asarray(a) for a in (q, k, v)]
        if train:
            out, res = grad.forward(*args, backend="cupy", **kwargs)
            g = grad.backward(*args, out, res, cp.asarray(dout), backend="cupy", **kwargs)
            got = [out.get(), g["q"].get(), g["k"].get(), g["v"].get()]
        else:
            got = [mcattn.attention(*args, backend="cupy", **kwargs).get()]
    finally:
        mcattn.config.EXACT_TENSOR_CORES = None
    rounded = _reference(*(_round(a, precision) for a in (q, k, v, dout)), mask=mask, **causal)
    exact = _reference(*(a.astype(np.float64) for a in (q, k, v, dout)), mask=mask, **causal)
    u = UNIT[precision]
    return [(_rel(x, r) / u, _rel(x, e) / u) for x, r, e in zip(got, rounded, exact)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT / "tests" / "cuda"), str(ROOT)]
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # what the test conftest sets without a GPU: the fake runs
    import fake_cupy

    with fake_cupy.cupy_context() as cp:
        lines = ["# benchmarks/exact_mma_shim_errors.py: rel. error / u vs float64 on the rounded inputs "
                 "(and on the float32 inputs), host shim",
                 f"{'pass':8s} {'type':9s} {'d':>4s} {'case':8s} {'out':>13s} {'dq':>13s} {'dk':>13s} "
                 f"{'dv':>13s}"]
        cases = [(False, d, "plain") for d in (32, 64, 128)] + [(False, 32, c) for c in ("causal", "padding",
                                                                                     "bias")]
        cases += [(True, 32, "plain"), (True, 64, "plain"), (True, 32, "causal"), (True, 64, "padding"),
                  (True, 32, "bias")]
        for train, d, case in cases:
            for precision in ("float16", "bfloat16") + (() if train else ("tf32",)):
                errs = _case(cp, precision, d, case, train)
                cells = " ".join(f"{a:5.2f} ({b:5.2f})" for a, b in errs)
                lines.append(f"{'fwd+bwd' if train else 'fwd':8s} {precision:9s} {d:4d} {case:8s} {cells}")
                print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
