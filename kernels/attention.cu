// attention: causal grouped-query attention, forward and backward, FlashAttention-2 style (no
// T x T matrix in memory: score tiles live in registers and shared memory only).
//
// Math    (Device::attention_fwd / attention_bwd; CPU twin src/device/cpu/attention.rs), per
//         batch row b and query head h, which reads KV head g = h / (NH/NKV):
//         scale = 1 / sqrt(hs) (IEEE sqrt and division, as the twin); S_ij = scale q_i . k_j for
//         keys j <= i (causal; j > i masked).
//         fwd: out_i = sum_j softmax_j(S_i.) v_j = (sum_j e^(S_ij - m_i) v_j) * (1 / l_i)      (=)
//              lse[b,h,i] = logsumexp_j S_ij, natural log                                  (=)
//         bwd: P_ij = exp(S_ij - lse_i), D_i = dout_i . out_i, dS_ij = P_ij (dout_i . v_j - D_i)
//              D[b,h,i] = D_i  (attention_bwd_dot: a pre-pass into f32 scratch)            (=)
//              dq_i = scale sum_{j <= i} dS_ij k_j                                         (=)
//              dk_j = scale sum_{h of group g} sum_{i >= j} dS_ij q_i                      (=)
//              dv_j = sum_{h of group g} sum_{i >= j} P_ij dout_i                          (=)
//         All outputs are overwritten (activation gradients); nothing needs zeroing first.
//         Softmax in base 2: a score is computed as s2 = (q . k) * (scale * log2(e)) and
//         exponentials as exp2f (one MUFU op, 2 ulp); the online softmax keeps per row the
//         running max m2 and sum l of exp2(s2 - m2) in f32, so lse = m2 * ln(2) + ln(l). The
//         backward recomputes P = exp2(s2 - lse * log2(e)) from the forward's lse.
// Shapes  q, out, dout, dq [B,T,NH,HS]; k, v, dk, dv [B,T,NKV,HS]; lse, D [B,NH,T] (row-major).
// Dtypes  q, k, v, out, dout, dq, dk, dv: T; lse and D: f32 in both modes. The f32 kernels
//         keep their tiles in f32 in shared memory; every product and sum is f32 (fmaf); bf16
//         outputs are rounded once, to nearest even, when stored.
//         The bf16 kernels run on tensor cores (attn_fwd_tc, attn_bwd_dq_tc, attn_bwd_dkdv_tc
//         below: bf16 tiles, f32 accumulators, P and dS rounded to bf16 as mma inputs).
// Head    the head size is a template parameter HSB (the bucket) in {16, 32, 64, 128}; a kernel
// size    handles any runtime hs <= HSB (tiles are zero-padded to HSB in shared memory, which
//         leaves every dot product exact), so the launcher picks the smallest bucket >= hs:
//         tests' hs 3..16 -> _hs16, the demo's 32 -> _hs32, SmolLM2's 64 -> _hs64, Llama's 128 ->
//         _hs128. hs > 128 is not supported (the launcher reports it).
// Threads every tiled kernel: 128 threads = 4 warps; tid = 8 ty + tx (ty < 16, tx < 8). An outer
//         tile holds BO = 64 rows (queries in fwd/dq, keys in dkdv); the inner tile loops over
//         BI = 64 rows (BI = 32 for HSB = 128, to bound shared memory and registers). Thread
//         (ty, tx) owns outer rows 4 ty + r (r < 4), inner columns tx + 8 c (c < BI/8) of a
//         score tile and head dims tx + 8 c (c < HSB/8) of an output tile: a 4 x (BI/8) and a
//         4 x (HSB/8) register tile, computed as outer products over shared memory (SIMT fmaf;
//         the bf16 kernels are the tensor-core versions further down). The 8 threads of a row
//         share a
//         warp, so row max/sum are 3 xor shuffles. Tiles are stored [rows][HSB + 1] (odd stride:
//         row-wise and column-wise reads are both free of bank conflicts), score tiles
//         [64][BI + 2] (conflict-free stores of the 4 x BI/8 thread tiles).
//         attention_fwd: one block per (query tile, h, b); query tiles in reverse order
//           (blockIdx.x = 0 is the last, longest tile: the causal work is front-loaded). Per key
//           tile j0 <= last query: load K, V -> S = Q K^T -> mask, online softmax, P -> smem ->
//           O += P V. Writes out and lse of its rows.
//         attention_bwd_dot: D = rowsum(dout * out), one warp per (b, t, h) row, grid-stride.
//         attention_bwd_dq: one block per (query tile, h, b), reverse order as fwd; per key tile:
//           S = Q K^T and dP = dO V^T in one pass over d, dS = P (dP - D) -> smem, dQ += dS K.
//         attention_bwd_dkdv: one block per (key tile, g, b) (tile 0, the longest, first); loops
//           over the query heads of group g and, for each, over the query tiles at or after the
//           key tile: S^T = K Q^T and dP^T = V dO^T, P^T and dS^T -> smem, dV += P^T dO,
//           dK += dS^T Q. The GQA sum over the group runs inside the block, in registers: no
//           atomics, deterministic, dk and dv written once (=). dq comes from its own kernel
//           (recomputing S and dP, 7 instead of 5 tile products) rather than from f32 atomics
//           into scratch: deterministic, no zeroing, no conversion pass.
//         Order: attention_bwd_dot, then attention_bwd_dq and attention_bwd_dkdv (independent).
// Launch  block 128 (all; dq and dkdv declare at least 1 block per SM to their register
//         allocator, which otherwise held dkdv's bf16 hs32 instance at 128 registers and dq's
//         bf16 hs16 at 80, each with a spill). Grids: fwd and dq (ceil(T/64), NH, B), the
//         bf16 forward's _bo128 kernels (ceil(T/128), NH, B); dkdv (ceil(T/64), NKV, B);
//         dot: any grid (grid-stride over warps), efficient: ceil(B*T*NH/4) blocks of 128 (one
//         warp per row), capped at 65535 or a few per SM.
//         Dynamic shared memory in bytes, with LD = HSB + 1, BI as above, LP = BI + 2:
//           fwd   4 * (64 LD + 2 BI LD + 64 LP)
//           dq    4 * (2 * 64 LD + 2 BI LD + 64 LP)
//           dkdv  4 * (2 * 64 LD + 2 BI LD + 2 * 64 LP + 2 BI)
//           HSB:    16      32      64      128
//           fwd   29952   42240   66816   74752
//           dq    34304   50688   83456  107776
//           dkdv  51712   68096  100864  116736
//         Over 48 KiB: raise CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES; all fit sm_80's
//         163 KiB per block. dot: none. The bf16 forward (tensor cores): 8 * 64 * (HSB + 8)
//         (12288, 20480, 36864, 69632); its _bo128 kernels (HSB 64: 36864, HSB 128:
//         2 * (4 * 32 + 128) * 136 = 69632) take 128 query rows per block, grid
//         (ceil(T/128), NH, B). The forwards declare the blocks per SM they are compiled for
//         (AttnFwd::BLOCKS).
// Symbols attention_fwd_<f32|bf16>_hs<16|32|64|128>, attention_fwd_bf16_hs<64|128>_bo128
//           (T* out, float* lse, const T* q, const T* k, const T* v,
//            int b, int t, int nh, int nkv, int hs)
//         attention_bwd_dot_<f32|bf16>
//           (float* D, const T* dout, const T* out, int b, int t, int nh, int hs)
//         attention_bwd_dq_<f32|bf16>_hs<16|32|64|128>
//           (T* dq, const T* dout, const T* q, const T* k, const T* v, const float* lse,
//            const float* D, int b, int t, int nh, int nkv, int hs)
//         attention_bwd_dkdv_<f32|bf16>_hs<16|32|64|128>
//           (T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v, const float* lse,
//            const float* D, int b, int t, int nh, int nkv, int hs)
//
// nla: hot

#include "common.cuh"

#define ATTN_NT 128  // threads of every tiled kernel
#define ATTN_BO 64   // rows of the outer tile
#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f

template <int HSB> struct AttnCfg {
    static constexpr int BI = HSB >= 128 ? 32 : 64;  // rows of the inner tile
    static constexpr int LD = HSB + 1;               // stride of [rows][HSB] tiles (odd)
    static constexpr int LP = BI + 2;                // stride of [64][BI] score tiles
    static constexpr int CPT = BI / 8;               // inner columns per thread
    static constexpr int DPT = HSB / 8;              // head dims per thread
};

// dst[r][d] (stride HSB + 1, f32) = src[(row0 + r) * rstride + d] for r < ROWS, d < HSB; 0 where
// row0 + r >= nrows or d >= hs. Consecutive threads take consecutive d: coalesced global reads,
// conflict-free shared writes.
template <int ROWS, int HSB, typename T>
__device__ __forceinline__ void attn_load_tile(float* dst, const T* __restrict__ src,
                                               long long rstride, int row0, int nrows, int hs) {
    constexpr int LD = HSB + 1, PER = ROWS * HSB / ATTN_NT;
    static_assert(ROWS * HSB % ATTN_NT == 0, "tile not a multiple of the block");
#pragma unroll 8
    for (int k = 0; k < PER; ++k) {
        const int e = (int)threadIdx.x + k * ATTN_NT;
        const int r = e / HSB, d = e % HSB, row = row0 + r;
        float x = 0.0f;
        if (row < nrows && d < hs) x = nla_f32(src[(long long)row * rstride + d]);
        dst[r * LD + d] = x;
    }
}

