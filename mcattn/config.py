"""Tunable defaults, read at call time.

Change a value by assignment (``mcattn.config.CPU_BLOCK_K = 256``); every call reads
the module attribute when it runs, so tests and users can patch them without reloading
anything. Numba kernels never read these globals themselves (Numba would freeze them
at compile time): the launchers pass them in as arguments.
"""

import os

#: Threads the CPU (Numba) kernels run on. ``None`` means ``os.cpu_count()``.
NUM_THREADS = None

#: Query rows per task of the CPU E-Att kernel (mcattn.eatt.cpu).
CPU_BLOCK_Q = 256
#: Keys per streamed block of the CPU E-Att kernel (S block is BLOCK_Q x BLOCK_K).
CPU_BLOCK_K = 512

#: Query rows per task of the CPU exact-attention forward (mcattn.exact.cpu). Measured
#: (one thread, N = 4096, d = 64, docs/benchmarks.md): 512 x 512 blocks run the kernel
#: about 5 % faster than 256 x 512 (OpenBLAS multiplies larger panels faster).
EXACT_CPU_BLOCK_Q = 512
#: Keys per streamed block of the CPU exact-attention forward (S block is BLOCK_Q x BLOCK_K).
EXACT_CPU_BLOCK_K = 512
#: With ``is_causal``, the key block on the diagonal is split into column strips of this
#: many keys (each multiplied only with the query rows that see some of its keys), so
#: that about half of the diagonal block's products are skipped rather than masked.
EXACT_CPU_DIAG_K = 128

#: Query and key rows per block of the CPU exact-attention backward (one batch row per task).
CPU_BWD_BLOCK_Q = 128
CPU_BWD_BLOCK_K = 256

#: Keys per streamed block of the NumPy backend; the block is also capped so that a
#: block of scores holds at most NUMPY_MAX_BLOCK_ELEMENTS numbers.
NUMPY_BLOCK_K = 1024
NUMPY_MAX_BLOCK_ELEMENTS = 1 << 22

#: Threads per block (= query rows per block) of the GPU exact-attention kernels.
CUDA_THREADS_PER_BLOCK = 64

#: Tensor cores for exact attention's forward on CuPy (``mcattn/exact/kernels/exact_mma.cu``):
#: ``None`` (default: the float32 kernel), ``"float16"``, ``"bfloat16"`` or ``"tf32"``. With
#: a value, a float32 (or widened float16/bfloat16) forward with head dim 32, 64 or 128
#: rounds q, k, v and the probabilities to that type and accumulates in float32: relative
#: error of order its unit roundoff, 2^-11 (float16, tf32: 10 mantissa bits) or 2^-8
#: (bfloat16), instead of float32's 2^-24 (docs/measurements/exact-mma-shim-errors.txt:
#: 0.26-0.37 of it). The float16/bfloat16 training pair (forward with lse, then backward:
#: ``exact_mma_backward.cu``) uses them for head dims 32 and 64; set the knob the same for
#: a forward and its backward. tf32 is forward only.
EXACT_TENSOR_CORES = None

#: Tensor cores for E-Att on CuPy (``mcattn/eatt/kernels/eatt_mma.cu``):
#: ``None`` (default: eatt.cu), ``"float16"`` or ``"bfloat16"``. With a value, a float32 call
#: with ``alignment="hamming"``, head dim <= 128 and value dim 32, 64 or 128 scores each
#: 64 x 64 tile by XOR + popcount of the packed codes (the same float32 scores); with
#: ``alignment="l1"`` and (head dim <= 32, value dim 32/64/128) or (head dim <= 64, value dim
#: 32/64) by ``-sum |q - k|`` on CUDA cores from shared-memory tiles; both round the
#: probabilities and v to that type for ``P V`` (float32 accumulation): relative error of
#: order its unit roundoff. Other calls stay on eatt.cu.
EATT_TENSOR_CORES = None

#: MCA's shared draws on CuPy: ``"gemm"`` (default) forms, per (batch row, head), the
#: tokens' drawn columns times their group's weights ``[N, R]`` (R: the head's distinct
#: drawn rows, zero-padded to the largest head's) and multiplies it with the drawn rows of
#: W on cuBLAS (``cupy.matmul``, batched over heads); ``"kernel"``: one thread per output
#: element (``mca/kernels/mca_shared.cu``). Same draws and weights; sums in another order.
MCA_SHARED_CUPY = "gemm"

#: Largest global scratch (bytes) a GPU kernel may hold for per-thread work arrays, e.g.
#: MCA's per-token CDFs in optimal sampling; a call needing more is split into launches.
CUDA_SCRATCH_BYTES = 1 << 27


def num_threads():
    """The number of CPU threads to use now (``NUM_THREADS`` or the CPU count)."""
    n = NUM_THREADS if NUM_THREADS is not None else (os.cpu_count() or 1)
    return max(1, int(n))


#: Kernel calls estimated at fewer scalar operations than this run on the calling thread
#: alone (mcattn._cpu.run_tasks ``work=``): waking the thread pool costs tens of
#: microseconds, more than such a call.
CPU_SERIAL_WORK = 1 << 17

#: During a multi-threaded kernel call (mcattn._cpu.run_tasks), keep the calling thread on
#: its CPU and the pool threads off it (Linux thread affinity; the caller's is restored
#: when the call returns). Some kernels pack wake-ups onto busy CPUs (virtual machines
#: whose idle vCPUs are left asleep): after a pause the pool thread then shares the
#: caller's core for tens of milliseconds. False leaves placement to the scheduler.
CPU_SPREAD_THREADS = True

