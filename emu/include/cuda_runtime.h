// Stand-in for <cuda_runtime.h> under the CPU emulator: everything is in cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