// Max and sum over the 8 threads (tx) that share a row: lanes 8k..8k+7 of a warp.
__device__ __forceinline__ float attn_row_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
}
__device__ __forceinline__ float attn_row_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    return v + __shfl_xor_sync(0xffffffffu, v, 4);
}

// ---- forward

template <typename T, int HSB>
__device__ __forceinline__ void attn_fwd(T* __restrict__ out, float* __restrict__ lse,
                                         const T* __restrict__ q, const T* __restrict__ k,
                                         const T* __restrict__ v, int nb, int nt, int nh,
                                         int nkv, int hs) {
    using C = AttnCfg<HSB>;
    constexpr int BO = ATTN_BO, BI = C::BI, LD = C::LD, LP = C::LP, CPT = C::CPT, DPT = C::DPT;
    NLA_DYNAMIC_SMEM(float, smem);
    float* Qs = smem;          // [BO][LD]
    float* Ks = Qs + BO * LD;  // [BI][LD]
    float* Vs = Ks + BI * LD;  // [BI][LD]
    float* Ps = Vs + BI * LD;  // [BO][LP]
    const int nqt = (nt + BO - 1) / BO;
    if ((int)blockIdx.x >= nqt || (int)blockIdx.y >= nh || (int)blockIdx.z >= nb) return;
    const int qt = nqt - 1 - (int)blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int g = h / (nh / nkv);
    const int tx = threadIdx.x & 7, ty = threadIdx.x >> 3;
    const int q0 = qt * BO;
    const float sl2 = (1.0f / sqrtf((float)hs)) * ATTN_LOG2E;
    const long long qstr = (long long)nh * hs, kstr = (long long)nkv * hs;
    const T* qb = q + (long long)b * nt * qstr + (long long)h * hs;
    const T* kb = k + (long long)b * nt * kstr + (long long)g * hs;
    const T* vb = v + (long long)b * nt * kstr + (long long)g * hs;

    attn_load_tile<BO, HSB>(Qs, qb, qstr, q0, nt, hs);

    float acc[4][DPT], m[4], l[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < DPT; ++c) acc[r][c] = 0.0f;
    }
    // key tiles up to the last query of the tile; tile 0 holds key 0, which every row sees,
    // so each row's running max is finite from the first tile on
    const int nkt = (min(nt, q0 + BO) + BI - 1) / BI;
    for (int kt = 0; kt < nkt; ++kt) {
        const int k0 = kt * BI;
        __syncthreads();  // the previous tile's readers of Ks, Vs, Ps are done
        attn_load_tile<BI, HSB>(Ks, kb, kstr, k0, nt, hs);
        attn_load_tile<BI, HSB>(Vs, vb, kstr, k0, nt, hs);
        __syncthreads();
        float s[4][CPT];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < CPT; ++c) s[r][c] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < HSB; ++d) {
            float a[4], bk[CPT];
#pragma unroll
            for (int r = 0; r < 4; ++r) a[r] = Qs[(ty * 4 + r) * LD + d];
#pragma unroll
            for (int c = 0; c < CPT; ++c) bk[c] = Ks[(tx + 8 * c) * LD + d];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < CPT; ++c) s[r][c] = fmaf(a[r], bk[c], s[r][c]);
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int qi = q0 + ty * 4 + r;
            float mx = -INFINITY;
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
                s[r][c] = k0 + tx + 8 * c <= qi ? s[r][c] * sl2 : -INFINITY;
                mx = fmaxf(mx, s[r][c]);
            }
            mx = attn_row_max(mx);
            const float mn = fmaxf(m[r], mx);      // finite (see above)
            const float alpha = exp2f(m[r] - mn);  // 0 on the first tile (m = -inf)
            m[r] = mn;
            float rs = 0.0f;
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
                const float p = exp2f(s[r][c] - mn);  // masked: exp2(-inf) = 0
                rs += p;
                Ps[(ty * 4 + r) * LP + tx + 8 * c] = p;
            }
            l[r] = l[r] * alpha + rs;  // this thread's columns; summed over the row at the end
#pragma unroll
            for (int c = 0; c < DPT; ++c) acc[r][c] *= alpha;
        }
        __syncthreads();
#pragma unroll 4
        for (int j = 0; j < BI; ++j) {
            float a[4], bv[DPT];
#pragma unroll
            for (int r = 0; r < 4; ++r) a[r] = Ps[(ty * 4 + r) * LP + j];
#pragma unroll
            for (int c = 0; c < DPT; ++c) bv[c] = Vs[j * LD + tx + 8 * c];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < DPT; ++c) acc[r][c] = fmaf(a[r], bv[c], acc[r][c]);
        }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const float lr = attn_row_sum(l[r]);
        const int qi = q0 + ty * 4 + r;
        if (qi < nt) {
            const float inv = 1.0f / lr;
            T* o = out + ((long long)b * nt + qi) * qstr + (long long)h * hs;
#pragma unroll
            for (int c = 0; c < DPT; ++c) {
                const int d = tx + 8 * c;
                if (d < hs) o[d] = nla_from_f32<T>(acc[r][c] * inv);
            }
            if (tx == 0) lse[((long long)b * nh + h) * nt + qi] = m[r] * ATTN_LN2 + logf(lr);
        }
    }
}

// ---- bf16 tiles and mma fragments (the tensor-core kernels)

// Zero-filled bf16 tile: dst[r][d] (stride HSB + 8) = src[(row0 + r) * rstride + d] for
// r < ROWS, d < HSB; 0 where row0 + r >= nrows or d >= hs. 16 bytes (8 bf16) per access when
// hs = HSB and every row of src is 16-byte aligned (dst's rows always are: HSB + 8 is a
// multiple of 8), else one element at a time.
template <int ROWS, int HSB>
__device__ __forceinline__ void attn_load_bf16(nla_bf16* dst, const nla_bf16* __restrict__ src,
                                               long long rstride, int row0, int nrows, int hs) {
    const nla_bf16 zero = nla_from_f32<nla_bf16>(0.0f);
    if (hs == HSB && rstride % 8 == 0 && nla_aligned(src, 16)) {
        constexpr int V = HSB / 8;  // 16-byte vectors per row
        for (int e = (int)threadIdx.x; e < ROWS * V; e += ATTN_NT) {
            const int r = e / V, c = (e % V) * 8, row = row0 + r;
            NlaVec<nla_bf16, 8> x;
            if (row < nrows) {
                x = nla_load<8>(src + (long long)row * rstride + c);
            } else {
                NLA_UNROLL
                for (int j = 0; j < 8; ++j) x.v[j] = zero;
            }
            nla_store<8>(dst + r * (HSB + 8) + c, x);
        }
        return;
    }
    for (int e = (int)threadIdx.x; e < ROWS * HSB; e += ATTN_NT) {
        const int r = e / HSB, d = e % HSB, row = row0 + r;
        dst[r * (HSB + 8) + d] = row < nrows && d < hs ? src[(long long)row * rstride + d] : zero;
    }
}

// attn_load_bf16 through cp.async where it moves 16-byte vectors: the copies are in flight until
// this thread's nla_cp_async_wait (rows past nrows are zero-filled, reading nothing); otherwise
// (hs < HSB, or src unaligned) the same plain loads and stores as attn_load_bf16, done on return.
// Either way the tile is complete for every thread after the wait and a __syncthreads.
template <int ROWS, int HSB>
__device__ __forceinline__ void attn_load_bf16_async(nla_bf16* dst, const nla_bf16* __restrict__ src,
                                                     long long rstride, int row0, int nrows, int hs) {
    if (hs != HSB || rstride % 8 != 0 || !nla_aligned(src, 16)) {
        attn_load_bf16<ROWS, HSB>(dst, src, rstride, row0, nrows, hs);
        return;
    }
    constexpr int V = HSB / 8;  // 16-byte vectors per row
    for (int e = (int)threadIdx.x; e < ROWS * V; e += ATTN_NT) {
        const int r = e / V, c = (e % V) * 8, row = row0 + r;
        const bool in = row < nrows;
        nla_cp_async16(dst + r * (HSB + 8) + c, src + (long long)(in ? row : 0) * rstride + c, in);
    }
}

// Two tiles of the same rows (K and V, or Q and dO: one stride) into a buffer: a's at dst, b's
// at dst + ROWS * (HSB + 8), through attn_load_bf16_async.
template <int ROWS, int HSB>
__device__ __forceinline__ void attn_load_pair_async(nla_bf16* dst, const nla_bf16* __restrict__ a,
                                                     const nla_bf16* __restrict__ b,
                                                     long long rstride, int row0, int nrows,
                                                     int hs) {
    attn_load_bf16_async<ROWS, HSB>(dst, a, rstride, row0, nrows, hs);
    attn_load_bf16_async<ROWS, HSB>(dst + ROWS * (HSB + 8), b, rstride, row0, nrows, hs);
}

