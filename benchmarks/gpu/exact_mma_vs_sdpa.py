"""The tensor-core exact forward (``exact/kernels/exact_mma.cu``) against torch SDPA, on a GPU.

``python benchmarks/gpu/exact_mma_vs_sdpa.py [--out docs/measurements/gpu-exact-mma.txt]``
on a machine with an NVIDIA GPU, CuPy and torch (``tests/cuda/on_device.sh`` runs it).

For each shape ``[B, H, N, d]`` and type it times, in this process and on the same GPU,
the forward (``fwd``) and, for the training shapes, forward + backward (``fwd+bwd``:
``mcattn.exact.grad.forward`` then ``backward``; SDPA and ``torch.autograd.grad``):

* ``mcattn``: ``mcattn.attention(..., backend="cupy", check_finite=False)`` (the kernel
  and its launcher, without the input scan) on CuPy float32 arrays with
  ``config.EXACT_TENSOR_CORES`` = float16 / bfloat16 (the kernel rounds while loading);
  for float32, today's float32 kernel (the knob off), and ``tf32`` (the knob "tf32":
  float32 inputs on TF32 tensor cores, timed against SDPA float32);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the same values in
  that type (flash backend for float16 / bfloat16, memory-efficient for float32, math
  where that is missing).

Each time is the median of 3 runs, a run being the mean of enough calls to last
about 50 ms (synchronised before and after). The table gives both times and their ratio,
and the relative error of mcattn's output to SDPA's (float64 norms). A summary line per
kernel ends the output; the exit status is 1 when an output disagrees with SDPA's by more
than the type's rounding allows (:data:`TOLERANCE`).
"""

import argparse
import statistics
import sys
import time

import numpy as np

SHAPES = [(1, 8, 1024, 64), (1, 8, 4096, 64), (1, 8, 16384, 64), (4, 16, 4096, 64),
          (1, 8, 1024, 128), (1, 8, 4096, 128), (1, 8, 16384, 128)]
FLOAT32_SHAPES = [(1, 8, 1024, 64), (1, 8, 4096, 64)]  # today's float32 kernel is slow
TF32_SHAPES = [(1, 8, 1024, 64), (1, 8, 4096, 64), (1, 8, 16384, 64)]
#: Forward + backward (mcattn.exact.grad with the knob; SDPA through torch autograd).
TRAIN_SHAPES = [(1, 8, 1024, 64), (1, 8, 4096, 64), (4, 16, 2048, 64)]
FLOAT32_TRAIN_SHAPES = [(1, 8, 1024, 64)]
#: Largest relative difference to SDPA's output accepted: 4 unit roundoffs of the type.
TOLERANCE = {"float16": 4 * 2.0**-11, "bfloat16": 4 * 2.0**-8, "float32": 1e-5, "tf32": 4 * 2.0**-11}
#: ... and for the gradients (dq, dk, dv, the largest of the three).
GRAD_TOLERANCE = {"float16": 8 * 2.0**-11, "bfloat16": 8 * 2.0**-8, "float32": 1e-4}


def _time(fn, sync, target=0.05):
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, min(200, int(target / once)))
    runs = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        runs.append((time.perf_counter() - t0) / reps)
    return statistics.median(runs)


def _sdpa_backends(precision):
    """Flash for float16 / bfloat16; memory-efficient for float32 (math where it is missing)."""
    from torch.nn.attention import SDPBackend

    if precision in ("float32", "tf32"):
        return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return [SDPBackend.FLASH_ATTENTION]


def _case(precision, shape, sync):
    """(mcattn seconds, SDPA seconds, relative difference of the outputs) for one case."""
    import cupy
    import torch
    from torch.nn.attention import sdpa_kernel

    import mcattn

    rng = np.random.default_rng(shape[2] + shape[3])
    host = [rng.standard_normal(shape, dtype=np.float32) for _ in range(3)]
    q, k, v = (cupy.asarray(a) for a in host)
    torch_type = torch.float32 if precision == "tf32" else getattr(torch, precision)
    tq, tk, tv = (torch.as_tensor(a, device="cuda").to(torch_type) for a in host)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    backend = _sdpa_backends(precision)
    mcattn.config.EXACT_TENSOR_CORES = None if precision == "float32" else precision
    try:
        ours = mcattn.attention(q, k, v, backend="cupy", check_finite=False)
        with sdpa_kernel(backend):
            ref = sdpa(tq, tk, tv)
            t_sdpa = _time(lambda: sdpa(tq, tk, tv), sync)
        t_ours = _time(lambda: mcattn.attention(q, k, v, backend="cupy", check_finite=False), sync)
    finally:
        mcattn.config.EXACT_TENSOR_CORES = None
    ref64 = ref.double().cpu().numpy()
    err = float(np.linalg.norm(ours.get().astype(np.float64) - ref64) / np.linalg.norm(ref64))
    return t_ours, t_sdpa, err


