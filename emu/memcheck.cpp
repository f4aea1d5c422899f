// The memory check (see memcheck.h): gcc's -fsanitize=thread hooks, implemented over the launch's
// argument buffers and a per-launch shadow of every byte of them that the kernel touches.
//
// Compiled without instrumentation itself. Without NLA_EMU_MEMCHECK (the default build, and the
// ThreadSanitizer build, whose runtime owns the __tsan_* symbols) only the no-op control functions
// are built.
//
// Shadow: one Cell per byte, in pages of 4096 cells found through a hash map (with a one-page
// cache: accesses are mostly sequential). A cell holds, per kind of access, the block that made
// it: NONE, a block's linear index, or SEVERAL. Blocks run one at a time on the launching thread,
// so nothing needs a lock; the fiber modes are the only ones that check (the OS-thread mode is
// ThreadSanitizer's).
#include "memcheck.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <unordered_map>

namespace nla_emu::memcheck {

#ifndef NLA_EMU_MEMCHECK

bool built() { return false; }
void begin(std::vector<Range>, std::vector<Range>, std::vector<Range>) {}
void set_block(unsigned) {}
void end() {}
Finding first() { return {}; }

#else

bool built() { return true; }

namespace {

constexpr int32_t NONE = -1, SEVERAL = -2;

struct Cell {
    int32_t w, r, a;  // last plain writer, plain readers, atomic updaters
};
constexpr unsigned kPageBits = 12;
constexpr std::uintptr_t kPageCells = std::uintptr_t(1) << kPageBits;

struct State {
    bool on = false;
    int32_t block = 0;
    std::vector<Range> ignore, shared, buffers;  // each sorted, ignore and shared merged
    // per shared range, per byte: the generation of the block that last wrote it (written in this
    // block when equal to `gen`); zeroed per launch, and each block a new generation, so nothing
    // is cleared between blocks
    std::vector<std::vector<std::uint32_t>> written;
    std::uint32_t gen = 0;
    std::unordered_map<std::uintptr_t, std::unique_ptr<Cell[]>> pages;
    std::uintptr_t last_key = ~std::uintptr_t(0);
    Cell* last = nullptr;
    Finding found;
};
State g;

Cell* page(std::uintptr_t key) {
    if (key == g.last_key) return g.last;
    auto& p = g.pages[key];
    if (!p) {
        p.reset(new Cell[kPageCells]);
        std::memset(p.get(), 0xff, kPageCells * sizeof(Cell));  // every field NONE (-1)
    }
    g.last_key = key;
    g.last = p.get();
    return g.last;
}

// The range of sorted `rs` that holds [a, a + n), or null.
const Range* holding(const std::vector<Range>& rs, std::uintptr_t a, std::size_t n) {
    auto it = std::upper_bound(rs.begin(), rs.end(), a, [](std::uintptr_t v, const Range& r) { return v < r.first; });
    if (it == rs.begin()) return nullptr;
    const Range& r = *std::prev(it);
    return a + n <= r.second ? &r : nullptr;
}

// Sorted, overlapping ranges merged (and touching ones too where `touching`).
std::vector<Range> sorted(std::vector<Range> rs, bool touching) {
    std::sort(rs.begin(), rs.end());
    std::vector<Range> out;
    for (const Range& r : rs) {
        if (r.first >= r.second) continue;
        if (!out.empty() && (r.first < out.back().second || (touching && r.first == out.back().second)))
            out.back().second = std::max(out.back().second, r.second);
        else
            out.push_back(r);
    }
    return out;
}

int32_t merge(int32_t seen, int32_t b) { return seen == NONE || seen == b ? b : SEVERAL; }

[[noreturn]] void report(Problem p, std::uintptr_t a, unsigned size, Access now, Access before = READ,
                         int32_t other = NONE) {
    g.found = Finding{p, a, size, now, (unsigned)g.block, current_thread(), before, other == SEVERAL ? -1L : (long)other};
    g.on = false;
    memory_fault();
}

// One byte of a global access (a race ends the thread).
void touch(Cell& c, std::uintptr_t a, unsigned size, Access k) {
    int32_t b = g.block;
    auto other = [b](int32_t x) { return x != NONE && x != b; };
    if (other(c.w)) report(RACE, a, size, k, WRITE, c.w);
    if (k != READ && other(c.r)) report(RACE, a, size, k, READ, c.r);
    if (k != ATOMIC && other(c.a)) report(RACE, a, size, k, ATOMIC, c.a);
    switch (k) {
    case READ: c.r = merge(c.r, b); break;
    case WRITE: c.w = b; break;
    case ATOMIC: c.a = merge(c.a, b); break;
    }
}

// An access of `size` bytes; `typed`: the compiler took it to be aligned to its size (a plain or
// atomic access of a 2/4/8/16-byte type, not a byte range or a packed field).
void access(const volatile void* p, std::size_t size, Access k, bool typed) {
    if (!g.on || size == 0) return;
    auto a = reinterpret_cast<std::uintptr_t>(p);
    if (holding(g.ignore, a, 1)) return;
    if (typed && size > 1 && (a & (size - 1)) != 0) report(MISALIGNED, a, (unsigned)size, k);
    if (const Range* r = holding(g.shared, a, 1)) {
        // a read (or an atomic's) of a byte this block has not written since it started
        std::uint32_t* w = g.written[(std::size_t)(r - g.shared.data())].data() + (a - r->first);
        std::size_t n = std::min<std::size_t>(size, r->second - a);
        for (std::size_t i = 0; i < n; ++i)
            if (k != WRITE && w[i] != g.gen) report(UNINITIALIZED, a + i, (unsigned)size, k);
        for (std::size_t i = 0; k != READ && i < n; ++i) w[i] = g.gen;
        return;
    }
    if (!holding(g.buffers, a, size)) report(OUT_OF_BOUNDS, a, (unsigned)size, k);
    for (std::size_t i = 0; i < size; ++i) {
        std::uintptr_t x = a + i;
        touch(page(x >> kPageBits)[x & (kPageCells - 1)], x, (unsigned)size, k);
    }
}

}  // namespace

void begin(std::vector<Range> ignore, std::vector<Range> shared, std::vector<Range> buffers) {
    g.ignore = sorted(std::move(ignore), true);
    g.shared = sorted(std::move(shared), true);
    g.written.resize(g.shared.size());
    for (std::size_t i = 0; i < g.shared.size(); ++i)
        g.written[i].assign(g.shared[i].second - g.shared[i].first, 0);
    // buffers may overlap (one buffer passed twice, an input inside an output): merged, as an
    // access inside any of them is in bounds; neighbours stay apart (reading past one buffer
    // into the next is out of bounds)
    g.buffers = sorted(std::move(buffers), false);
    g.pages.clear();
    g.last_key = ~std::uintptr_t(0);
    g.last = nullptr;
    g.found = Finding{};
    g.block = 0;
    g.gen = 0;
    g.on = true;
}

void set_block(unsigned lin) {
    g.block = (int32_t)lin;
    ++g.gen;  // shared memory starts unwritten in every block
}

void end() {
    g.on = false;
    g.pages.clear();  // the shadow of a large launch is large: give it back now
    g.written.clear();
    g.last_key = ~std::uintptr_t(0);
    g.last = nullptr;
}

Finding first() { return g.found; }

#endif

}  // namespace nla_emu::memcheck