// Fragments of bf16 tiles in shared memory (stride ld, rows 16-byte aligned: ld a multiple of
// 8, r0, k0, n0, c0 multiples of 8), one ldmatrix x4 each (nla_ldmatrix_x4: lane l addresses
// row l % 8 of matrix l / 8).

// A fragment of the 16 x 16 block at (r0, c0) of t: matrices (rows r0, r0 + 8) x (cols c0,
// c0 + 8) in a's order.
__device__ __forceinline__ void attn_frag_a(uint32_t a[4], const nla_bf16* t, int ld, int r0,
                                            int c0, int lane) {
    nla_ldmatrix_x4<false>(a, t + (r0 + 8 * ((lane >> 3) & 1) + (lane & 7)) * ld + c0 +
                                  8 * (lane >> 4));
}

// B fragments (16 x 8) of two n-tiles, B[kk][n] = t[(n0 + n) ld + k0 + kk] (the tile's rows
// are B's columns): b[0..1] n-tile n0, b[2..3] n-tile n0 + 8.
__device__ __forceinline__ void attn_frag_bt2(uint32_t b[4], const nla_bf16* t, int ld, int k0,
                                              int n0, int lane) {
    nla_ldmatrix_x4<false>(b, t + (n0 + 8 * (lane >> 4) + (lane & 7)) * ld + k0 +
                                  8 * ((lane >> 3) & 1));
}

// B fragments (16 x 8) of two n-tiles, B[kk][n] = t[(k0 + kk) ld + n0 + n] (the tile's rows
// are B's rows: a transposed load): b[0..1] n-tile n0, b[2..3] n-tile n0 + 8.
__device__ __forceinline__ void attn_frag_b2(uint32_t b[4], const nla_bf16* t, int ld, int k0,
                                             int n0, int lane) {
    nla_ldmatrix_x4<true>(b, t + (k0 + 8 * ((lane >> 3) & 1) + (lane & 7)) * ld + n0 +
                                 8 * (lane >> 4));
}

// The A fragment of a 16-wide k-step made of two C fragments (n-tiles c0, c1), to bf16.
__device__ __forceinline__ void attn_c_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = nla_pack_bf16(c0[0], c0[1]);
    a[1] = nla_pack_bf16(c0[2], c0[3]);
    a[2] = nla_pack_bf16(c1[0], c1[1]);
    a[3] = nla_pack_bf16(c1[2], c1[3]);
}

