// The inter-block race check of the emulator (internal to emu/; built with the `racecheck`
// feature, see racecheck.cpp).
//
// Blocks of one launch are unordered on a GPU, but the emulator runs them one after the other,
// so a race between two blocks is invisible to the fiber modes (a non-atomic `y[0] += x` from
// every block gives the right sum in any block order) and to ThreadSanitizer (the blocks of its
// OS-thread mode are ordered by the launch loop). With the check on, kernels/*.cu are compiled
// with gcc's -fsanitize=thread instrumentation, whose hooks (__tsan_read4, __tsan_write8,
// __tsan_atomic32_fetch_add, ...) are implemented here instead of by the TSan runtime: every byte
// of memory outside shared memory and the fiber stacks gets a shadow cell saying which block
// wrote it, read it and updated it atomically during the launch. An access that conflicts with
// another block's (a write against any access, a plain access against an atomic) is a race.
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace nla_emu::racecheck {

// Whether this build has the check (kernels instrumented, hooks below linked in).
bool built();

// What a cell records, and what an access is.
enum Kind : int { READ = 0, WRITE = 1, ATOMIC = 2 };

struct Race {
    bool found = false;
    std::uintptr_t addr = 0;  // the first byte in conflict
    unsigned size = 0;        // bytes of the access that found it
    Kind now = READ;          // the access
    unsigned block = 0;       // its block (linear index)
    Kind before = READ;       // what the other block(s) did to that byte earlier in the launch
    long other = 0;           // their block (linear index), or -1: several blocks
};

// Starts recording for one launch (fiber modes only): forgets the previous launch's shadow;
// accesses inside `ignore` ([lo, hi) ranges: shared memory, fiber stacks) are not recorded.
void begin(std::vector<std::pair<std::uintptr_t, std::uintptr_t>> ignore);
// The block whose threads run from now on (linear index).
void set_block(unsigned lin);
// Stops recording (also stopped by the first race found).
void end();
// The first race of the launch, if any.
Race first();

}  // namespace nla_emu::racecheck
