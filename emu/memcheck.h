// The emulator's memory check (internal to emu/; built with the `memcheck` feature, see
// memcheck.cpp): what a GPU would fault on or race on, but the emulator's plain C++ would not.
//
// With the check on, kernels/*.cu are compiled with gcc's -fsanitize=thread instrumentation,
// whose hooks (__tsan_read4, __tsan_write16, __tsan_atomic32_fetch_add, ...) are implemented here
// instead of by the TSan runtime. Every access a kernel makes in the fiber modes is checked for:
// - out of bounds: outside the buffer of every pointer argument of the launch (the Rust side
//   passes each argument's length), where a GPU reads garbage or faults with "illegal address";
// - misalignment: a typed access of 2, 4, 8 or 16 bytes at an address that is not a multiple of
//   its size (a `float4` load from `x + 1`), which a GPU faults on ("misaligned address") and x86
//   does not; shared memory included;
// - uninitialised shared memory: a read of a shared byte that no thread of the block has written
//   since the block started (what the NaN poisoning shows only when the value reaches an output:
//   fmaxf(NaN, x) is x, and an integer or an index is not a NaN);
// - races between blocks: blocks of one launch are unordered on a GPU, but the emulator runs them
//   one after the other, so a race between two blocks is invisible to the fiber modes (a plain
//   `y[0] += x` from every block gives the right sum in any block order) and to ThreadSanitizer
//   (the blocks of its OS-thread mode are ordered by the launch loop). Every byte of global memory
//   gets a shadow cell saying which block wrote it, read it and updated it atomically during the
//   launch; an access that conflicts with another block's (a write against any access, a plain
//   access against an atomic) is a race.
// Races between the threads of one block are ThreadSanitizer's (scripts/tsan-check.sh).
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace nla_emu {
// Defined by the runtime: the CUDA thread running now (linear index in its block), and the end of
// that thread at the problem just found (first() says which): its block fails with an error
// naming it, as a GPU kernel stops at a fault, before the access can corrupt the host's memory.
unsigned current_thread();
[[noreturn]] void memory_fault();
}  // namespace nla_emu

namespace nla_emu::memcheck {

// Whether this build has the check (kernels instrumented, hooks linked in).
bool built();

enum Access : int { READ = 0, WRITE = 1, ATOMIC = 2 };
enum Problem : int { NOTHING = 0, RACE = 1, OUT_OF_BOUNDS = 2, MISALIGNED = 3, UNINITIALIZED = 4 };

// A problem found in a launch.
struct Finding {
    Problem problem = NOTHING;
    std::uintptr_t addr = 0;  // the access (RACE: the first byte in conflict)
    unsigned size = 0;        // bytes of the access
    Access now = READ;        // what the access does
    unsigned block = 0;       // linear block index
    unsigned thread = 0;      // linear thread index in the block
    Access before = READ;     // RACE: what the other block(s) did to that byte earlier
    long other = 0;           // RACE: their block (linear index), or -1: several blocks
};

using Range = std::pair<std::uintptr_t, std::uintptr_t>;  // [lo, hi)

// Starts checking one launch (fiber modes only), forgetting the previous launch's shadow:
// accesses inside `ignore` (fiber stacks, the built-in variables, the packed arguments) are not
// checked, inside `shared` (shared memory) for alignment and reads of unwritten bytes, and
// everywhere else they must lie inside one of `buffers` (the pointer arguments' buffers).
void begin(std::vector<Range> ignore, std::vector<Range> shared, std::vector<Range> buffers);
// The block whose threads run from now on (linear index).
void set_block(unsigned lin);
// Stops checking (also stopped by the first problem found, whose thread then ends through
// memory_fault()).
void end();
// The problem found, if any.
Finding first();

}  // namespace nla_emu::memcheck