// ---- forward, bf16: tensor cores
//
// The same algorithm as attn_fwd with the tile products on tensor cores (nla_mma_bf16_16816).
// Block 128 = 4 warps; a block takes BO = 64 MT query rows and each warp 16 MT of them (MT
// m-tiles of 16 rows: MT = 1, the _hs<B> kernels, or 2, the _hs<B>_bo128 ones; with MT = 2
// every K and V fragment read from shared memory feeds two mma instead of one). Per key tile
// of BK = 64 keys (32 at MT 2, HSB 128, to keep S at 32 registers beside O's 128; K and V in
// shared memory as bf16, rows of HSB + 8: 16-byte aligned, and the 8 rows of an ldmatrix fall
// in distinct banks; two buffers: tile kt + 1 is copied in with cp.async while tile kt is
// used):
//   S = Q K^T: per warp a 16 MT x BK tile, BK/8 n-tiles of 8 keys x HSB/16 k-steps per m-tile,
//     K's B fragments of two n-tiles per ldmatrix (attn_frag_bt2), used by every m-tile. Q's
//     A fragments stay in registers for the whole block where they take at most 32 of them
//     (MT HSB / 16 k-steps x 4; read once from global memory, zero past hs and T), else (MT 2,
//     HSB 128) Q sits in shared memory (copied with key tile 0) and each k-step's fragments
//     are read with ldmatrix (attn_frag_a) per key tile;
//   online softmax in the S fragments (a lane holds rows gr and gr + 8 of each m-tile, 16
//     columns each; the row max and sum over the 4 lanes of a row are 2 xor shuffles); l sums
//     the f32 p;
//   O += P V: the S fragments, rounded to bf16, are the A fragments of P (two 8-key n-tiles
//     make one 16-key k-step), V's B fragments of two n-tiles per transposed ldmatrix
//     (attn_frag_b2), O in MT x HSB/8 f32 fragments.
// A warp skips a key tile that lies wholly after its last row (MT 2 on the diagonal: at HSB 64
// warps 0 and 1 skip the last tile; at HSB 128, 32-key tiles, warps 0, 1, 2 skip 3, 2, 1), and
// masks only in a tile that reaches past its first row.
// P is rounded to bf16 for the P V product (the tensor cores' input type) while l sums the
// unrounded p: out moves by at most 2^-9 sum_j p_j |v_j| / l <= 2^-9 max|v| from the f32
// algorithm, on top of out's own rounding when stored.
// Shared memory: 2 buffers of K and V, 4 * BK * (HSB + 8) bf16 = 8 * 64 * (HSB + 8) bytes at
// BK 64 (16: 12288, 32: 20480, 64: 36864, 128: 69632), and Q's 128 rows after them where it is
// not in registers (bo128 at HSB 128, BK 32: 2 * (4 * 32 + 128) * 136 = 69632).
template <int HSB, int MT>
__device__ __forceinline__ void attn_fwd_tc(nla_bf16* __restrict__ out, float* __restrict__ lse,
                                            const nla_bf16* __restrict__ q,
                                            const nla_bf16* __restrict__ k,
                                            const nla_bf16* __restrict__ v, int nb, int nt,
                                            int nh, int nkv, int hs) {
    constexpr int BO = ATTN_BO * MT, BK = MT == 2 && HSB == 128 ? 32 : 64, LDS = HSB + 8;
    constexpr int KS = HSB / 16;               // k-steps of Q K^T
    constexpr int NS = BK / 8;                 // n-tiles of S
    constexpr int NO = HSB / 8;                // n-tiles of O
    constexpr bool QREG = MT * KS * 4 <= 32;   // Q's fragments in registers, else in smem
    // buffer j: K [BK][LDS] at 2 j BK LDS, then V [BK][LDS]; Q [BO][LDS] at 4 BK LDS (!QREG)
    NLA_DYNAMIC_SMEM(nla_bf16, smem);
    nla_bf16* Qs = smem + 4 * BK * LDS;
    const int nqt = (nt + BO - 1) / BO;
    if ((int)blockIdx.x >= nqt || (int)blockIdx.y >= nh || (int)blockIdx.z >= nb) return;
    const int qt = nqt - 1 - (int)blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int g = h / (nh / nkv);
    const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    const int gr = lane >> 2, tc = lane & 3;
    const int q0 = qt * BO;
    const int w0 = warp * 16 * MT;               // the warp's first row in the block's tile
    const int wfirst = q0 + w0, wlast = wfirst + 16 * MT - 1;
    const int r0 = wfirst + gr;  // this lane's rows: r0 + 16 mt + 8 r (r < 2), m-tile mt
    const float sl2 = (1.0f / sqrtf((float)hs)) * ATTN_LOG2E;
    const long long qstr = (long long)nh * hs, kstr = (long long)nkv * hs;
    const nla_bf16* qb = q + (long long)b * nt * qstr + (long long)h * hs;
    const nla_bf16* kb = k + (long long)b * nt * kstr + (long long)g * hs;
    const nla_bf16* vb = v + (long long)b * nt * kstr + (long long)g * hs;
    const nla_bf16 zero = nla_from_f32<nla_bf16>(0.0f);
    // key tile 0 into buffer 0 (and Q into Qs), in flight while Q's fragments are loaded
    attn_load_pair_async<BK, HSB>(smem, kb, vb, kstr, 0, nt, hs);
    if constexpr (!QREG) attn_load_bf16_async<BO, HSB>(Qs, qb, qstr, q0, nt, hs);
    nla_cp_async_commit();

    // Q's A fragments (QREG): qa[mt][ks][j] = Q[r0 + 16 mt + 8 (j & 1)][ks * 16 + 2 tc
    // + 8 (j >> 1) + {0, 1}]
    uint32_t qa[QREG ? MT : 1][QREG ? KS : 1][4];
    if constexpr (QREG) {
        NLA_UNROLL
        for (int mt = 0; mt < MT; ++mt)
            NLA_UNROLL
            for (int ks = 0; ks < KS; ++ks)
                NLA_UNROLL
                for (int j = 0; j < 4; ++j) {
                    const int r = r0 + 16 * mt + 8 * (j & 1), c = ks * 16 + 2 * tc + 8 * (j >> 1);
                    const nla_bf16* src = qb + (long long)r * qstr;
                    const bool in = r < nt;
                    qa[mt][ks][j] = nla_pack_bf16(in && c < hs ? src[c] : zero,
                                                  in && c + 1 < hs ? src[c + 1] : zero);
                }
    }
    float o[MT][NO][4], m[MT][2], l[MT][2];
    NLA_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
        NLA_UNROLL
        for (int r = 0; r < 2; ++r) {
            m[mt][r] = -INFINITY;
            l[mt][r] = 0.0f;
        }
        NLA_UNROLL
        for (int n = 0; n < NO; ++n)
            NLA_UNROLL
            for (int i = 0; i < 4; ++i) o[mt][n][i] = 0.0f;
    }

    // key tiles up to the last query of the tile; tile 0 holds key 0, which every row sees,
    // so each row's running max is finite from the first tile on
    const int nkt = (min(nt, q0 + BO) + BK - 1) / BK;
    for (int kt = 0; kt < nkt; ++kt) {
        const int k0 = kt * BK;
        const nla_bf16* Ks = smem + (kt & 1) * 2 * BK * LDS;  // [BK][LDS]
        const nla_bf16* Vs = Ks + BK * LDS;                     // [BK][LDS]
        if (kt + 1 < nkt)  // into the other buffer, whose readers passed the last barrier
            attn_load_pair_async<BK, HSB>(smem + ((kt + 1) & 1) * 2 * BK * LDS, kb, vb, kstr,
                                          k0 + BK, nt, hs);
        nla_cp_async_commit();
        nla_cp_async_wait<1>();  // this thread's copies of tile kt have landed
        __syncthreads();         // and every thread's
        if (k0 <= wlast) {       // uniform over the warp: some key of the tile is seen
            // S = Q K^T (16 MT x BK per warp), two n-tiles of 8 keys per K load
            float s[MT][NS][4];
            NLA_UNROLL
            for (int mt = 0; mt < MT; ++mt)
                NLA_UNROLL
                for (int n = 0; n < NS; ++n)
                    NLA_UNROLL
                    for (int i = 0; i < 4; ++i) s[mt][n][i] = 0.0f;
            NLA_UNROLL
            for (int ks = 0; ks < KS; ++ks) {
                uint32_t qf[MT][4];
                NLA_UNROLL
                for (int mt = 0; mt < MT; ++mt) {
                    if constexpr (QREG) {
                        NLA_UNROLL
                        for (int j = 0; j < 4; ++j) qf[mt][j] = qa[mt][ks][j];
                    } else {
                        attn_frag_a(qf[mt], Qs, LDS, w0 + mt * 16, ks * 16, lane);
                    }
                }
                NLA_UNROLL
                for (int n = 0; n < NS; n += 2) {
                    uint32_t bk[4];
                    attn_frag_bt2(bk, Ks, LDS, ks * 16, n * 8, lane);
                    NLA_UNROLL
                    for (int mt = 0; mt < MT; ++mt) {
                        nla_mma_bf16_16816(s[mt][n], qf[mt], bk);
                        nla_mma_bf16_16816(s[mt][n + 1], qf[mt], bk + 2);
                    }
                }
            }
            // scale, causal mask, online softmax; the rows of this lane in m-tile mt: r0 +
            // 16 mt (s[mt][.][0..1]) and r0 + 16 mt + 8 (s[mt][.][2..3]). Only a tile that
            // reaches past the warp's first row has keys to mask (those after a row, and any
            // past T, which are after every row); the tiles before it (all but one or two of a
            // long row's) skip the compare.
            float mx[MT][2];
            NLA_UNROLL
            for (int mt = 0; mt < MT; ++mt) mx[mt][0] = mx[mt][1] = -INFINITY;
            if (k0 + BK - 1 > wfirst) {
                // key k0 + 8 n + 2 tc + (i & 1) <= row r0 + 16 mt + 8 (i >> 1), i.e.
                // 8 n + (i & 1) - 16 mt - 8 (i >> 1) <= lim: one compare with a constant
                const int lim = r0 - k0 - 2 * tc;
                NLA_UNROLL
                for (int mt = 0; mt < MT; ++mt)
                    NLA_UNROLL
                    for (int n = 0; n < NS; ++n)
                        NLA_UNROLL
                        for (int i = 0; i < 4; ++i) {
                            const int key = 8 * n + (i & 1) - 16 * mt - 8 * (i >> 1);
                            s[mt][n][i] = key <= lim ? s[mt][n][i] * sl2 : -INFINITY;
                            mx[mt][i >> 1] = fmaxf(mx[mt][i >> 1], s[mt][n][i]);
                        }
            } else {
                NLA_UNROLL
                for (int mt = 0; mt < MT; ++mt)
                    NLA_UNROLL
                    for (int n = 0; n < NS; ++n)
                        NLA_UNROLL
                        for (int i = 0; i < 4; ++i) {
                            s[mt][n][i] *= sl2;
                            mx[mt][i >> 1] = fmaxf(mx[mt][i >> 1], s[mt][n][i]);
                        }
            }
            float alpha[MT][2];
            NLA_UNROLL
            for (int mt = 0; mt < MT; ++mt)
                NLA_UNROLL
                for (int r = 0; r < 2; ++r) {
                    float x = mx[mt][r];
                    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
                    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
                    const float mn = fmaxf(m[mt][r], x);  // finite (see above)
                    alpha[mt][r] = exp2f(m[mt][r] - mn);  // 0 on the first tile (m = -inf)
                    m[mt][r] = mn;
                    l[mt][r] *= alpha[mt][r];
                }
            NLA_UNROLL
            for (int mt = 0; mt < MT; ++mt) {
                NLA_UNROLL
                for (int n = 0; n < NS; ++n)
                    NLA_UNROLL
                    for (int i = 0; i < 4; ++i) {
                        s[mt][n][i] = exp2f(s[mt][n][i] - m[mt][i >> 1]);  // masked: 0
                        l[mt][i >> 1] += s[mt][n][i];  // this lane's columns (summed at the end)
                    }
                NLA_UNROLL
                for (int n = 0; n < NO; ++n)
                    NLA_UNROLL
                    for (int i = 0; i < 4; ++i) o[mt][n][i] *= alpha[mt][i >> 1];
            }
            // O += P V: k-step kk covers keys kk * 16 .. + 16 (S n-tiles 2 kk and 2 kk + 1)
            NLA_UNROLL
            for (int kk = 0; kk < BK / 16; ++kk) {
                uint32_t pa[MT][4];
                NLA_UNROLL
                for (int mt = 0; mt < MT; ++mt) attn_c_to_a(pa[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
                NLA_UNROLL
                for (int n = 0; n < NO; n += 2) {
                    uint32_t bv[4];
                    attn_frag_b2(bv, Vs, LDS, kk * 16, n * 8, lane);
                    NLA_UNROLL
                    for (int mt = 0; mt < MT; ++mt) {
                        nla_mma_bf16_16816(o[mt][n], pa[mt], bv);
                        nla_mma_bf16_16816(o[mt][n + 1], pa[mt], bv + 2);
                    }
                }
            }
        }
        __syncthreads();  // every warp is done with this buffer before tile kt + 2 refills it
    }
    NLA_UNROLL
    for (int mt = 0; mt < MT; ++mt)
        NLA_UNROLL
        for (int r = 0; r < 2; ++r) {
            float lr = l[mt][r];
            lr += __shfl_xor_sync(0xffffffffu, lr, 1);
            lr += __shfl_xor_sync(0xffffffffu, lr, 2);
            const int qi = r0 + 16 * mt + 8 * r;
            if (qi >= nt) continue;
            const float inv = 1.0f / lr;
            nla_bf16* orow = out + ((long long)b * nt + qi) * qstr + (long long)h * hs;
            NLA_UNROLL
            for (int n = 0; n < NO; ++n)
                NLA_UNROLL
                for (int i = 0; i < 2; ++i) {
                    const int d = n * 8 + 2 * tc + i;
                    if (d < hs) orow[d] = nla_from_f32<nla_bf16>(o[mt][n][2 * r + i] * inv);
                }
            if (tc == 0)
                lse[((long long)b * nh + h) * nt + qi] = m[mt][r] * ATTN_LN2 + logf(lr);
        }
}

// The forward of each storage type: f32 on the SIMT cores (the parity path), bf16 on tensor
// cores with MT m-tiles per warp. BLOCKS: the blocks per SM each kernel is compiled for (its
// __launch_bounds__ minimum), i.e. its register budget: ptxas keeps to 64K / (128 BLOCKS)
// registers a thread. Left to itself, ptxas held the bf16 hs64 forward at 128 registers with
// a spill; these budgets hold every instance without spilling (registers in the ptxas report).
// Shared memory may allow fewer blocks (the f32 kernels at HSB 64 and 128: 3).
template <typename T, int HSB, int MT = 1> struct AttnFwd {
    static constexpr int BLOCKS = HSB >= 64 ? 4 : 5;
    static __device__ __forceinline__ void run(T* out, float* lse, const T* q, const T* k,
                                               const T* v, int b, int t, int nh, int nkv,
                                               int hs) {
        attn_fwd<T, HSB>(out, lse, q, k, v, b, t, nh, nkv, hs);
    }
};
template <int HSB, int MT> struct AttnFwd<nla_bf16, HSB, MT> {
    static constexpr int BLOCKS = MT == 2 || HSB == 128 ? 2 : HSB == 64 ? 3 : 4;
    static __device__ __forceinline__ void run(nla_bf16* out, float* lse, const nla_bf16* q,
                                               const nla_bf16* k, const nla_bf16* v, int b, int t,
                                               int nh, int nkv, int hs) {
        attn_fwd_tc<HSB, MT>(out, lse, q, k, v, b, t, nh, nkv, hs);
    }
};

// ---- backward: D = rowsum(dout * out)

template <typename T>
__device__ __forceinline__ void attn_bwd_dot(float* __restrict__ D, const T* __restrict__ dout,
                                             const T* __restrict__ out, int nb, int nt, int nh,
                                             int hs) {
    const long long rows = (long long)nb * nt * nh;
    const int lane = nla_lane(), nw = nla_warps();
    for (long long row = (long long)blockIdx.x * nw + nla_warp(); row < rows;
         row += (long long)gridDim.x * nw) {  // uniform over the warp
        const T* g = dout + row * hs;
        const T* o = out + row * hs;
        float s = 0.0f;
        for (int d = lane; d < hs; d += NLA_WARP) s = fmaf(nla_f32(g[d]), nla_f32(o[d]), s);
        s = nla_warp_sum(s);
        if (lane == 0) {
            const long long bi = row / ((long long)nt * nh);
            const int i = (int)(row / nh % nt), h = (int)(row % nh);
            D[(bi * nh + h) * nt + i] = s;
        }
    }
}

// ---- backward: dq

template <typename T, int HSB>
__device__ __forceinline__ void attn_bwd_dq(T* __restrict__ dq, const T* __restrict__ dout,
                                            const T* __restrict__ q, const T* __restrict__ k,
                                            const T* __restrict__ v,
                                            const float* __restrict__ lse,
                                            const float* __restrict__ D, int nb, int nt, int nh,
                                            int nkv, int hs) {
    using C = AttnCfg<HSB>;
    constexpr int BO = ATTN_BO, BI = C::BI, LD = C::LD, LP = C::LP, CPT = C::CPT, DPT = C::DPT;
    NLA_DYNAMIC_SMEM(float, smem);
    float* Qs = smem;           // [BO][LD]
    float* dOs = Qs + BO * LD;  // [BO][LD]
    float* Ks = dOs + BO * LD;  // [BI][LD]
    float* Vs = Ks + BI * LD;   // [BI][LD]
    float* dSs = Vs + BI * LD;  // [BO][LP]
    const int nqt = (nt + BO - 1) / BO;
    if ((int)blockIdx.x >= nqt || (int)blockIdx.y >= nh || (int)blockIdx.z >= nb) return;
    const int qt = nqt - 1 - (int)blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int g = h / (nh / nkv);
    const int tx = threadIdx.x & 7, ty = threadIdx.x >> 3;
    const int q0 = qt * BO;
    const float scale = 1.0f / sqrtf((float)hs), sl2 = scale * ATTN_LOG2E;
    const long long qstr = (long long)nh * hs, kstr = (long long)nkv * hs;
    const long long qoff = (long long)b * nt * qstr + (long long)h * hs;
    const T* kb = k + (long long)b * nt * kstr + (long long)g * hs;
    const T* vb = v + (long long)b * nt * kstr + (long long)g * hs;

    attn_load_tile<BO, HSB>(Qs, q + qoff, qstr, q0, nt, hs);
    attn_load_tile<BO, HSB>(dOs, dout + qoff, qstr, q0, nt, hs);
    float lse2[4], Dr[4], acc[4][DPT];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int qi = q0 + ty * 4 + r;
        const long long li = ((long long)b * nh + h) * nt + qi;
        lse2[r] = qi < nt ? lse[li] * ATTN_LOG2E : INFINITY;  // rows past T: P = 0
        Dr[r] = qi < nt ? D[li] : 0.0f;
#pragma unroll
        for (int c = 0; c < DPT; ++c) acc[r][c] = 0.0f;
    }
    const int nkt = (min(nt, q0 + BO) + BI - 1) / BI;
    for (int kt = 0; kt < nkt; ++kt) {
        const int k0 = kt * BI;
        __syncthreads();
        attn_load_tile<BI, HSB>(Ks, kb, kstr, k0, nt, hs);
        attn_load_tile<BI, HSB>(Vs, vb, kstr, k0, nt, hs);
        __syncthreads();
        float s[4][CPT], dp[4][CPT];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < CPT; ++c) s[r][c] = dp[r][c] = 0.0f;
#pragma unroll 2
        for (int d = 0; d < HSB; ++d) {
            float a[4], ao[4], bk[CPT], bv[CPT];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                a[r] = Qs[(ty * 4 + r) * LD + d];
                ao[r] = dOs[(ty * 4 + r) * LD + d];
            }
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
                bk[c] = Ks[(tx + 8 * c) * LD + d];
                bv[c] = Vs[(tx + 8 * c) * LD + d];
            }
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < CPT; ++c) {
                    s[r][c] = fmaf(a[r], bk[c], s[r][c]);
                    dp[r][c] = fmaf(ao[r], bv[c], dp[r][c]);
                }
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int qi = q0 + ty * 4 + r;
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
                const float p = k0 + tx + 8 * c <= qi ? exp2f(s[r][c] * sl2 - lse2[r]) : 0.0f;
                dSs[(ty * 4 + r) * LP + tx + 8 * c] = p * (dp[r][c] - Dr[r]);
            }
        }
        __syncthreads();
