#include "cuda_host_shim.h"
#include "exact/kernels/exact.cu"

extern "C" void launch_mcattn_exact_forward_f32(unsigned gx, unsigned gy, unsigned bx,
                                                MCATTN_EXACT_ARGS(float)) {
    mcattn_shim::launch(dim3(gx, gy), dim3(bx), [&] { mcattn_exact_forward_f32(MCATTN_EXACT_PASS); });
}
extern "C" void launch_mcattn_exact_forward_f64(unsigned gx, unsigned gy, unsigned bx,
                                                MCATTN_EXACT_ARGS(double)) {
    mcattn_shim::launch(dim3(gx, gy), dim3(bx), [&] { mcattn_exact_forward_f64(MCATTN_EXACT_PASS); });
}
