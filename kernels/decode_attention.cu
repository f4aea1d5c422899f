// decode_attention: causal grouped-query attention of new query rows against the KV cache
// (prefill: TQ = prompt length; decode: TQ = 1), with left-padded rows and split-K.
//
// Math    (Device::decode_attention_fwd; CPU twin src/device/cpu/decode_attention.rs)
//         query t of row b sits at absolute position p = pos0 + t and reads cache positions
//         j in [starts[b], p]; query head h reads KV head g = h / (NH/NKV); scale = 1/sqrt(hs):
//         out[b,t,h] = (sum_j e^(s_j - m) v_j) * (1 / sum_j e^(s_j - m)),  s_j = scale q . k_j  (=)
//         A query before its row's start (p < starts[b], left padding) reads no key: out = 0.
//         Softmax in base 2 as in attention.cu: s2 = (q . k) * (scale * log2(e)), exp2f, online
//         max/sum in f32 over key tiles.
//         Split-K (nsplit > 1): split s of a query covers keys [start + s*c, start + (s+1)*c) ∩
//         [start, p], c = ceil(L / nsplit), L = p - start + 1, and writes its unnormalised
//         partial o_s (=), its max m_s (log2 units) and sum l_s (=) to scratch; the combine
//         kernel merges: M = max_s m_s, out = (sum_s o_s 2^(m_s - M)) * (1 / sum_s l_s 2^(m_s - M))
//         (=), 0 where every l_s = 0. nsplit = 1 writes out directly (scratch unused, may be
//         null).
// Position pos0: the argument, or where `pos` is not null pos[0] (a device word the host writes
//         between steps: the launch is then the same at every position, as a replayed CUDA
//         graph needs; the launcher then sizes the split for TMAX).
// Shapes  q, out [B,TQ,NH,HS]; kcache, vcache [B,TMAX,NKV,HS] (positions < pos0 + TQ written);
//         starts [B] (< TMAX); pos0 + TQ <= TMAX (a launch whose pos0 breaks this writes 0). Scratch for nsplit > 1, R = B*TQ*NH rows:
//         part_o [nsplit][R][HS], part_ml [nsplit][R][2] (m, l).
// Dtypes  q, kcache, vcache, out: T; starts u32; part_o, part_ml f32; sums in f32.
// Head    template bucket HSB in {16, 32, 64, 128}, any runtime hs <= HSB (zero padding, as in
// size    attention.cu): the launcher picks the smallest bucket >= hs.
// Threads decode_attention_fwd: one block of 128 threads (4 warps) per (split, query row t with
//         up to 8 query heads of one KV group, b): blockIdx.x = split, blockIdx.y = (t * NKV +
//         g) * nhc + hc, blockIdx.z = b, where nhc = ceil(G / 8), G = NH/NKV, and block hc
//         takes heads g*G + 8 hc + (0..7) of the group. All heads of a group read each K/V tile
//         once (GQA shares the cache traffic). Per tile of 32 keys:
//           - K tile -> shared memory as f32 [32][HSB + 1] (coalesced, odd stride), and each
//             thread loads its V values straight into registers (V is never staged);
//           - scores: warp w takes heads w and w + 4, lane = key: s = q . k_lane (q broadcast
//             from shared memory), warp max/sum -> online softmax per head, p -> smem;
//           - P V: thread (d = tid % HSB, key subset js = tid / HSB, 128/HSB subsets) keeps
//             acc[head] for its dim over its keys: acc = acc * alpha + sum p v (registers).
//         At the end the 128/HSB subsets are summed in shared memory (fixed order) and the
//         (head, dim) outputs written. 3 barriers per tile.
//         decode_attention_combine: one warp per output row (b, t, h), lanes over dims.
//         Prefill runs the same kernel, one block per query row: O(TQ * L) cache reads, mostly
//         L2 hits (a query-tiled prefill sharing K/V across rows is the next step).
// Launch  decode_attention_fwd: grid (nsplit, TQ * NKV * ceil(G/8), B), block 128, dynamic
//         shared memory 4 * (8 HSB + 32 (HSB + 1) + 8 * 32 + 3 * 8 + 8 * 128) bytes = 7904,
//         10464, 15584, 25824 for HSB = 16, 32, 64, 128. nsplit: 1 when the grid already
//         fills the GPU (B * TQ * NKV * nhc >= 2 * SMs, e.g. batched rollouts), else about
//         ceil(2 * SMs / (B * TQ * NKV * nhc)), at most ceil(Lmax / 32) and 64.
//         decode_attention_combine: any grid (grid-stride over warps), e.g. ceil(R / 4) blocks
//         of 128; only when nsplit > 1.
// Symbols decode_attention_fwd_<f32|bf16>_hs<16|32|64|128>
//           (T* out, float* part_o, float* part_ml, const T* q, const T* kcache,
//            const T* vcache, const uint32_t* starts, const uint32_t* pos, int b, int tq,
//            int tmax, int nh, int nkv, int hs, int pos0, int nsplit)
//         decode_attention_combine_<f32|bf16>
//           (T* out, const float* part_o, const float* part_ml, int rows, int hs, int nsplit)
//
// nla: hot