#pragma unroll 4
        for (int j = 0; j < BI; ++j) {
            float a[4], bk[DPT];
#pragma unroll
            for (int r = 0; r < 4; ++r) a[r] = dSs[(ty * 4 + r) * LP + j];
#pragma unroll
            for (int c = 0; c < DPT; ++c) bk[c] = Ks[j * LD + tx + 8 * c];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < DPT; ++c) acc[r][c] = fmaf(a[r], bk[c], acc[r][c]);
        }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int qi = q0 + ty * 4 + r;
        if (qi < nt) {
            T* o = dq + ((long long)b * nt + qi) * qstr + (long long)h * hs;
#pragma unroll
            for (int c = 0; c < DPT; ++c) {
                const int d = tx + 8 * c;
                if (d < hs) o[d] = nla_from_f32<T>(acc[r][c] * scale);
            }
        }
    }
}

// ---- backward: dk, dv

template <typename T, int HSB>
__device__ __forceinline__ void attn_bwd_dkdv(T* __restrict__ dk, T* __restrict__ dv,
                                              const T* __restrict__ dout,
                                              const T* __restrict__ q, const T* __restrict__ k,
                                              const T* __restrict__ v,
                                              const float* __restrict__ lse,
                                              const float* __restrict__ D, int nb, int nt,
                                              int nh, int nkv, int hs) {
    using C = AttnCfg<HSB>;
    constexpr int BO = ATTN_BO, BI = C::BI, LD = C::LD, LP = C::LP, CPT = C::CPT, DPT = C::DPT;
    NLA_DYNAMIC_SMEM(float, smem);
    float* Ks = smem;           // [BO][LD]  keys of this block
    float* Vs = Ks + BO * LD;   // [BO][LD]
    float* Qs = Vs + BO * LD;   // [BI][LD]  queries of the inner tile
    float* dOs = Qs + BI * LD;  // [BI][LD]
    float* Ps = dOs + BI * LD;  // [BO][LP]  P^T: [key][query]
    float* dSs = Ps + BO * LP;  // [BO][LP]  dS^T
    float* Ls = dSs + BO * LP;  // [BI]      lse * log2(e) of the inner queries (inf past T)
    float* Ds = Ls + BI;        // [BI]
    const int nkt = (nt + BO - 1) / BO;
    if ((int)blockIdx.x >= nkt || (int)blockIdx.y >= nkv || (int)blockIdx.z >= nb) return;
    const int g = blockIdx.y, b = blockIdx.z, k0 = (int)blockIdx.x * BO;
    const int group = nh / nkv;
    const int tx = threadIdx.x & 7, ty = threadIdx.x >> 3;
    const float scale = 1.0f / sqrtf((float)hs), sl2 = scale * ATTN_LOG2E;
    const long long qstr = (long long)nh * hs, kstr = (long long)nkv * hs;
    const long long koff = (long long)b * nt * kstr + (long long)g * hs;

    attn_load_tile<BO, HSB>(Ks, k + koff, kstr, k0, nt, hs);
    attn_load_tile<BO, HSB>(Vs, v + koff, kstr, k0, nt, hs);
    float dK[4][DPT], dV[4][DPT];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < DPT; ++c) dK[r][c] = dV[r][c] = 0.0f;
    constexpr int UI = HSB <= 32 ? 4 : 2;  // unroll of the dK/dV update (fits the registers)
    (void)UI;                              // (g++ ignores the pragma)
    const int nit = (nt + BI - 1) / BI;
    for (int hq = 0; hq < group; ++hq) {
        const int h = g * group + hq;
        const long long qoff = (long long)b * nt * qstr + (long long)h * hs;
        const long long loff = ((long long)b * nh + h) * nt;
        // queries i >= k0 only (causal): inner tiles from the one holding k0
        for (int it = k0 / BI; it < nit; ++it) {
            const int i0 = it * BI;
            __syncthreads();
            attn_load_tile<BI, HSB>(Qs, q + qoff, qstr, i0, nt, hs);
            attn_load_tile<BI, HSB>(dOs, dout + qoff, qstr, i0, nt, hs);
            if ((int)threadIdx.x < BI) {
                const int i = i0 + threadIdx.x;
                Ls[threadIdx.x] = i < nt ? lse[loff + i] * ATTN_LOG2E : INFINITY;
                Ds[threadIdx.x] = i < nt ? D[loff + i] : 0.0f;
            }
            __syncthreads();
            float st[4][CPT], dpt[4][CPT];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < CPT; ++c) st[r][c] = dpt[r][c] = 0.0f;
#pragma unroll 2
            for (int d = 0; d < HSB; ++d) {
                float ak[4], av[4], bq[CPT], bo[CPT];
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    ak[r] = Ks[(ty * 4 + r) * LD + d];
                    av[r] = Vs[(ty * 4 + r) * LD + d];
                }
#pragma unroll
                for (int c = 0; c < CPT; ++c) {
                    bq[c] = Qs[(tx + 8 * c) * LD + d];
                    bo[c] = dOs[(tx + 8 * c) * LD + d];
                }
#pragma unroll
                for (int r = 0; r < 4; ++r)
#pragma unroll
                    for (int c = 0; c < CPT; ++c) {
                        st[r][c] = fmaf(ak[r], bq[c], st[r][c]);
                        dpt[r][c] = fmaf(av[r], bo[c], dpt[r][c]);
                    }
            }
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int kj = k0 + ty * 4 + r;
#pragma unroll
                for (int c = 0; c < CPT; ++c) {
                    const int ic = tx + 8 * c;
                    const float p = kj <= i0 + ic ? exp2f(st[r][c] * sl2 - Ls[ic]) : 0.0f;
                    Ps[(ty * 4 + r) * LP + ic] = p;
                    dSs[(ty * 4 + r) * LP + ic] = p * (dpt[r][c] - Ds[ic]);
                }
            }
            __syncthreads();
