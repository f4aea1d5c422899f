// Fibers for the emulator: see fiber.h.
#include "fiber.h"

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <signal.h>
#include <sys/mman.h>

namespace nla_emu::fiber {

bool alloc_stack(Stack& s) {
    void* m = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (m == MAP_FAILED) return false;
    if (mprotect(m, kGuardBytes, PROT_NONE) != 0) {
        munmap(m, kGuardBytes + kStackBytes);
        return false;
    }
    s.map = static_cast<char*>(m);
    s.lo = s.map + kGuardBytes;
    s.size = kStackBytes;
    return true;
}

#ifdef NLA_EMU_USE_UCONTEXT

void make(Context& c, Stack& s, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = s.lo;
    c.uc.uc_stack.ss_size = s.size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}

void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#else

// nla_emu_switch(void** save_sp, void* new_sp): pushes the callee-saved registers and the FP
// control state on the current stack, stores the stack pointer, loads the other one, pops the
// same frame there and returns into it.
extern "C" void nla_emu_switch(void** save_sp, void* new_sp);
__asm__(
    ".text\n"
    ".globl nla_emu_switch\n"
    ".hidden nla_emu_switch\n"
    ".type nla_emu_switch,@function\n"
    "nla_emu_switch:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    subq $8, %rsp\n"
    "    stmxcsr (%rsp)\n"
    "    fnstcw 4(%rsp)\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    ldmxcsr (%rsp)\n"
    "    fldcw 4(%rsp)\n"
    "    addq $8, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size nla_emu_switch, .-nla_emu_switch\n");

void make(Context& c, Stack& s, void (*entry)()) {
    uint64_t fpstate = 0;  // the creator's MXCSR (low word) and x87 control word
    __asm__ volatile("stmxcsr %0" : "=m"(*reinterpret_cast<uint32_t*>(&fpstate)));
    __asm__ volatile("fnstcw %0" : "=m"(*(reinterpret_cast<uint16_t*>(&fpstate) + 2)));
    auto top = reinterpret_cast<uintptr_t>(s.lo + s.size) & ~uintptr_t(15);
    auto* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;  // entry's return address slot: entry starts with rsp % 16 == 8, as after a call
    *--sp = reinterpret_cast<uint64_t>(entry);  // popped by `ret`
    for (int i = 0; i < 6; ++i) *--sp = 0;     // rbp rbx r12 r13 r14 r15
    *--sp = fpstate;
    c.sp = sp;
}

void switch_to(Context& from, Context& to) { nla_emu_switch(&from.sp, to.sp); }

#endif

// ---- stack overflow recovery ----

namespace {
__thread __attribute__((tls_model("initial-exec"))) sigjmp_buf* tls_jb = nullptr;
__thread __attribute__((tls_model("initial-exec"))) char* tls_guard_lo = nullptr;
__thread __attribute__((tls_model("initial-exec"))) char* tls_guard_hi = nullptr;
struct sigaction g_prev;

void on_segv(int sig, siginfo_t* si, void* uctx) {
    char* a = static_cast<char*>(si->si_addr);
    if (tls_jb && a >= tls_guard_lo && a < tls_guard_hi) {
        sigjmp_buf* jb = tls_jb;
        tls_jb = nullptr;
        siglongjmp(*jb, 1);
    }
    // Not ours: hand over to whoever was there before (Rust's stack-overflow handler, usually).
    if (g_prev.sa_flags & SA_SIGINFO) {
        g_prev.sa_sigaction(sig, si, uctx);
    } else if (g_prev.sa_handler == SIG_DFL || g_prev.sa_handler == SIG_IGN) {
        signal(sig, SIG_DFL);  // returning re-runs the faulting access: default action
    } else {
        g_prev.sa_handler(sig);
    }
}

// An alternate signal stack for threads that have none, freed when the thread exits.
struct AltStack {
    void* mem = nullptr;
    ~AltStack() {
        if (!mem) return;
        stack_t ss{};
        ss.ss_flags = SS_DISABLE;
        sigaltstack(&ss, nullptr);
        free(mem);
    }
};
thread_local AltStack tls_alt;

bool ensure_altstack() {
    stack_t cur{};
    if (sigaltstack(nullptr, &cur) == 0 && !(cur.ss_flags & SS_DISABLE)) return true;
    constexpr std::size_t kAlt = 64 * 1024;
    void* m = malloc(kAlt);
    if (!m) return false;
    stack_t ss{};
    ss.ss_sp = m;
    ss.ss_size = kAlt;
    if (sigaltstack(&ss, nullptr) != 0) {
        free(m);
        return false;
    }
    tls_alt.mem = m;
    return true;
}
}  // namespace

bool install_guard() {
    static std::once_flag once;
    static bool ok = false;
    std::call_once(once, [] {
        struct sigaction sa{};
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        ok = sigaction(SIGSEGV, &sa, &g_prev) == 0;
    });
    return ok && ensure_altstack();
}

void arm(sigjmp_buf* jb) { tls_jb = jb; }

void watch(const Stack& s) {
    tls_guard_lo = s.map;
    tls_guard_hi = s.lo;
}

void disarm() {
    tls_jb = nullptr;
    tls_guard_lo = tls_guard_hi = nullptr;
}

}  // namespace nla_emu::fiber
