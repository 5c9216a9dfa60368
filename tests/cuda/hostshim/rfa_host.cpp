// Host-shim launchers of mcattn/rfa/kernels/rfa.cu (1-D grids, as mcattn/rfa/cupy.py launches them).
#include "cuda_host_shim.h"
#include "rfa/kernels/rfa.cu"

#define MCATTN_RFA_LAUNCHER(name, ARGS, PASS)                                             \
    extern "C" void launch_##name(unsigned gx, unsigned bx, ARGS) {                       \
        mcattn_shim::launch(dim3(gx), dim3(bx), [&] { name(PASS); });                      \
    }
MCATTN_RFA_LAUNCHER(mcattn_rfa_features_f32, MCATTN_RFA_FEATURES_ARGS(float), MCATTN_RFA_FEATURES_PASS)
MCATTN_RFA_LAUNCHER(mcattn_rfa_features_f64, MCATTN_RFA_FEATURES_ARGS(double), MCATTN_RFA_FEATURES_PASS)
MCATTN_RFA_LAUNCHER(mcattn_rfa_states_f32, MCATTN_RFA_STATES_ARGS(float), MCATTN_RFA_STATES_PASS)
MCATTN_RFA_LAUNCHER(mcattn_rfa_states_f64, MCATTN_RFA_STATES_ARGS(double), MCATTN_RFA_STATES_PASS)
MCATTN_RFA_LAUNCHER(mcattn_rfa_scan_f32, MCATTN_RFA_SCAN_ARGS(float), MCATTN_RFA_SCAN_PASS)
MCATTN_RFA_LAUNCHER(mcattn_rfa_scan_f64, MCATTN_RFA_SCAN_ARGS(double), MCATTN_RFA_SCAN_PASS)
MCATTN_RFA_LAUNCHER(mcattn_rfa_output_f32, MCATTN_RFA_OUTPUT_ARGS(float), MCATTN_RFA_OUTPUT_PASS)
MCATTN_RFA_LAUNCHER(mcattn_rfa_output_f64, MCATTN_RFA_OUTPUT_ARGS(double), MCATTN_RFA_OUTPUT_PASS)