#pragma unroll UI
            for (int i = 0; i < BI; ++i) {
                float ap[4], as[4], bo[DPT], bq[DPT];
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    ap[r] = Ps[(ty * 4 + r) * LP + i];
                    as[r] = dSs[(ty * 4 + r) * LP + i];
                }
#pragma unroll
                for (int c = 0; c < DPT; ++c) {
                    bo[c] = dOs[i * LD + tx + 8 * c];
                    bq[c] = Qs[i * LD + tx + 8 * c];
                }
#pragma unroll
                for (int r = 0; r < 4; ++r)
#pragma unroll
                    for (int c = 0; c < DPT; ++c) {
                        dV[r][c] = fmaf(ap[r], bo[c], dV[r][c]);
                        dK[r][c] = fmaf(as[r], bq[c], dK[r][c]);
                    }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int kj = k0 + ty * 4 + r;
        if (kj < nt) {
            const long long o = ((long long)b * nt + kj) * kstr + (long long)g * hs;
#pragma unroll
            for (int c = 0; c < DPT; ++c) {
                const int d = tx + 8 * c;
                if (d < hs) {
                    dk[o + d] = nla_from_f32<T>(dK[r][c] * scale);
                    dv[o + d] = nla_from_f32<T>(dV[r][c]);
                }
            }
        }
    }
}

// ---- backward, bf16: tensor cores
//
// attn_bwd_dq_tc and attn_bwd_dkdv_tc: the algorithm of attn_bwd_dq / attn_bwd_dkdv with the
// tile products on tensor cores, tiles in shared memory as bf16 (rows of HSB + 8), their
// fragments loaded by ldmatrix (attn_frag_a; B fragments two n-tiles at a time: attn_frag_bt2,
// and transposed attn_frag_b2), the score and gradient tiles in mma fragments (a lane holds
// rows gr and gr + 8 of its warp's 16, two columns of each 8-wide n-tile):
//   dq:   per warp 16 query rows; per key tile (BK = 64, 32 for HSB = 128): S = Q K^T and
//         dP = dO V^T, dS = P (dP - D) in the fragments, dQ += dS K with dS rounded to bf16.
//   dkdv: per warp 16 keys; per query head of the group and query tile (BQ = 64, 32 for
//         HSB = 128) at or after the key tile: S^T = K Q^T and dP^T = V dO^T, P^T and
//         dS^T = P^T (dP^T - D) in the fragments, dV += P^T dO and dK += dS^T Q with P^T and
//         dS^T rounded to bf16. lse and D of the query tile in shared memory (f32).
// The rounding of P and dS to bf16 (the tensor cores' input) moves each gradient by at most
// 2^-9 of the sum of its terms' magnitudes, on top of the stored result's rounding.
// Both copy the next tile's pair (dq: K and V; dkdv: Q and dO) into a second buffer with
// cp.async while the current one is used, as the forward does; dkdv loads the next step's lse
// and D into registers meanwhile and stores them after the current step's products.
// Shared memory (bytes), LDS = HSB + 8:
//   dq    2 * (2 * 64 + 4 * BK) * LDS                 16: 18432  32: 30720  64: 55296  128: 69632
//   dkdv  2 * (2 * 64 + 4 * BQ) * LDS + 16 * BQ       16: 19456  32: 31744  64: 56320  128: 70144

template <int HSB>
__device__ __forceinline__ void attn_bwd_dq_tc(nla_bf16* __restrict__ dq,
                                               const nla_bf16* __restrict__ dout,
                                               const nla_bf16* __restrict__ q,
                                               const nla_bf16* __restrict__ k,
                                               const nla_bf16* __restrict__ v,
                                               const float* __restrict__ lse,
                                               const float* __restrict__ D, int nb, int nt, int nh,
                                               int nkv, int hs) {
    constexpr int BO = ATTN_BO, BK = HSB >= 128 ? 32 : 64, LDS = HSB + 8;
    constexpr int KS = HSB / 16, NS = BK / 8, NO = HSB / 8;
    NLA_DYNAMIC_SMEM(nla_bf16, smem);
    const nla_bf16* Qs = smem;             // [BO][LDS]
    const nla_bf16* dOs = Qs + BO * LDS;   // [BO][LDS]
    nla_bf16* const kv = smem + 2 * BO * LDS;  // buffer j: K [BK][LDS] at 2 j BK LDS, then V
    const int nqt = (nt + BO - 1) / BO;
    if ((int)blockIdx.x >= nqt || (int)blockIdx.y >= nh || (int)blockIdx.z >= nb) return;
    const int qt = nqt - 1 - (int)blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int g = h / (nh / nkv);
    const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    const int gr = lane >> 2, tc = lane & 3, w0 = warp * 16;
    const int q0 = qt * BO;
    const int row[2] = {q0 + w0 + gr, q0 + w0 + gr + 8};
    const float scale = 1.0f / sqrtf((float)hs), sl2 = scale * ATTN_LOG2E;
    const long long qstr = (long long)nh * hs, kstr = (long long)nkv * hs;
    const long long qoff = (long long)b * nt * qstr + (long long)h * hs;
    const nla_bf16* kb = k + (long long)b * nt * kstr + (long long)g * hs;
    const nla_bf16* vb = v + (long long)b * nt * kstr + (long long)g * hs;

    const int nkt = (min(nt, q0 + BO) + BK - 1) / BK;
    attn_load_pair_async<BO, HSB>(smem, q + qoff, dout + qoff, qstr, q0, nt, hs);
    attn_load_pair_async<BK, HSB>(kv, kb, vb, kstr, 0, nt, hs);
    nla_cp_async_commit();
    float lse2[2], Dr[2], acc[NO][4];
    NLA_UNROLL
    for (int r = 0; r < 2; ++r) {
        const long long li = ((long long)b * nh + h) * nt + row[r];
        lse2[r] = row[r] < nt ? lse[li] * ATTN_LOG2E : INFINITY;  // rows past T: P = 0
        Dr[r] = row[r] < nt ? D[li] : 0.0f;
    }
    NLA_UNROLL
    for (int n = 0; n < NO; ++n)
        NLA_UNROLL
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
    for (int kt = 0; kt < nkt; ++kt) {
        const int k0 = kt * BK;
        const nla_bf16* Ks = kv + (kt & 1) * 2 * BK * LDS;  // [BK][LDS]
        const nla_bf16* Vs = Ks + BK * LDS;                   // [BK][LDS]
        if (kt + 1 < nkt)  // into the other buffer, whose readers passed the last barrier
            attn_load_pair_async<BK, HSB>(kv + ((kt + 1) & 1) * 2 * BK * LDS, kb, vb, kstr,
                                          k0 + BK, nt, hs);
        nla_cp_async_commit();
        nla_cp_async_wait<1>();  // this thread's copies of tile kt (and Q, dO) have landed
        __syncthreads();         // and every thread's
        float s[NS][4], dp[NS][4];
        NLA_UNROLL
        for (int n = 0; n < NS; ++n)
            NLA_UNROLL
            for (int i = 0; i < 4; ++i) s[n][i] = dp[n][i] = 0.0f;
        NLA_UNROLL
        for (int ks = 0; ks < KS; ++ks) {
            uint32_t aq[4], ao[4];
            attn_frag_a(aq, Qs, LDS, w0, ks * 16, lane);
            attn_frag_a(ao, dOs, LDS, w0, ks * 16, lane);
            NLA_UNROLL
            for (int n = 0; n < NS; n += 2) {
                uint32_t bk[4], bv[4];
                attn_frag_bt2(bk, Ks, LDS, ks * 16, n * 8, lane);
                attn_frag_bt2(bv, Vs, LDS, ks * 16, n * 8, lane);
                nla_mma_bf16_16816(s[n], aq, bk);
                nla_mma_bf16_16816(s[n + 1], aq, bk + 2);
                nla_mma_bf16_16816(dp[n], ao, bv);
                nla_mma_bf16_16816(dp[n + 1], ao, bv + 2);
            }
        }
        // dS = P (dP - D), into s
        NLA_UNROLL
        for (int n = 0; n < NS; ++n)
            NLA_UNROLL
            for (int i = 0; i < 4; ++i) {
                const int key = k0 + n * 8 + 2 * tc + (i & 1), r = i >> 1;
                const float p = key <= row[r] ? exp2f(s[n][i] * sl2 - lse2[r]) : 0.0f;
                s[n][i] = p * (dp[n][i] - Dr[r]);
            }
        // dQ += dS K
        NLA_UNROLL
        for (int kk = 0; kk < BK / 16; ++kk) {
            uint32_t da[4];
            attn_c_to_a(da, s[2 * kk], s[2 * kk + 1]);
            NLA_UNROLL
            for (int n = 0; n < NO; n += 2) {
                uint32_t bk[4];
                attn_frag_b2(bk, Ks, LDS, kk * 16, n * 8, lane);
                nla_mma_bf16_16816(acc[n], da, bk);
                nla_mma_bf16_16816(acc[n + 1], da, bk + 2);
            }
        }
        __syncthreads();  // every warp is done with this buffer before tile kt + 2 refills it
    }
    NLA_UNROLL
    for (int r = 0; r < 2; ++r) {
        if (row[r] >= nt) continue;
        nla_bf16* o = dq + ((long long)b * nt + row[r]) * qstr + (long long)h * hs;
        NLA_UNROLL
        for (int n = 0; n < NO; ++n)
            NLA_UNROLL
            for (int i = 0; i < 2; ++i) {
                const int d = n * 8 + 2 * tc + i;
                if (d < hs) o[d] = nla_from_f32<nla_bf16>(acc[n][2 * r + i] * scale);
            }
    }
}

