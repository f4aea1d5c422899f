// Fibers for the emulator (internal to emu/): stacks with a guard region, a context switch, and
// the recovery from a stack overflow.
//
// x86_64: a hand-written switch (callee-saved registers, MXCSR and the x87 control word), ~10 ns.
// Elsewhere (or with -DNLA_EMU_UCONTEXT): makecontext/swapcontext, slower (a syscall per switch).
#pragma once
#include <csetjmp>
#include <cstddef>

#if !defined(__x86_64__) || defined(NLA_EMU_UCONTEXT)
#define NLA_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

namespace nla_emu::fiber {

constexpr std::size_t kStackBytes = 256 * 1024;  // a CUDA thread's registers and locals
constexpr std::size_t kGuardBytes = 64 * 1024;   // PROT_NONE, below the stack

struct Stack {
    char* map = nullptr;  // the mapping: guard, then the stack
    char* lo = nullptr;   // lowest usable byte
    std::size_t size = 0;
};

struct Context {
#ifdef NLA_EMU_USE_UCONTEXT
    ucontext_t uc;
#else
    void* sp = nullptr;
#endif
};

// Maps a stack with its guard region; false when the system refuses.
bool alloc_stack(Stack& s);
// Prepares `c` so that the first switch to it calls entry() (which must never return) on `s`.
void make(Context& c, Stack& s, void (*entry)());
// Saves the running context in `from` and resumes `to`.
void switch_to(Context& from, Context& to);

// Stack overflow recovery. install_guard() (once per process, idempotent) installs a SIGSEGV
// handler on an alternate signal stack, and gives the calling thread an alternate stack if it has
// none. While armed on a thread, a fault inside the guard region of `watched` siglongjmps to
// `jb`; any other fault goes to the previous handler.
bool install_guard();
void arm(sigjmp_buf* jb);
void watch(const Stack& s);
void disarm();

}  // namespace nla_emu::fiber
