// Shared by every kernel file: dtypes, conversions, warp/block reductions, and the one macro for
// dynamic shared memory. Compiled by nvcc for the GPU, and as C++ against the CPU emulator
// (emu/cuda_emu.h) when NLA_EMU is defined.
#pragma once

#ifdef NLA_EMU
#include "../emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <stdint.h>
#endif

// Dynamic shared memory of a launch, as an array of T: the one place that differs between the
// GPU and the emulator.
#ifdef NLA_EMU
#define NLA_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(nla_emu_dynamic_smem())
#else
#define NLA_DYNAMIC_SMEM(T, name) extern __shared__ __align__(16) unsigned char nla_smem_raw_[]; \
    T* name = reinterpret_cast<T*>(nla_smem_raw_)
#endif
