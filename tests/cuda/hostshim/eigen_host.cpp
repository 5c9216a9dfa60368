#include "cuda_host_shim.h"
#include "eigen/kernels/eigen.cu"

extern "C" void launch_mcattn_eigen_forward_f32(unsigned gx, unsigned gy, unsigned bx,
                                                MCATTN_EIGEN_ARGS(float)) {
    mcattn_shim::launch(dim3(gx, gy), dim3(bx), [&] { mcattn_eigen_forward_f32(MCATTN_EIGEN_PASS); });
}
extern "C" void launch_mcattn_eigen_forward_f64(unsigned gx, unsigned gy, unsigned bx,
                                                MCATTN_EIGEN_ARGS(double)) {
    mcattn_shim::launch(dim3(gx, gy), dim3(bx), [&] { mcattn_eigen_forward_f64(MCATTN_EIGEN_PASS); });
}
