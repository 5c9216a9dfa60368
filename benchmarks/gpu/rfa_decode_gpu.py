"""RFA decoding on the GPU: one ``RFADecoder.step`` (``rfa_step.cu``) against the array-code step.

``python benchmarks/gpu/rfa_decode_gpu.py [--out docs/measurements/gpu-rfa-decode.txt]`` on a
machine with an NVIDIA GPU, CuPy and torch (``tests/cuda/on_device.sh`` runs it).

Per case: batch ``[B, 8]`` heads, d = dv = 64, 64 positive features, float32, a prompt of
``P`` tokens absorbed by ``extend()``; then the time of one ``step()`` (the features as array
code, the step in one launch: decay, shift, ``S += w f(k) v^T`` and the readout for every
batch row), against ``mcattn.rfa.naive.step`` on the same state (the array code it
replaces: about 20 CuPy launches), same process; medians of 3 runs
(``exact_mma_vs_sdpa._time``); both timings include restoring the state (four array
copies), so the ratio understates the saving. ``step/array`` below 1 is the launch saving; the step at
P = 8192 against P = 128 shows the constant cost per token. Each case checks the step's
output against the array-code step's (relative error below 1e-5).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exact_mma_vs_sdpa import _time, finish, run_cases  # noqa: E402  (written once)

CASES = [(1, 128), (1, 8192), (16, 128)]
HEADS, HEAD_DIM, FEATURES = 8, 64, 64
TOLERANCE = 1e-5


def _case(batch, prompt, sync):
    import copy

    import cupy

    from mcattn.rfa import naive
    from mcattn.rfa.features import RandomFeatures

    rng = np.random.default_rng(prompt)
    feats = RandomFeatures(HEAD_DIM, FEATURES, num_heads=HEADS, seed=3)
    shape = (batch, HEADS, prompt + 1, HEAD_DIM)
    q, k, v = (cupy.asarray((0.5 * rng.standard_normal(shape)).astype(np.float32)) for _ in range(3))
    dec = feats.decoder()
    dec.extend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    saved = copy.deepcopy(dec.state)
    token = (q[:, :, prompt], k[:, :, prompt], v[:, :, prompt])

    def step():
        dec.state = copy.copy(saved)  # the same position every time (the arrays are replaced below)
        dec.state.S, dec.state.z = saved.S.copy(), saved.z.copy()
        dec.state.mass, dec.state.shift = saved.mass.copy(), saved.shift.copy()
        return dec.step(*token, check_finite=False)

    _, rinp, _ = dec._prepare(*(x[:, :, None] for x in token), None, False)

    def array_step():
        state = copy.copy(saved)
        state.S, state.z = saved.S.copy(), saved.z.copy()
        state.mass, state.shift = saved.mass.copy(), saved.shift.copy()
        fq, fk, lk = naive.row_features(rinp)
        return naive.step(state, fq[:, 0], fk[:, 0], lk[:, 0], rinp.v[:, 0], None, rinp.eps, cupy)[0]

    ours = step()
    ref = array_step()
    t_step = _time(step, sync)
    t_array = _time(array_step, sync)
    a = ours.get().astype(np.float64).reshape(-1)
    b = ref.get().astype(np.float64).reshape(-1)
    return t_step, t_array, float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None):
    def measure(case, sync):
        batch, prompt = case
        t_step, t_array, err = _case(batch, prompt, sync)
        line = (f"{batch:5d} {prompt:6d} {t_step * 1e6:9.1f} {t_array * 1e6:9.1f} "
                f"{t_step / t_array:10.2f} {err:8.1e}")
        return line, [] if err < TOLERANCE else [f"rel err {err:.2e}"], (t_step, t_step / t_array)

    args, lines, results, bad = run_cases(
        argv, __doc__, "rfa_decode_gpu.py",
        f"; [B, {HEADS}] heads, d = dv = {HEAD_DIM}, {FEATURES} positive features, float32",
        f"{'B':>5s} {'P':>6s} {'step us':>9s} {'array us':>9s} {'step/array':>10s} {'rel err':>8s}",
        CASES, lambda c: f"rfa_decode B={c[0]} P={c[1]}", measure)
    by = {case: r for case, r in results}
    ratios = [r[1] for r in by.values()]
    flat = (f"{by[(1, 8192)][0] / by[(1, 128)][0]:.2f}" if (1, 8192) in by and (1, 128) in by
            else "not run")
    summary = ["summary: rfa decode step on the GPU: step / array-code step "
               + (f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "not run")
               + f"; step at P = 8192 / P = 128: {flat} (flat: about 1)"]
    return finish(args, lines, summary, bad, "every step within 1e-5 of the array-code step")


if __name__ == "__main__":
    sys.exit(main())
