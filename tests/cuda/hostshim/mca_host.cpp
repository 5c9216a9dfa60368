#include "cuda_host_shim.h"
#include "mca/kernels/mca.cu"

#define MCATTN_MCA_LAUNCHER(name, T)                                                     \
    extern "C" void launch_##name(unsigned gx, unsigned bx, MCATTN_MCA_ARGS(T)) {         \
        mcattn_shim::launch(dim3(gx), dim3(bx), [&] { name(MCATTN_MCA_PASS); });          \
    }
MCATTN_MCA_LAUNCHER(mcattn_mca_projection_weight_f32, float)
MCATTN_MCA_LAUNCHER(mcattn_mca_projection_weight_f64, double)
MCATTN_MCA_LAUNCHER(mcattn_mca_projection_optimal_f32, float)
MCATTN_MCA_LAUNCHER(mcattn_mca_projection_optimal_f64, double)
