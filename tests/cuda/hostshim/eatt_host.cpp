#include "cuda_host_shim.h"
#include "eatt/kernels/eatt.cu"

extern "C" void launch_mcattn_eatt_forward_f32(unsigned gx, unsigned gy, unsigned bx,
                                               MCATTN_EATT_ARGS(float)) {
    mcattn_shim::launch(dim3(gx, gy), dim3(bx), [&] { mcattn_eatt_forward_f32(MCATTN_EATT_PASS); });
}
extern "C" void launch_mcattn_eatt_forward_f64(unsigned gx, unsigned gy, unsigned bx,
                                               MCATTN_EATT_ARGS(double)) {
    mcattn_shim::launch(dim3(gx, gy), dim3(bx), [&] { mcattn_eatt_forward_f64(MCATTN_EATT_PASS); });
}
