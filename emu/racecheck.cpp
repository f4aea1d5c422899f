// The inter-block race check (see racecheck.h): gcc's -fsanitize=thread hooks, implemented over a
// per-launch shadow of every byte the kernel touches.
//
// Compiled without instrumentation itself. Without NLA_EMU_RACECHECK (the default build, and the
// ThreadSanitizer build, whose runtime owns the __tsan_* symbols) only the no-op control functions
// are built.
//
// Shadow: one Cell per byte, in pages of 4096 cells found through a hash map (with a one-page
// cache: accesses are mostly sequential). A cell holds, per kind of access, the block that made
// it: NONE, a block's linear index, or SEVERAL. Blocks run one at a time on the launching thread,
// so the shadow needs no lock; the fiber modes are the only ones that record (the OS-thread mode
// is ThreadSanitizer's).
#include "racecheck.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <unordered_map>

namespace nla_emu::racecheck {

#ifndef NLA_EMU_RACECHECK

bool built() { return false; }
void begin(std::vector<std::pair<std::uintptr_t, std::uintptr_t>>) {}
void set_block(unsigned) {}
void end() {}
Race first() { return {}; }

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
    std::vector<std::pair<std::uintptr_t, std::uintptr_t>> ignore;  // sorted, merged
    std::unordered_map<std::uintptr_t, std::unique_ptr<Cell[]>> pages;
    std::uintptr_t last_key = ~std::uintptr_t(0);
    Cell* last = nullptr;
    Race race;
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

bool ignored(std::uintptr_t a) {
    // the last range starting at or below a
    auto it = std::upper_bound(g.ignore.begin(), g.ignore.end(), a,
                               [](std::uintptr_t v, const auto& r) { return v < r.first; });
    return it != g.ignore.begin() && a < std::prev(it)->second;
}

int32_t merge(int32_t seen, int32_t b) { return seen == NONE || seen == b ? b : SEVERAL; }

void found(std::uintptr_t a, unsigned size, Kind now, Kind before, int32_t other) {
    g.race = Race{true, a, size, now, (unsigned)g.block, before, other == SEVERAL ? -1L : (long)other};
    g.on = false;
}

// One byte; false when it is in conflict (recorded in g.race).
bool touch(Cell& c, std::uintptr_t a, unsigned size, Kind k) {
    int32_t b = g.block;
    auto other = [b](int32_t x) { return x != NONE && x != b; };
    if (other(c.w)) return found(a, size, k, WRITE, c.w), false;
    if (k != READ && other(c.r)) return found(a, size, k, READ, c.r), false;
    if (k != ATOMIC && other(c.a)) return found(a, size, k, ATOMIC, c.a), false;
    switch (k) {
    case READ: c.r = merge(c.r, b); break;
    case WRITE: c.w = b; break;
    case ATOMIC: c.a = merge(c.a, b); break;
    }
    return true;
}

void access(const volatile void* p, std::size_t size, Kind k) {
    if (!g.on) return;
    auto a = reinterpret_cast<std::uintptr_t>(p);
    if (ignored(a)) return;
    for (std::size_t i = 0; i < size; ++i) {
        std::uintptr_t x = a + i;
        Cell* pg = page(x >> kPageBits);
        if (!touch(pg[x & (kPageCells - 1)], x, (unsigned)size, k)) return;
    }
}

}  // namespace

void begin(std::vector<std::pair<std::uintptr_t, std::uintptr_t>> ignore) {
    std::sort(ignore.begin(), ignore.end());
    g.ignore.clear();
    for (auto& r : ignore) {
        if (r.first >= r.second) continue;
        if (!g.ignore.empty() && r.first <= g.ignore.back().second)
            g.ignore.back().second = std::max(g.ignore.back().second, r.second);
        else
            g.ignore.push_back(r);
    }
    g.pages.clear();
    g.last_key = ~std::uintptr_t(0);
    g.last = nullptr;
    g.race = Race{};
    g.block = 0;
    g.on = true;
}

void set_block(unsigned lin) { g.block = (int32_t)lin; }

void end() {
    g.on = false;
    g.pages.clear();  // the shadow of a large launch is large: give it back now
    g.last_key = ~std::uintptr_t(0);
    g.last = nullptr;
}

Race first() { return g.race; }

#endif

}  // namespace nla_emu::racecheck

#ifdef NLA_EMU_RACECHECK
// ---- the hooks gcc's -fsanitize=thread instrumentation calls -----------------------------------
// Atomics perform the operation (sequentially consistent whatever order was asked: blocks run on
// one thread) and record an atomic access; plain accesses record a read or a write.
namespace rc = nla_emu::racecheck;
using rc_mo = int;  // __tsan_memory_order
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void** p, void*) { rc::access(p, sizeof(void*), rc::WRITE); }
void __tsan_vptr_read(void** p) { rc::access(p, sizeof(void*), rc::READ); }
void __tsan_read_range(void* p, unsigned long n) { rc::access(p, n, rc::READ); }
void __tsan_write_range(void* p, unsigned long n) { rc::access(p, n, rc::WRITE); }
void __tsan_atomic_thread_fence(rc_mo) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(rc_mo) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

#define RC_PLAIN(N)                                                                       \
    void __tsan_read##N(void* p) { rc::access(p, N, rc::READ); }                          \
    void __tsan_write##N(void* p) { rc::access(p, N, rc::WRITE); }                        \
    void __tsan_unaligned_read##N(const void* p) { rc::access(p, N, rc::READ); }          \
    void __tsan_unaligned_write##N(void* p) { rc::access(p, N, rc::WRITE); }              \
    void __tsan_volatile_read##N(void* p) { rc::access(p, N, rc::READ); }                 \
    void __tsan_volatile_write##N(void* p) { rc::access(p, N, rc::WRITE); }
RC_PLAIN(1)
RC_PLAIN(2)
RC_PLAIN(4)
RC_PLAIN(8)
RC_PLAIN(16)
#undef RC_PLAIN

#define RC_RMW(T, N, OP, BUILTIN)                                                      \
    T __tsan_atomic##N##_##OP(volatile T* a, T v, rc_mo) {                             \
        rc::access(a, sizeof(T), rc::ATOMIC);                                          \
        return BUILTIN(a, v, __ATOMIC_SEQ_CST);                                        \
    }
#define RC_ATOMIC(T, N)                                                                         \
    T __tsan_atomic##N##_load(const volatile T* a, rc_mo) {                                     \
        rc::access(a, sizeof(T), rc::ATOMIC);                                                   \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                            \
    }                                                                                           \
    void __tsan_atomic##N##_store(volatile T* a, T v, rc_mo) {                                  \
        rc::access(a, sizeof(T), rc::ATOMIC);                                                   \
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
        rc::access(a, sizeof(T), rc::ATOMIC);                                                   \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    }                                                                                           \
    int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, rc_mo, rc_mo) {      \
        rc::access(a, sizeof(T), rc::ATOMIC);                                                   \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    }                                                                                           \
    T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, rc_mo, rc_mo) {          \
        rc::access(a, sizeof(T), rc::ATOMIC);                                                   \
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