def _train_case(precision, shape, sync):
    """(mcattn seconds, SDPA seconds, largest relative gradient difference), forward + backward."""
    import cupy
    import torch
    from torch.nn.attention import sdpa_kernel

    import mcattn
    from mcattn.exact import grad

    rng = np.random.default_rng(shape[2] + 1)
    host = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
    q, k, v, dout = (cupy.asarray(a) for a in host)
    tq, tk, tv = (torch.as_tensor(a, device="cuda").to(getattr(torch, precision)).requires_grad_()
                  for a in host[:3])
    tdout = torch.as_tensor(host[3], device="cuda").to(getattr(torch, precision))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    backend = _sdpa_backends(precision)

    def ours():
        out, res = grad.forward(q, k, v, backend="cupy", check_finite=False)
        return grad.backward(q, k, v, out, res, dout, backend="cupy", check_finite=False)

    def theirs():
        return torch.autograd.grad(sdpa(tq, tk, tv), (tq, tk, tv), tdout)

    mcattn.config.EXACT_TENSOR_CORES = None if precision == "float32" else precision
    try:
        grads = ours()
        with sdpa_kernel(backend):
            ref = theirs()
            t_sdpa = _time(theirs, sync)
        t_ours = _time(ours, sync)
    finally:
        mcattn.config.EXACT_TENSOR_CORES = None
    err = 0.0
    for name, r in zip("qkv", ref):
        r64 = r.double().cpu().numpy()
        got = grads[name].get().astype(np.float64)
        err = max(err, float(np.linalg.norm(got - r64) / np.linalg.norm(r64)))
    return t_ours, t_sdpa, err


def run_cases(argv, doc, script, detail, header, cases, label, measure):
    """The loop every GPU benchmark here shares: parse ``--out``, print the header, run
    ``measure(case, sync) -> (line, problems, result)`` per case (a case that raises prints
    its error and the others still run), collect the rows.

    Returns ``(args, lines, results, bad)``: ``results`` the ``(case, result)`` pairs that
    ran, ``bad`` the problems and errors, each prefixed by ``label(case)``.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)

    import cupy
    import torch

    def sync():
        cupy.cuda.Device().synchronize()
        torch.cuda.synchronize()

    lines = [f"# benchmarks/gpu/{script} on {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}, CuPy {cupy.__version__}{detail}", header]
    print("\n".join(lines), flush=True)
    results, bad = [], []
    for case in cases:
        try:
            line, problems, result = measure(case, sync)
        except Exception as exc:  # one failing case (an SDPA backend missing...) must not hide the rest
            bad.append(f"{label(case)}: {type(exc).__name__}: {exc}"[:300])
            print(bad[-1], flush=True)
            continue
        bad += [f"{label(case)}: {problem}" for problem in problems]
        results.append((case, result))
        lines.append(line)
        print(line, flush=True)
    return args, lines, results, bad


def finish(args, lines, summary, bad, all_good):
    """Print the summary lines, then the mismatches (or ``all_good``); write ``--out``; the
    exit status (1 on any mismatch or error)."""
    summary = [""] + summary + ([f"MISMATCH {m}" for m in bad] or [all_good])
    print("\n".join(summary))
    lines += summary
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 1 if bad else 0


def main(argv=None):
    cases = [("fwd", t, s) for t in ("float16", "bfloat16") for s in SHAPES]
    cases += [("fwd", "float32", s) for s in FLOAT32_SHAPES]
    cases += [("fwd", "tf32", s) for s in TF32_SHAPES]
    cases += [("fwd+bwd", t, s) for t in ("float16", "bfloat16") for s in TRAIN_SHAPES]
    cases += [("fwd+bwd", "float32", s) for s in FLOAT32_TRAIN_SHAPES]

    def measure(case, sync):
        what, precision, (b, h, n, d) = case
        t_ours, t_sdpa, err = (_case if what == "fwd" else _train_case)(precision, (b, h, n, d), sync)
        tolerance = (TOLERANCE if what == "fwd" else GRAD_TOLERANCE)[precision]
        line = (f"{what:7s} {precision:9s} {b:2d} {h:3d} {n:6d} {d:4d} {t_ours * 1e3:10.3f} "
                f"{t_sdpa * 1e3:9.3f} {t_ours / t_sdpa:6.2f} {err:8.1e}")
        return line, [] if err < tolerance else [f"rel err {err:.2e}"], t_ours / t_sdpa

    args, lines, results, bad = run_cases(
        argv, __doc__, "exact_mma_vs_sdpa.py", "",
        f"{'pass':7s} {'type':9s} {'B':>2s} {'H':>3s} {'N':>6s} {'d':>4s} {'mcattn ms':>10s} "
        f"{'sdpa ms':>9s} {'ratio':>6s} {'rel err':>8s}",
        cases, lambda c: f"{c[0]} {c[1]} {'x'.join(map(str, c[2]))}", measure)
    grouped = {}
    for (what, precision, shape), ratio in results:
        grouped.setdefault((what, precision, shape[3]), []).append(ratio)
    summary = []
    names = {"float32": "exact float32 kernels", "tf32": "exact_tf32 (vs SDPA float32)"}
    for (what, precision, d), ratios in grouped.items():
        kernel = names.get(precision, f"exact_mma {precision}")
        summary.append(f"summary: {what} {kernel} d={d}: mcattn / SDPA "
                       f"{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} shapes")
    return finish(args, lines, summary, bad, "every output and gradient within the tolerances")


if __name__ == "__main__":
    sys.exit(main())