#include "common.cuh"

#define DEC_NT 128  // threads per block
#define DEC_BK 32   // keys per tile
#define DEC_HG 8    // query heads per block (two per warp)
#define DEC_LOG2E 1.4426950408889634f

// One tile of the online softmax of one head, lane = key: s (log2 units, -inf if masked) ->
// p = 2^(s - m') into prow[lane], the rescale 2^(m - m') into *alpha; m, l updated (the same
// in every lane). All lanes must call.
__device__ __forceinline__ void dec_online(float s, float& m, float& l, float* prow, float* alpha,
                                           int lane) {
    const float mn = fmaxf(m, nla_warp_max(s));  // finite: lane 0 holds a key
    const float a = exp2f(m - mn);                // 0 on the first tile (m = -inf)
    const float pr = exp2f(s - mn);               // 0 for masked keys
    l = l * a + nla_warp_sum(pr);
    m = mn;
    prow[lane] = pr;
    if (lane == 0) *alpha = a;
}

template <typename T, int HSB>
__device__ __forceinline__ void dec_fwd(T* __restrict__ out, float* __restrict__ part_o,
                                        float* __restrict__ part_ml, const T* __restrict__ q,
                                        const T* __restrict__ kc, const T* __restrict__ vc,
                                        const uint32_t* __restrict__ starts,
                                        const uint32_t* __restrict__ pos, int nb, int tq,
                                        int tmax, int nh, int nkv, int hs, int pos0,
                                        int nsplit) {
    constexpr int LD = HSB + 1, SUB = DEC_NT / HSB, PER = DEC_BK * HSB / DEC_NT;
    static_assert(DEC_NT % HSB == 0 && PER * SUB == DEC_BK, "head size bucket");
    NLA_DYNAMIC_SMEM(float, smem);
    float* Qs = smem;                // [HG][HSB]
    float* Ks = Qs + DEC_HG * HSB;   // [BK][LD]
    float* Ps = Ks + DEC_BK * LD;    // [HG][BK]
    float* As = Ps + DEC_HG * DEC_BK;  // [HG] the tile's rescale factor per head
    float* Ms = As + DEC_HG;         // [HG]
    float* Ls = Ms + DEC_HG;         // [HG]
    float* Os = Ls + DEC_HG;         // [SUB][HG][HSB] per-subset partial outputs

    const int group = nh / nkv, nhc = (group + DEC_HG - 1) / DEC_HG;
    const int split = blockIdx.x, y = blockIdx.y, b = blockIdx.z;
    const int hc = y % nhc, g = y / nhc % nkv, t = y / (nhc * nkv);
    if (pos) pos0 = (int)pos[0];
    if (split >= nsplit || t >= tq || b >= nb) return;
    // a position whose queries would pass TMAX reads no key: out = 0 (l = 0 for the combine)
    const bool bad = pos0 < 0 || pos0 > tmax - tq;
    const int h0 = g * group + hc * DEC_HG, hn = min(DEC_HG, group - hc * DEC_HG);
    const int p = pos0 + t, start = (int)starts[b];
    const int len = p >= start && !bad ? p - start + 1 : 0;  // keys of this query
    const int chunk = (len + nsplit - 1) / nsplit;
    const int j0 = start + min(len, split * chunk), j1 = start + min(len, (split + 1) * chunk);
    const int tid = threadIdx.x, lane = nla_lane(), warp = nla_warp();
    const int dn = tid % HSB, js = tid / HSB;  // this thread's dim and key subset in P V
    const float sl2 = (1.0f / sqrtf((float)hs)) * DEC_LOG2E;
    const long long kvstr = (long long)nkv * hs;
    const long long kvoff = (long long)b * tmax * kvstr + (long long)g * hs;
    const T* kb = kc + kvoff;
    const T* vb = vc + kvoff;
    const long long row0 = ((long long)b * tq + t) * nh + h0;  // row of head h0 in [B*TQ*NH]

    for (int e = tid; e < DEC_HG * HSB; e += DEC_NT) {
        const int kk = e / HSB, d = e % HSB;
        Qs[e] = kk < hn && d < hs ? nla_f32(q[(row0 + kk) * hs + d]) : 0.0f;
    }
    // online softmax state of heads warp (m0, l0) and warp + 4 (m1, l1), the same in every lane
    float m0 = -INFINITY, l0 = 0.0f, m1 = -INFINITY, l1 = 0.0f;
    float acc[DEC_HG];
#pragma unroll
    for (int kk = 0; kk < DEC_HG; ++kk) acc[kk] = 0.0f;

    for (int j = j0; j < j1; j += DEC_BK) {
        __syncthreads();  // Qs written / the previous tile's readers of Ks, Ps, As done
        float vr[PER];
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int r = js + i * SUB, key = j + r;  // element tid + i * 128 of the tile
            const bool ok = key < j1 && dn < hs;
            Ks[r * LD + dn] = ok ? nla_f32(kb[key * kvstr + dn]) : 0.0f;
            vr[i] = ok ? nla_f32(vb[key * kvstr + dn]) : 0.0f;
        }
        __syncthreads();
        if (warp < hn) {  // warp-uniform
            const float* k = Ks + lane * LD;
            const float* qa = Qs + warp * HSB;
            const float* qb = Qs + (warp + 4) * HSB;  // zeros when warp + 4 >= hn
            float s0 = 0.0f, s1 = 0.0f;
#pragma unroll 8
            for (int d = 0; d < HSB; ++d) {
                const float kd = k[d];
                s0 = fmaf(qa[d], kd, s0);
                s1 = fmaf(qb[d], kd, s1);
            }
            const bool valid = j + lane < j1;  // lane 0 always: every row max is finite
            dec_online(valid ? s0 * sl2 : -INFINITY, m0, l0, Ps + warp * DEC_BK, As + warp, lane);
            if (warp + 4 < hn)  // warp-uniform
                dec_online(valid ? s1 * sl2 : -INFINITY, m1, l1, Ps + (warp + 4) * DEC_BK,
                           As + warp + 4, lane);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < DEC_HG; ++kk) {
            if (kk < hn) {  // block-uniform
                float a = acc[kk] * As[kk];
#pragma unroll
                for (int i = 0; i < PER; ++i) a = fmaf(Ps[kk * DEC_BK + js + i * SUB], vr[i], a);
                acc[kk] = a;
            }
        }
    }
    if (lane == 0) {
        if (warp < hn) {
            Ms[warp] = m0;
            Ls[warp] = l0;
        }
        if (warp + 4 < hn) {
            Ms[warp + 4] = m1;
            Ls[warp + 4] = l1;
        }
    }