template <int HSB>
__device__ __forceinline__ void attn_bwd_dkdv_tc(nla_bf16* __restrict__ dk,
                                                 nla_bf16* __restrict__ dv,
                                                 const nla_bf16* __restrict__ dout,
                                                 const nla_bf16* __restrict__ q,
                                                 const nla_bf16* __restrict__ k,
                                                 const nla_bf16* __restrict__ v,
                                                 const float* __restrict__ lse,
                                                 const float* __restrict__ D, int nb, int nt,
                                                 int nh, int nkv, int hs) {
    constexpr int BKEY = ATTN_BO, BQ = HSB >= 128 ? 32 : 64, LDS = HSB + 8;
    constexpr int KS = HSB / 16, NS = BQ / 8, NO = HSB / 8;
    NLA_DYNAMIC_SMEM(nla_bf16, smem);
    const nla_bf16* Ks = smem;               // [BKEY][LDS]
    const nla_bf16* Vs = Ks + BKEY * LDS;    // [BKEY][LDS]
    nla_bf16* const qo = smem + 2 * BKEY * LDS;  // buffer j: Q [BQ][LDS] at 2 j BQ LDS, then dO
    // buffer j: lse2 [BQ] at 2 j BQ, then D [BQ]
    float* const lsebuf = reinterpret_cast<float*>(qo + 4 * BQ * LDS);
    const int nkt = (nt + BKEY - 1) / BKEY;
    if ((int)blockIdx.x >= nkt || (int)blockIdx.y >= nkv || (int)blockIdx.z >= nb) return;
    const int kt = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    const int grp = nh / nkv;
    const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    const int gr = lane >> 2, tc = lane & 3, w0 = warp * 16;
    const int key0 = kt * BKEY;
    const int key_lo = key0 + w0 + gr, key_hi = key_lo + 8;  // this lane's keys
    const float scale = 1.0f / sqrtf((float)hs), sl2 = scale * ATTN_LOG2E;
    const long long qstr = (long long)nh * hs, kstr = (long long)nkv * hs;
    const long long koff = (long long)b * nt * kstr + (long long)g * hs;

    // Steps it = 0 .. grp * nq - 1 over the query heads of the group (h = g grp + it / nq) and,
    // for each, the query tiles at or after the key tile (q0 = (qt0 + it % nq) BQ). Step it + 1's
    // Q and dO are copied in (cp.async) into the other buffer while step it is used; its lse2
    // and D (thread r < BQ: query row r) are loaded into registers then, and stored into the
    // other buffer after step it's products.
    const int qt0 = key0 / BQ, nq = (nt + BQ - 1) / BQ - qt0, nsteps = grp * nq;
    const int r_ld = (int)threadIdx.x;  // the query row whose lse2 and D this thread loads
    static_assert(BQ <= ATTN_NT, "one lse2, D row per thread");
    float l2_next = INFINITY, d_next = 0.0f;  // step it + 1's
    auto issue_step = [&](int it) {  // Q, dO copies into buffer it & 1; lse2, D into registers
        const int h = g * grp + it / nq, q0 = (qt0 + it % nq) * BQ, qi = q0 + r_ld;
        const long long qoff = (long long)b * nt * qstr + (long long)h * hs;
        attn_load_pair_async<BQ, HSB>(qo + (it & 1) * 2 * BQ * LDS, q + qoff, dout + qoff, qstr,
                                      q0, nt, hs);
        const long long li = ((long long)b * nh + h) * nt + qi;
        l2_next = r_ld < BQ && qi < nt ? lse[li] * ATTN_LOG2E : INFINITY;  // past T: P = 0
        d_next = r_ld < BQ && qi < nt ? D[li] : 0.0f;
    };
    auto store_lse_d = [&](int it) {  // the registers into buffer it & 1
        if (r_ld < BQ) {
            float* l2 = lsebuf + (it & 1) * 2 * BQ;
            l2[r_ld] = l2_next;
            l2[BQ + r_ld] = d_next;
        }
    };
    attn_load_pair_async<BKEY, HSB>(smem, k + koff, v + koff, kstr, key0, nt, hs);
    issue_step(0);
    nla_cp_async_commit();
    store_lse_d(0);
    float dK[NO][4], dV[NO][4];
    NLA_UNROLL
    for (int n = 0; n < NO; ++n)
        NLA_UNROLL
        for (int i = 0; i < 4; ++i) dK[n][i] = dV[n][i] = 0.0f;
    for (int it = 0; it < nsteps; ++it) {
        {
            const int q0 = (qt0 + it % nq) * BQ;
            const nla_bf16* Qs = qo + (it & 1) * 2 * BQ * LDS;  // [BQ][LDS]
            const nla_bf16* dOs = Qs + BQ * LDS;                // [BQ][LDS]
            const float* lse2s = lsebuf + (it & 1) * 2 * BQ;    // [BQ]
            const float* Ds = lse2s + BQ;                       // [BQ]
            if (it + 1 < nsteps) issue_step(it + 1);  // the other buffer: its readers are done
            nla_cp_async_commit();
            nla_cp_async_wait<1>();  // this thread's copies of step it (and K, V) have landed
            __syncthreads();         // and every thread's, and lse2 and D stored
            float s[NS][4], dp[NS][4];
            NLA_UNROLL
            for (int n = 0; n < NS; ++n)
                NLA_UNROLL
                for (int i = 0; i < 4; ++i) s[n][i] = dp[n][i] = 0.0f;
            // S^T = K Q^T, dP^T = V dO^T (16 keys x BQ queries per warp)
            NLA_UNROLL
            for (int ks = 0; ks < KS; ++ks) {
                uint32_t ak[4], av[4];
                attn_frag_a(ak, Ks, LDS, w0, ks * 16, lane);
                attn_frag_a(av, Vs, LDS, w0, ks * 16, lane);
                NLA_UNROLL
                for (int n = 0; n < NS; n += 2) {
                    uint32_t bq[4], bo[4];
                    attn_frag_bt2(bq, Qs, LDS, ks * 16, n * 8, lane);
                    attn_frag_bt2(bo, dOs, LDS, ks * 16, n * 8, lane);
                    nla_mma_bf16_16816(s[n], ak, bq);
                    nla_mma_bf16_16816(s[n + 1], ak, bq + 2);
                    nla_mma_bf16_16816(dp[n], av, bo);
                    nla_mma_bf16_16816(dp[n + 1], av, bo + 2);
                }
            }
            // P^T into s, dS^T = P^T (dP^T - D) into dp
            NLA_UNROLL
            for (int n = 0; n < NS; ++n)
                NLA_UNROLL
                for (int i = 0; i < 4; ++i) {
                    const int c = n * 8 + 2 * tc + (i & 1), qi = q0 + c;
                    const float p =
                        qi >= (i < 2 ? key_lo : key_hi) ? exp2f(s[n][i] * sl2 - lse2s[c]) : 0.0f;
                    s[n][i] = p;
                    dp[n][i] = p * (dp[n][i] - Ds[c]);
                }
            // dV += P^T dO, dK += dS^T Q
            NLA_UNROLL
            for (int kk = 0; kk < BQ / 16; ++kk) {
                uint32_t pa[4], da[4];
                attn_c_to_a(pa, s[2 * kk], s[2 * kk + 1]);
                attn_c_to_a(da, dp[2 * kk], dp[2 * kk + 1]);
                NLA_UNROLL
                for (int n = 0; n < NO; n += 2) {
                    uint32_t bo[4], bq[4];
                    attn_frag_b2(bo, dOs, LDS, kk * 16, n * 8, lane);
                    attn_frag_b2(bq, Qs, LDS, kk * 16, n * 8, lane);
                    nla_mma_bf16_16816(dV[n], pa, bo);
                    nla_mma_bf16_16816(dV[n + 1], pa, bo + 2);
                    nla_mma_bf16_16816(dK[n], da, bq);
                    nla_mma_bf16_16816(dK[n + 1], da, bq + 2);
                }
            }
        }
        if (it + 1 < nsteps) store_lse_d(it + 1);  // that buffer's readers are done (step it - 1)
        __syncthreads();  // every warp is done with this buffer before step it + 2 refills it
    }
    NLA_UNROLL
    for (int r = 0; r < 2; ++r) {
        const int kr = r == 0 ? key_lo : key_hi;
        if (kr >= nt) continue;
        const long long o = ((long long)b * nt + kr) * kstr + (long long)g * hs;
        NLA_UNROLL
        for (int n = 0; n < NO; ++n)
            NLA_UNROLL
            for (int i = 0; i < 2; ++i) {
                const int d = n * 8 + 2 * tc + i;
                if (d < hs) {
                    dk[o + d] = nla_from_f32<nla_bf16>(dK[n][2 * r + i] * scale);
                    dv[o + d] = nla_from_f32<nla_bf16>(dV[n][2 * r + i]);
                }
            }
    }
}

