// Kernels for tests/ptxas_check.rs (not built into the engine): two copies of one kernel that
// holds 64 floats live at once under a 32-register bound (__launch_bounds__(1024, 2)), so ptxas
// spills both; only spills_hot is marked hot. fits_hot, marked too, does not spill.
// nla: hot spills_hot fits_hot
#define BODY                                                                                  \
    float acc[64];                                                                            \
    _Pragma("unroll") for (int i = 0; i < 64; ++i) acc[i] = in[threadIdx.x + i * n];         \
    _Pragma("unroll") for (int r = 0; r < 4; ++r)                                             \
    _Pragma("unroll") for (int i = 0; i < 64; ++i) acc[i] = acc[i] * acc[(i * 7 + r) & 63] + 1.0f; \
    float s = 0.0f;                                                                           \
    _Pragma("unroll") for (int i = 0; i < 64; ++i) s += acc[i] * (float)i;                   \
    out[threadIdx.x] = s;

extern "C" __global__ void __launch_bounds__(1024, 2) spills_hot(float* out, const float* in, int n) {
    BODY
}

extern "C" __global__ void __launch_bounds__(1024, 2) spills_cold(float* out, const float* in, int n) {
    BODY
}

extern "C" __global__ void fits_hot(float* out, const float* in, int n) {
    out[threadIdx.x] = in[threadIdx.x] * 2.0f + (float)n;
}
