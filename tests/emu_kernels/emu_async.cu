// Asynchronous copies (cp.async) on the emulator: a double-buffered pipeline, and the ways to get
// one wrong that the emulator must catch (tests/emu.rs, emu_async_*).
#include "../../kernels/common.cuh"

// Tiles of 128 float4 (one per thread) pass through two shared buffers: tile i + 1 is copied in
// while tile i is read. y[128 i + t] = sum of the float4 of row ((t ^ 3) + 32) % 128 of tile i
// (another warp's row, brought across lanes by two shuffles, like a tensor-core kernel's
// fragments). `bug` breaks it:
//   1: waits for all but the 2 newest groups (one too many in flight), then for all at the end:
//      tile i is read before it has landed
//   2: no barrier after the reads: tile i + 2 refills the buffer while other warps read tile i
//   3: a copy issued after the loop and never waited for
//   4: a copy into global memory
//   5: a copy to a shared address that is not 16-byte aligned
// Zero rows: row t of tile i is zero-filled (read from nowhere) where (i + t) % 7 == 0.
extern "C" __global__ void emu_async_pipeline(const float* __restrict__ x, float* __restrict__ y, int ntiles,
                                              int bug) {
    __shared__ float4 buf[2][128];
    const int t = (int)threadIdx.x;
    auto issue = [&](int i) {
        void* dst = &buf[i & 1][t];
        if (bug == 4) dst = y + 4 * t;
        if (bug == 5) dst = reinterpret_cast<char*>(dst) + 4;
        nla_cp_async16(dst, x + 4 * (128LL * i + t), (i + t) % 7 != 0);
    };
    issue(0);
    nla_cp_async_commit();
    for (int i = 0; i < ntiles; ++i) {
        if (i + 1 < ntiles) issue(i + 1);
        nla_cp_async_commit();
        if (bug == 1)
            nla_cp_async_wait<2>();
        else
            nla_cp_async_wait<1>();
        __syncthreads();
        const float4 v = buf[i & 1][(t + 32) % 128];
        float s = v.x + v.y + v.z + v.w;
        s = __shfl_xor_sync(0xffffffffu, s, 1);
        s = __shfl_xor_sync(0xffffffffu, s, 2);
        if (bug != 2) __syncthreads();
        y[128LL * i + t] = s;
    }
    if (bug == 1) nla_cp_async_wait<0>();
    if (bug == 3) {
        issue(0);
        nla_cp_async_commit();
    }
}

#ifdef NLA_EMU
NLA_EMU_KERNEL(emu_async_pipeline);
#endif
