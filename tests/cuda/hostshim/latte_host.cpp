#include "cuda_host_shim.h"
#include "latte/kernels/latte.cu"

extern "C" void launch_mcattn_latte_forward_f32(unsigned gx, unsigned gy, unsigned bx,
                                                MCATTN_LATTE_ARGS(float)) {
    mcattn_shim::launch(dim3(gx, gy), dim3(bx), [&] { mcattn_latte_forward_f32(MCATTN_LATTE_PASS); });
}
extern "C" void launch_mcattn_latte_forward_f64(unsigned gx, unsigned gy, unsigned bx,
                                                MCATTN_LATTE_ARGS(double)) {
    mcattn_shim::launch(dim3(gx, gy), dim3(bx), [&] { mcattn_latte_forward_f64(MCATTN_LATTE_PASS); });
}