#pragma unroll
    for (int kk = 0; kk < DEC_HG; ++kk)
        if (kk < hn) Os[(js * DEC_HG + kk) * HSB + dn] = acc[kk];
    __syncthreads();
    const long long rows = (long long)nb * tq * nh;
    for (int e = tid; e < hn * HSB; e += DEC_NT) {
        const int kk = e / HSB, d = e % HSB;
        if (d >= hs) continue;
        float o = 0.0f;
#pragma unroll
        for (int s = 0; s < SUB; ++s) o += Os[(s * DEC_HG + kk) * HSB + d];
        const long long row = row0 + kk;
        if (nsplit == 1) {
            const float lk = Ls[kk];
            out[row * hs + d] = nla_from_f32<T>(lk > 0.0f ? o * (1.0f / lk) : 0.0f);
        } else {
            const long long pr = (long long)split * rows + row;
            part_o[pr * hs + d] = o;
            if (d == 0) {
                part_ml[pr * 2] = Ms[kk];
                part_ml[pr * 2 + 1] = Ls[kk];
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ void dec_combine(T* __restrict__ out, const float* __restrict__ part_o,
                                            const float* __restrict__ part_ml, int rows, int hs,
                                            int nsplit) {
    const int lane = nla_lane(), nw = nla_warps();
    for (long long row = (long long)blockIdx.x * nw + nla_warp(); row < rows;
         row += (long long)gridDim.x * nw) {
        float mx = -INFINITY;
        for (int s = 0; s < nsplit; ++s) {
            const long long pr = (long long)s * rows + row;
            if (part_ml[pr * 2 + 1] > 0.0f) mx = fmaxf(mx, part_ml[pr * 2]);
        }
        float lsum = 0.0f;
        for (int s = 0; s < nsplit; ++s) {
            const long long pr = (long long)s * rows + row;
            const float ls = part_ml[pr * 2 + 1];
            if (ls > 0.0f) lsum += ls * exp2f(part_ml[pr * 2] - mx);
        }
        const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
        for (int d = lane; d < hs; d += NLA_WARP) {
            float o = 0.0f;
            for (int s = 0; s < nsplit; ++s) {
                const long long pr = (long long)s * rows + row;
                const float ls = part_ml[pr * 2 + 1];
                if (ls > 0.0f) o += part_o[pr * hs + d] * exp2f(part_ml[pr * 2] - mx);
            }
            out[row * hs + d] = nla_from_f32<T>(o * inv);
        }
    }
}

#define DEC_KERNELS_HS(S, T, HSB)                                                                  \
    extern "C" __global__ void __launch_bounds__(DEC_NT, 4) decode_attention_fwd_##S##_hs##HSB(      \
        T* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,              \
        const T* __restrict__ q, const T* __restrict__ kcache, const T* __restrict__ vcache,       \
        const uint32_t* __restrict__ starts, const uint32_t* __restrict__ pos, int b, int tq,      \
        int tmax, int nh, int nkv, int hs, int pos0, int nsplit) {                                 \
        dec_fwd<T, HSB>(out, part_o, part_ml, q, kcache, vcache, starts, pos, b, tq, tmax, nh, nkv,\
                        hs, pos0, nsplit);                                                         \
    }

#define DEC_KERNELS(S, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(NLA_MAX_BLOCK) decode_attention_combine_##S( \
        T* __restrict__ out, const float* __restrict__ part_o,                                 \
        const float* __restrict__ part_ml, int rows, int hs, int nsplit) {                     \
        dec_combine<T>(out, part_o, part_ml, rows, hs, nsplit);                                \
    }                                                                                          \
    DEC_KERNELS_HS(S, T, 16)                                                                   \
    DEC_KERNELS_HS(S, T, 32)                                                                   \
    DEC_KERNELS_HS(S, T, 64)                                                                   \
    DEC_KERNELS_HS(S, T, 128)

DEC_KERNELS(f32, float)
DEC_KERNELS(bf16, nla_bf16)

#ifdef NLA_EMU
NLA_EMU_KERNEL(decode_attention_combine_f32);
NLA_EMU_KERNEL(decode_attention_combine_bf16);
NLA_EMU_KERNEL(decode_attention_fwd_f32_hs16);
NLA_EMU_KERNEL(decode_attention_fwd_f32_hs32);
NLA_EMU_KERNEL(decode_attention_fwd_f32_hs64);
NLA_EMU_KERNEL(decode_attention_fwd_f32_hs128);
NLA_EMU_KERNEL(decode_attention_fwd_bf16_hs16);
NLA_EMU_KERNEL(decode_attention_fwd_bf16_hs32);
NLA_EMU_KERNEL(decode_attention_fwd_bf16_hs64);
NLA_EMU_KERNEL(decode_attention_fwd_bf16_hs128);
#endif