#ifdef NLA_EMU_MEMCHECK
// ---- the hooks gcc's -fsanitize=thread instrumentation calls -----------------------------------
// Atomics perform the operation (sequentially consistent whatever order was asked: blocks run on
// one thread) and record an atomic access; plain accesses record a read or a write. Only the
// typed hooks (__tsan_readN, __tsan_writeN, volatile and atomic ones) check alignment.
namespace rc = nla_emu::memcheck;
using rc_mo = int;  // __tsan_memory_order
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void** p, void*) { rc::access(p, sizeof(void*), rc::WRITE, true); }
void __tsan_vptr_read(void** p) { rc::access(p, sizeof(void*), rc::READ, true); }
void __tsan_read_range(void* p, unsigned long n) { rc::access(p, n, rc::READ, false); }
void __tsan_write_range(void* p, unsigned long n) { rc::access(p, n, rc::WRITE, false); }
void __tsan_atomic_thread_fence(rc_mo) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(rc_mo) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

#define RC_PLAIN(N)                                                                       \
    void __tsan_read##N(void* p) { rc::access(p, N, rc::READ, true); }                    \
    void __tsan_write##N(void* p) { rc::access(p, N, rc::WRITE, true); }                  \
    void __tsan_unaligned_read##N(const void* p) { rc::access(p, N, rc::READ, false); }   \
    void __tsan_unaligned_write##N(void* p) { rc::access(p, N, rc::WRITE, false); }       \
    void __tsan_volatile_read##N(void* p) { rc::access(p, N, rc::READ, true); }           \
    void __tsan_volatile_write##N(void* p) { rc::access(p, N, rc::WRITE, true); }
RC_PLAIN(1)
RC_PLAIN(2)
RC_PLAIN(4)
RC_PLAIN(8)
RC_PLAIN(16)
#undef RC_PLAIN

#define RC_RMW(T, N, OP, BUILTIN)                                                      \
    T __tsan_atomic##N##_##OP(volatile T* a, T v, rc_mo) {                             \
        rc::access(a, sizeof(T), rc::ATOMIC, true);                                          \
        return BUILTIN(a, v, __ATOMIC_SEQ_CST);                                        \
    }
#define RC_ATOMIC(T, N)                                                                         \
    T __tsan_atomic##N##_load(const volatile T* a, rc_mo) {                                     \
        rc::access(a, sizeof(T), rc::ATOMIC, true);                                                   \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                            \
    }                                                                                           \
    void __tsan_atomic##N##_store(volatile T* a, T v, rc_mo) {                                  \
        rc::access(a, sizeof(T), rc::ATOMIC, true);                                                   \
        __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                               \
    }                                                                                           \
    RC_RMW(T, N, exchange, __atomic_exchange_n)                                                 \
    RC_RMW(T, N, fetch_add, __atomic_fetch_add)                                                 \
    RC_RMW(T, N, fetch_sub, __atomic_fetch_sub)                                                 \
    RC_RMW(T, N, fetch_and, __atomic_fetch_and)                                                 \
    RC_RMW(T, N, fetch_or, __atomic_fetch_or)                                                   \
    RC_RMW(T, N, fetch_xor, __atomic_fetch_xor)                                                 \
    RC_RMW(T, N, fetch_nand, __atomic_fetch_nand)                                               \
    int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, rc_mo, rc_mo) {    \
        rc::access(a, sizeof(T), rc::ATOMIC, true);                                                   \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    }                                                                                           \
    int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, rc_mo, rc_mo) {      \
        rc::access(a, sizeof(T), rc::ATOMIC, true);                                                   \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    }                                                                                           \
    T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, rc_mo, rc_mo) {          \
        rc::access(a, sizeof(T), rc::ATOMIC, true);                                                   \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);       \
        return c;                                                                               \
    }
RC_ATOMIC(char, 8)
RC_ATOMIC(short, 16)
RC_ATOMIC(int, 32)
RC_ATOMIC(long, 64)
#undef RC_ATOMIC
#undef RC_RMW
}
#endif