#: Seconds a pool thread of mcattn._cpu.run_tasks keeps looking for the next job (without
#: the GIL, one core busy) before it sleeps; waking a sleeping thread costs tens of
#: microseconds on a virtual machine (mcattn._cpu._Helper). 0: sleep at once.
CPU_SPIN_S = 5e-4
#: Seconds the calling thread looks for the pool threads' end before it sleeps.
CPU_JOIN_SPIN_S = 2e-3
#: Seconds a pool thread keeps spinning after it saw a job, and the calling thread after it
#: saw the pool threads' end: the other side still holds the GIL (the caller until it
#: enters its own kernel, tens of microseconds; a pool thread a few after its end), and a
#: thread that waits for the GIL sleeps on a futex too.
CPU_LINGER_S = 5e-5
CPU_JOIN_LINGER_S = 5e-6

#: Random feature attention (mcattn.rfa): tokens per chunk of the chunked causal/gated
#: form (exact products inside a chunk, a carried state between chunks).
RFA_CHUNK_SIZE = 64
#: Tensor cores for rfa on CuPy (``mcattn/rfa/kernels/rfa_mma.cu``): ``None`` (default:
#: rfa.cu), ``"float16"`` or ``"bfloat16"``. With a value, a float32 call with value dim
#: 32, 64 or 128 forms ``[S | z] = phi(K)^T [V | 1]`` and ``phi(Q) [S | z]`` on 16-bit mma
#: (float32 accumulation): the key features, v, the query features and the state (over
#: the mass) rounded to that type, relative error of order its unit roundoff. Causal and
#: gated calls run the chunked form (chunks of ``RFA_CHUNK_SIZE`` rounded up to a multiple
#: of 64; the state carried in float32, the intra-chunk products as masked decay tiles,
#: each row's weights over its running largest).
RFA_TENSOR_CORES = None
#: Tokens per block of RFA's CPU kernel in the non-causal form (features are computed a
#: block at a time, so memory stays O(block x features)).
RFA_CPU_BLOCK = 256
#: RFA's denominator floor, relative to its Cauchy-Schwarz bound (see mcattn.rfa).
RFA_EPS = 1e-6

#: LATTE (mcattn.latte): query rows per task of the CPU kernel (its scratch is one row of
#: estimates per query of the block, BLOCK_Q x Nk float32).
LATTE_CPU_BLOCK_Q = 64
#: LATTE's CPU estimate in int8 arithmetic (AVX-512 VNNI, mcattn.latte.vnni) where the
#: CPU has it; False takes the float32 BLAS product (the same kept sets, slower).
LATTE_CPU_VNNI = True
#: Tensor cores for LATTE's forward on CuPy (``mcattn/latte/kernels/latte_mma.cu``): ``None``
#: (default: latte.cu), ``"float16"`` or ``"bfloat16"``. With a value, a float32 call in
#: mode relative or absolute with int8 kept scores, no dropped mass and head dim 32, 64 or
#: 128 (d = dv) runs the estimate on int8 mma (the same kept sets, key for key), skips the
#: 64 x 64 tiles where nothing is kept, and rounds the probabilities and v to that type for
#: ``P V`` (float32 accumulation): relative error of order its unit roundoff. The hard-mask
#: backward follows it for float32, mode relative / absolute and d = dv in {32, 64}
#: (``latte_mma_backward.cu``; int8 or float kept scores).
LATTE_TENSOR_CORES = None
#: Keys per chunk of the CPU kernel's kept-key pass (relative / absolute rules without a
#: float mask): every query row of a block takes its kept keys from a chunk while the
#: chunk's key and value rows are in cache.
LATTE_CPU_BLOCK_K = 512

#: Monte-Carlo attention with shared draws: budgets of a head are rounded up into groups
#: spanning at most this relative width (more samples, never fewer), so that the
#: projection is a few reduced GEMMs (mcattn.mca.shared). 0 keeps the budgets as computed.
MCA_SHARED_SLACK = 0.25
#: Shared draws on the CPU use the compiled reduced GEMMs (mcattn.mca.shared_cpu) from this
#: many tokens per sequence on; shorter sequences use the per-draw Numba kernel. Measured
#: (one thread, MiniLM's real budgets): at 11 tokens the two are even, from 29 tokens on
#: the GEMM path is faster (1.1-1.3x at 122 tokens, 2.5-4x at 4096). The two draw the
#: same samples.
MCA_SHARED_GEMM_MIN_TOKENS = 16
#: Monte-Carlo attention never holds the [Nq, Nk] probability matrix (mcattn.mca.stream):
#: it recomputes it in blocks of whole query rows of at most this many probabilities, on
#: the host (NumPy) ...
MCA_BLOCK_ELEMENTS = 1 << 20
#: ... and on a GPU (CuPy), where larger blocks mean fewer kernel launches.
MCA_GPU_BLOCK_ELEMENTS = 1 << 24
#: A probability matrix of at most this many entries (all batch rows and heads) is kept
#: between MCA's two passes instead of being recomputed (short sequences).
MCA_KEEP_ELEMENTS = 1 << 22


def cuda_simulator_enabled():
    """True when numba.cuda runs in its CPU simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
