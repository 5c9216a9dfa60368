#include "cuda_host_shim.h"
#include "kernels/random.cu"

extern "C" void launch_mcattn_philox_words(unsigned gx, unsigned bx, unsigned int k0,
                                           unsigned int k1, unsigned long long stream,
                                           unsigned long long first_index, long long n,
                                           unsigned int* words, double* uniforms) {
    mcattn_shim::launch(dim3(gx), dim3(bx), [&] {
        mcattn_philox_words(k0, k1, stream, first_index, n, words, uniforms);
    });
}