// The backward of each storage type: f32 on the SIMT cores, bf16 on tensor cores.
template <typename T, int HSB> struct AttnBwd {
    static __device__ __forceinline__ void dq(T* dq, const T* dout, const T* q, const T* k,
                                              const T* v, const float* lse, const float* D, int b,
                                              int t, int nh, int nkv, int hs) {
        attn_bwd_dq<T, HSB>(dq, dout, q, k, v, lse, D, b, t, nh, nkv, hs);
    }
    static __device__ __forceinline__ void dkdv(T* dk, T* dv, const T* dout, const T* q,
                                                const T* k, const T* v, const float* lse,
                                                const float* D, int b, int t, int nh, int nkv,
                                                int hs) {
        attn_bwd_dkdv<T, HSB>(dk, dv, dout, q, k, v, lse, D, b, t, nh, nkv, hs);
    }
};
template <int HSB> struct AttnBwd<nla_bf16, HSB> {
    static __device__ __forceinline__ void dq(nla_bf16* dq, const nla_bf16* dout,
                                              const nla_bf16* q, const nla_bf16* k,
                                              const nla_bf16* v, const float* lse, const float* D,
                                              int b, int t, int nh, int nkv, int hs) {
        attn_bwd_dq_tc<HSB>(dq, dout, q, k, v, lse, D, b, t, nh, nkv, hs);
    }
    static __device__ __forceinline__ void dkdv(nla_bf16* dk, nla_bf16* dv, const nla_bf16* dout,
                                                const nla_bf16* q, const nla_bf16* k,
                                                const nla_bf16* v, const float* lse,
                                                const float* D, int b, int t, int nh, int nkv,
                                                int hs) {
        attn_bwd_dkdv_tc<HSB>(dk, dv, dout, q, k, v, lse, D, b, t, nh, nkv, hs);
    }
};

// ---- symbols

#define ATTN_FWD(NAME, T, HSB, MT)                                                                 \
    extern "C" __global__ void __launch_bounds__(ATTN_NT, (AttnFwd<T, HSB, MT>::BLOCKS)) NAME(     \
        T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ q,                     \
        const T* __restrict__ k, const T* __restrict__ v, int b, int t, int nh, int nkv, int hs) { \
        AttnFwd<T, HSB, MT>::run(out, lse, q, k, v, b, t, nh, nkv, hs);                            \
    }


#define ATTN_KERNELS_HS(S, T, HSB)                                                                 \
    ATTN_FWD(attention_fwd_##S##_hs##HSB, T, HSB, 1)                                               \
    extern "C" __global__ void __launch_bounds__(ATTN_NT, 1) attention_bwd_dq_##S##_hs##HSB(      \
        T* __restrict__ dq, const T* __restrict__ dout, const T* __restrict__ q,                   \
        const T* __restrict__ k, const T* __restrict__ v, const float* __restrict__ lse,           \
        const float* __restrict__ D, int b, int t, int nh, int nkv, int hs) {                      \
        AttnBwd<T, HSB>::dq(dq, dout, q, k, v, lse, D, b, t, nh, nkv, hs);                         \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(ATTN_NT, 1) attention_bwd_dkdv_##S##_hs##HSB(    \
        T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ dout,                        \
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,                 \
        const float* __restrict__ lse, const float* __restrict__ D, int b, int t, int nh, int nkv, \
        int hs) {                                                                                  \
        AttnBwd<T, HSB>::dkdv(dk, dv, dout, q, k, v, lse, D, b, t, nh, nkv, hs);                   \
    }

#define ATTN_KERNELS(S, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK) attention_bwd_dot_##S(            \
        float* __restrict__ D, const T* __restrict__ dout, const T* __restrict__ out, int b,      \
        int t, int nh, int hs) {                                                                  \
        attn_bwd_dot<T>(D, dout, out, b, t, nh, hs);                                              \
    }                                                                                             \
    ATTN_KERNELS_HS(S, T, 16)                                                                     \
    ATTN_KERNELS_HS(S, T, 32)                                                                     \
    ATTN_KERNELS_HS(S, T, 64)                                                                     \
    ATTN_KERNELS_HS(S, T, 128)

ATTN_KERNELS(f32, float)
ATTN_KERNELS(bf16, nla_bf16)
// the bf16 forward with 128 query rows per block (MT = 2): grid (ceil(T/128), NH, B)
ATTN_FWD(attention_fwd_bf16_hs64_bo128, nla_bf16, 64, 2)
ATTN_FWD(attention_fwd_bf16_hs128_bo128, nla_bf16, 128, 2)

#ifdef NLA_EMU
NLA_EMU_KERNEL(attention_bwd_dot_f32);
NLA_EMU_KERNEL(attention_bwd_dot_bf16);
NLA_EMU_KERNEL(attention_fwd_f32_hs16);
NLA_EMU_KERNEL(attention_fwd_f32_hs32);
NLA_EMU_KERNEL(attention_fwd_f32_hs64);
NLA_EMU_KERNEL(attention_fwd_f32_hs128);
NLA_EMU_KERNEL(attention_fwd_bf16_hs16);
NLA_EMU_KERNEL(attention_fwd_bf16_hs32);
NLA_EMU_KERNEL(attention_fwd_bf16_hs64);
NLA_EMU_KERNEL(attention_fwd_bf16_hs128);
NLA_EMU_KERNEL(attention_fwd_bf16_hs64_bo128);
NLA_EMU_KERNEL(attention_fwd_bf16_hs128_bo128);
NLA_EMU_KERNEL(attention_bwd_dq_f32_hs16);
NLA_EMU_KERNEL(attention_bwd_dq_f32_hs32);
NLA_EMU_KERNEL(attention_bwd_dq_f32_hs64);
NLA_EMU_KERNEL(attention_bwd_dq_f32_hs128);
NLA_EMU_KERNEL(attention_bwd_dq_bf16_hs16);
NLA_EMU_KERNEL(attention_bwd_dq_bf16_hs32);
NLA_EMU_KERNEL(attention_bwd_dq_bf16_hs64);
NLA_EMU_KERNEL(attention_bwd_dq_bf16_hs128);
NLA_EMU_KERNEL(attention_bwd_dkdv_f32_hs16);
NLA_EMU_KERNEL(attention_bwd_dkdv_f32_hs32);
NLA_EMU_KERNEL(attention_bwd_dkdv_f32_hs64);
NLA_EMU_KERNEL(attention_bwd_dkdv_f32_hs128);
NLA_EMU_KERNEL(attention_bwd_dkdv_bf16_hs16);
NLA_EMU_KERNEL(attention_bwd_dkdv_bf16_hs32);
NLA_EMU_KERNEL(attention_bwd_dkdv_bf16_hs64);
NLA_EMU_KERNEL(attention_bwd_dkdv_bf16_hs128);
#endif
