// The emulator's runtime: the kernel registry, nla_emu_launch, the block scheduler (fibers or OS
// threads), block barriers and warp collectives. See cuda_emu.h for what kernels see.
//
// A launch runs its blocks one after the other on the calling thread (one launch at a time in the
// process). Within a block, every CUDA thread is in one of the states Run, Bar (waiting at a block
// barrier), Warp (waiting at a warp collective) or Done. The last thread to arrive at a barrier
// completes it and releases the others (in the fiber modes it then yields, so that the next
// stretch starts from the first warp; see run_block_fibers); a thread that must wait either
// switches to the scheduler (fibers) or sleeps on the block's condition variable (OS threads).
// Every check that can fail runs at an arrival or an exit, so a broken kernel is reported instead
// of hanging: in the fiber modes the failing fiber and the waiting ones are simply never resumed;
// in the OS-thread mode every thread throws Abort at its next barrier and unwinds.
// System headers first: cuda_emu.h defines __noinline__, which libstdc++ uses as an attribute.
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <mutex>
#include <memory>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "cuda_emu.h"
#include "fiber.h"
#include "memcheck.h"

NLA_EMU_TLS uint3 threadIdx;
NLA_EMU_TLS uint3 blockIdx;
NLA_EMU_TLS dim3 blockDim;
NLA_EMU_TLS dim3 gridDim;

long long clock64() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// The section of every `__shared__` variable (weak: absent if no kernel declares one).
extern "C" char __start_nla_emu_smem[] __attribute__((weak));
extern "C" char __stop_nla_emu_smem[] __attribute__((weak));

namespace nla_emu {

// ---- registry --------------------------------------------------------------------------------

static KernelReg* g_kernels = nullptr;  // constant-initialised: safe during static construction

void KernelReg::register_kernel(KernelReg* k) {
    k->next = g_kernels;
    g_kernels = k;
}

// The kernel named `name`, or null; `count` is the number of registrations under that name.
static const KernelReg* find_kernel(const char* name, int* count) {
    const KernelReg* found = nullptr;
    *count = 0;
    for (const KernelReg* k = g_kernels; k; k = k->next) {
        if (std::strcmp(k->name, name) == 0) {
            found = k;
            ++*count;
        }
    }
    return found;
}

// ---- messages ----------------------------------------------------------------------------------

static std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
static std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

static std::string site_str(const Site& s) {
    const char* f = s.file_name();
    const char* slash = std::strrchr(f, '/');
    return fmt("%s:%u:%u", slash ? slash + 1 : f, (unsigned)s.line(), (unsigned)s.column());
}

static bool same_site(const Site& a, const Site& b) {
    return a.line() == b.line() && a.column() == b.column() &&
           (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

static const char* bar_name(int op) {
    switch (op) {
    case BAR_COUNT: return "__syncthreads_count";
    case BAR_AND: return "__syncthreads_and";
    case BAR_OR: return "__syncthreads_or";
    default: return "__syncthreads";
    }
}

static const char* warp_name(int op) {
    switch (op) {
    case SHFL_IDX: return "__shfl_sync";
    case SHFL_UP: return "__shfl_up_sync";
    case SHFL_DOWN: return "__shfl_down_sync";
    case SHFL_XOR: return "__shfl_xor_sync";
    case VOTE: return "__ballot_sync/__any_sync/__all_sync";
    case SYNC: return "__syncwarp";
    case MATCH_ANY: return "__match_any_sync";
    default: return "__reduce_*_sync";
    }
}

// Collectives that may meet in one group: all shuffles together, each other kind on its own.
static int warp_class(int op) { return op <= SHFL_XOR ? SHFL_IDX : op; }

// ---- block state -------------------------------------------------------------------------------

enum class St : unsigned char { Run, Bar, Warp, Done };

struct Th {
    St st = St::Run;
    unsigned nbar = 0;   // barriers this thread has reached (ThreadSanitizer tokens alternate on it)
    unsigned nsync = 0;  // __syncwarp calls it has made (the same, for its warp's tokens)
    int op = 0;  // what it waits at (block or warp op), for messages
    Site site;
    unsigned mask = 0;  // warp collective inputs
    unsigned long long val = 0;
    int b = 0, width = 32;
    unsigned long long result = 0;  // warp collective output
    fiber::Context ctx;
    // asynchronous copies in flight (cp.async), oldest first; `committed` counts commit groups
    struct Copy {
        void* dst;
        uint4 data;
        unsigned group;  // `committed` at issue: the group it joins at the next commit
        bool landed;     // landed at issue (reversed order, OS threads)
        Site site;
    };
    std::vector<Copy> copies;
    unsigned committed = 0;
};

struct Group {  // one pending warp collective
    unsigned mask, need, arrived;
    int cls;
    Site site;
    unsigned first;  // tid of the first arrival
};

struct Abort {};  // unwinds an OS thread of a failed block

struct Block {
    const KernelReg* k = nullptr;
    void** args = nullptr;
    const unsigned long long* extents = nullptr;  // bytes of each pointer argument (nullable)
    unsigned bdim[3] = {1, 1, 1};
    unsigned n = 0, nwarps = 0;
    std::size_t dyn = 0;  // bytes of dynamic shared memory
    bool threaded = false, land_at_issue = false;
    bool restart = false;  // fibers: a barrier completed, the scheduler starts from the first warp
    std::vector<Th> th;
    unsigned n_run = 0, n_done = 0;
    int first_exited = -1;
    // the block barrier
    unsigned bar_arrived = 0, bar_first = 0;
    int bar_op = 0, bar_acc = 0, bar_result = 0;
    Site bar_site;
    // warps
    std::vector<unsigned> exited;            // per warp: lanes that have exited
    std::vector<std::vector<Group>> groups;  // per warp: pending collectives
    // outcome
    int err = 0;
    std::string msg;
    // OS-thread mode: m guards everything above; each thread sleeps on its own condition variable
    std::mutex m;
    std::unique_ptr<std::condition_variable[]> cv;
    void wake(unsigned t) {
        if (threaded) cv[t].notify_one();
    }
    void wake_all() {
        if (threaded)
            for (unsigned t = 0; t < n; ++t) cv[t].notify_one();
    }

    // ThreadSanitizer builds: one token per barrier generation parity (see TsanQuiet), and per
    // warp one per __syncwarp parity
    char bar_token[2] = {0, 0};
    char warp_token[32][2] = {};

    void reset() {
        for (Th& t : th) {
            t.st = St::Run;
            t.nbar = 0;
            t.nsync = 0;
            t.copies.clear();
            t.committed = 0;
        }
        n_run = n;
        n_done = 0;
        first_exited = -1;
        bar_arrived = 0;
        for (unsigned& e : exited) e = 0;
        for (auto& g : groups) g.clear();
        err = 0;
        msg.clear();
    }
    std::unique_lock<std::mutex> lock() {
        return threaded ? std::unique_lock<std::mutex>(m) : std::unique_lock<std::mutex>();
    }
    uint3 idx(unsigned t) const {
        return {t % bdim[0], (t / bdim[0]) % bdim[1], t / (bdim[0] * bdim[1])};
    }
    std::string who(unsigned t) const {
        uint3 i = idx(t);
        return fmt("thread (%u,%u,%u)", i.x, i.y, i.z);
    }
    unsigned lanes_existing(unsigned w) const {
        unsigned left = n - w * 32;
        return left >= 32 ? 0xffffffffu : (1u << left) - 1u;
    }
};

static NLA_EMU_TLS Block* tls_block = nullptr;
static NLA_EMU_TLS unsigned tls_tid = 0;
unsigned current_thread() { return tls_tid; }
static NLA_EMU_TLS fiber::Context* tls_sched = nullptr;

static void to_scheduler(Block& b, unsigned tid) { fiber::switch_to(b.th[tid].ctx, *tls_sched); }

// ThreadSanitizer (OS-thread mode, a -fsanitize=thread build): the emulator's bookkeeping under
// the block's mutex is invisible to TSan (its accesses and its lock/unlock/wait are ignored), so
// that the mutex does not order CUDA threads that CUDA leaves unordered (a thread exiting after
// its racy accesses, say, would otherwise be ordered before every thread that takes the mutex
// later, and TSan would miss the race). The one ordering CUDA defines between threads of a block
// is made explicit instead: a barrier releases a token on arrival and acquires it on leaving, the
// token alternating with the barrier count (a fast thread arriving at barrier k+1 must not release
// into the token a slow thread acquires when leaving barrier k); __syncwarp likewise, per warp.
// The other warp collectives exchange values only (shuffles and votes order no memory).
// Elsewhere these are no-ops.
#if defined(__SANITIZE_THREAD__)
extern "C" {
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin();
void __tsan_ignore_thread_end();
void AnnotateIgnoreSyncBegin(const char* file, int line);
void AnnotateIgnoreSyncEnd(const char* file, int line);
}
struct TsanQuiet {
    bool on;
    explicit TsanQuiet(const Block& b) : on(b.threaded) {
        if (on) {
            __tsan_ignore_thread_begin();
            AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
        }
    }
    ~TsanQuiet() {
        if (on) {
            AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
            __tsan_ignore_thread_end();
        }
    }
};
static void tsan_release(const Block& b, void* token) {
    if (b.threaded) __tsan_release(token);
}
static void tsan_acquire(const Block& b, void* token) {
    if (b.threaded) __tsan_acquire(token);
}
#else
struct TsanQuiet {
    explicit TsanQuiet(const Block&) {}
};
static void tsan_release(const Block&, void*) {}
static void tsan_acquire(const Block&, void*) {}
#endif

// Ends this CUDA thread's part in a failed block (the first error is kept).
[[noreturn]] static void fail(Block& b, std::unique_lock<std::mutex>& lk, int code, std::string msg) {
    unsigned tid = tls_tid;
    if (!b.err) {
        b.err = code;
        b.msg = std::move(msg);
    }
    if (b.threaded) {
        b.wake_all();
        lk.unlock();
        throw Abort{};
    }
    for (;;) to_scheduler(b, tid);  // the scheduler sees b.err and never comes back
}

static std::string deadlock_msg(Block& b) {
    std::string s = "deadlock: every live thread waits and no barrier can complete:";
    const char* sep = " ";
    if (b.bar_arrived) {
        s += fmt(" %u thread(s) wait at %s at %s", b.bar_arrived, bar_name(b.bar_op), site_str(b.bar_site).c_str());
        sep = "; ";
    }
    for (unsigned w = 0; w < b.nwarps; ++w)
        for (const Group& g : b.groups[w]) {
            s += fmt("%slanes 0x%08x of warp %u wait for lanes 0x%08x at %s at %s", sep, g.arrived, w,
                     g.need & ~g.arrived, warp_name(b.th[g.first].op), site_str(g.site).c_str());
            sep = "; ";
        }
    return s;
}

// Waits until this thread is released (state Run).
static void wait_run(Block& b, std::unique_lock<std::mutex>& lk, unsigned tid) {
    if (b.threaded) {
        b.cv[tid].wait(lk, [&] { return b.th[tid].st == St::Run || b.err; });
        if (b.err) {
            lk.unlock();
            throw Abort{};
        }
        return;
    }
    while (b.th[tid].st != St::Run) to_scheduler(b, tid);
}

// This thread now waits (state s); fails if nobody is left to release it.
static void park(Block& b, std::unique_lock<std::mutex>& lk, unsigned tid, St s) {
    b.th[tid].st = s;
    if (--b.n_run == 0) fail(b, lk, NLA_EMU_E_DEADLOCK, deadlock_msg(b));
    wait_run(b, lk, tid);
}

static void release(Block& b, unsigned t) {
    b.th[t].st = St::Run;
    ++b.n_run;
    b.wake(t);
}

// ---- block barrier -----------------------------------------------------------------------------

static int block_barrier_impl(Block& b, unsigned tid, int op, int pred, const Site& site) {
    auto lk = b.lock();
    if (b.err) fail(b, lk, b.err, {});
    if (b.first_exited >= 0)
        fail(b, lk, NLA_EMU_E_BARRIER,
             fmt("%s reached %s at %s after %s exited: every thread of a block must reach each barrier",
                 b.who(tid).c_str(), bar_name(op), site_str(site).c_str(), b.who(b.first_exited).c_str()));
    if (b.bar_arrived == 0) {
        b.bar_op = op;
        b.bar_site = site;
        b.bar_first = tid;
        b.bar_acc = op == BAR_AND ? 1 : 0;
    } else if (!same_site(b.bar_site, site) || b.bar_op != op) {
        fail(b, lk, NLA_EMU_E_BARRIER,
             fmt("barrier divergence: %s reached %s at %s while %s waits at %s at %s", b.who(tid).c_str(),
                 bar_name(op), site_str(site).c_str(), b.who(b.bar_first).c_str(), bar_name(b.bar_op),
                 site_str(b.bar_site).c_str()));
    }
    int p = pred != 0;
    if (op == BAR_COUNT) b.bar_acc += p;
    if (op == BAR_AND) b.bar_acc &= p;
    if (op == BAR_OR) b.bar_acc |= p;
    b.th[tid].op = op;
    b.th[tid].site = site;
    if (++b.bar_arrived == b.n) {  // complete: release everyone
        b.bar_arrived = 0;
        b.bar_result = b.bar_acc;
        for (unsigned t = 0; t < b.n; ++t)
            if (b.th[t].st == St::Bar) release(b, t);
        if (!b.threaded) {  // fibers: the next stretch starts from the first warp again
            b.restart = true;
            to_scheduler(b, tid);
            if (b.err) fail(b, lk, b.err, {});
        }
        return b.bar_result;
    }
    park(b, lk, tid, St::Bar);
    return b.bar_result;  // stays valid until every thread has arrived at the next barrier
}

int block_barrier(int op, int pred, const Site& site) {
    Block& b = *tls_block;
    unsigned tid = tls_tid;
    void* token = &b.bar_token[b.th[tid].nbar++ & 1u];
    tsan_release(b, token);
    int r;
    {
        TsanQuiet quiet(b);
        r = block_barrier_impl(b, tid, op, pred, site);
    }
    tsan_acquire(b, token);
    return r;
}

// ---- warp collectives --------------------------------------------------------------------------

// The source lane of a shuffle, by the PTX shfl.sync rules (c = ((32-width) << 8) | clamp).
static unsigned shfl_src(int op, unsigned lane, int b, int width) {
    unsigned segmask = (32u - (unsigned)width) & 31u;
    unsigned clamp = op == SHFL_UP ? 0u : 31u;
    unsigned bv = (unsigned)b & 31u;
    int max_lane = (int)((lane & segmask) | (clamp & ~segmask));
    int min_lane = (int)(lane & segmask);
    int j = (int)lane;
    bool ok = false;
    switch (op) {
    case SHFL_UP: j = (int)lane - (int)bv, ok = j >= max_lane; break;
    case SHFL_DOWN: j = (int)(lane + bv), ok = j <= max_lane; break;
    case SHFL_XOR: j = (int)(lane ^ bv), ok = j <= max_lane; break;
    default: j = min_lane | (int)(bv & ~segmask), ok = j <= max_lane; break;
    }
    return ok ? (unsigned)j : lane;
}

// The last lane of group g arrived: compute every lane's result, release the others.
static void complete(Block& b, unsigned w, const Group& g, unsigned self) {
    Th* t = &b.th[w * 32];
    unsigned need = g.need;
    auto lanes = [need](auto f) {
        for (unsigned l = 0; l < 32; ++l)
            if (need >> l & 1u) f(l);
    };
    switch (g.cls) {
    case SHFL_IDX:
        lanes([&](unsigned l) {
            unsigned j = shfl_src(t[l].op, l, t[l].b, t[l].width);
            t[l].result = (need >> j & 1u) ? t[j].val : ~0ull;  // outside the mask: poison
        });
        break;
    case VOTE: {
        unsigned long long ballot = 0;
        lanes([&](unsigned l) { ballot |= (unsigned long long)(t[l].val != 0) << l; });
        lanes([&](unsigned l) { t[l].result = ballot | (unsigned long long)need << 32; });
        break;
    }
    case MATCH_ANY:
        lanes([&](unsigned l) {
            unsigned m = 0;
            lanes([&](unsigned j) { m |= (unsigned)(t[j].val == t[l].val) << j; });
            t[l].result = m;
        });
        break;
    case SYNC: lanes([&](unsigned l) { t[l].result = 0; }); break;
    default: {  // reductions over 32-bit values
        unsigned r = g.cls == REDUCE_AND || g.cls == REDUCE_MIN_U ? 0xffffffffu : 0u;
        int ri = g.cls == REDUCE_MIN_I ? INT_MAX : INT_MIN;
        lanes([&](unsigned l) {
            unsigned v = (unsigned)t[l].val;
            switch (g.cls) {
            case REDUCE_ADD: r += v; break;
            case REDUCE_MIN_U: r = v < r ? v : r; break;
            case REDUCE_MAX_U: r = v > r ? v : r; break;
            case REDUCE_MIN_I: ri = (int)v < ri ? (int)v : ri; break;
            case REDUCE_MAX_I: ri = (int)v > ri ? (int)v : ri; break;
            case REDUCE_AND: r &= v; break;
            case REDUCE_OR: r |= v; break;
            default: r ^= v; break;
            }
        });
        if (g.cls == REDUCE_MIN_I || g.cls == REDUCE_MAX_I) r = (unsigned)ri;
        lanes([&](unsigned l) { t[l].result = r; });
    }
    }
    lanes([&](unsigned l) {
        if (w * 32 + l != self) release(b, w * 32 + l);
    });
}

static unsigned long long warp_collective_impl(int op, unsigned mask, unsigned long long value, int bval,
                                              int width, const Site& site) {
    Block& b = *tls_block;
    unsigned tid = tls_tid, lane = tid & 31u, w = tid >> 5, bit = 1u << lane;
    TsanQuiet quiet(b);
    auto lk = b.lock();
    if (b.err) fail(b, lk, b.err, {});
    auto where = [&] { return fmt("%s at %s", warp_name(op), site_str(site).c_str()); };
    if (!(mask & bit))
        fail(b, lk, NLA_EMU_E_WARP,
             fmt("%s: %s (lane %u) is not in its mask 0x%08x", where().c_str(), b.who(tid).c_str(), lane, mask));
    if (op <= SHFL_XOR && (width < 1 || width > 32 || (width & (width - 1))))
        fail(b, lk, NLA_EMU_E_WARP, fmt("%s: width %d is not a power of 2 in [1, 32]", where().c_str(), width));
    unsigned need = mask & b.lanes_existing(w);
    if (unsigned gone = need & b.exited[w])
        fail(b, lk, NLA_EMU_E_WARP,
             fmt("%s: mask 0x%08x includes lane %d of warp %u, which has exited", where().c_str(), mask,
                 __builtin_ctz(gone), w));
    // Join the pending group of this mask and kind that waits for this lane, or open one. Groups
    // may overlap (lanes done with one collective go on to the next while others are still in
    // theirs); it is divergence when this lane is owed to a pending group whose waiting lanes
    // this collective needs: neither can ever complete.
    auto& gs = b.groups[w];
    int cls = warp_class(op);
    std::size_t gi = gs.size();
    for (std::size_t i = 0; i < gs.size(); ++i) {
        const Group& g = gs[i];
        bool owed = (g.need & bit) && !(g.arrived & bit);
        if (owed && g.mask == mask && g.cls == cls) {
            gi = i;
            break;
        }
        if (owed && (g.arrived & need))
            fail(b, lk, NLA_EMU_E_WARP,
                 fmt("warp divergence: %s reached %s with mask 0x%08x while lanes 0x%08x of its warp wait for it at "
                     "%s at %s with mask 0x%08x",
                     b.who(tid).c_str(), where().c_str(), mask, g.arrived, warp_name(b.th[g.first].op),
                     site_str(g.site).c_str(), g.mask));
    }
    if (gi == gs.size()) gs.push_back(Group{mask, need, 0, cls, site, tid});
    Th& me = b.th[tid];
    me.op = op;
    me.site = site;
    me.mask = mask;
    me.val = value;
    me.b = bval;
    me.width = width;
    gs[gi].arrived |= bit;
    if (gs[gi].arrived == gs[gi].need) {
        Group g = gs[gi];
        gs.erase(gs.begin() + (std::ptrdiff_t)gi);
        complete(b, w, g, tid);
        return me.result;
    }
    park(b, lk, tid, St::Warp);
    return me.result;  // stays valid until this lane arrives at its next collective
}

// A __syncwarp orders the memory accesses of its lanes (shuffles and votes exchange values only):
// for ThreadSanitizer, a per-warp token released on arrival and acquired on leaving, alternating
// with the lane's count of __syncwarp as the block barrier's tokens do. This assumes the lanes
// that meet in a __syncwarp have made equally many before (true of full-mask __syncwarp, the
// only kind the kernels use); lanes whose counts differ would use different tokens and could
// be reported as racing.
unsigned long long warp_collective(int op, unsigned mask, unsigned long long value, int bval, int width,
                                   const Site& site) {
    Block& b = *tls_block;
    Th& me = b.th[tls_tid];
    void* token = op == SYNC ? &b.warp_token[tls_tid >> 5][me.nsync++ & 1u] : nullptr;
    if (token) tsan_release(b, token);
    unsigned long long r = warp_collective_impl(op, mask, value, bval, width, site);
    if (token) tsan_acquire(b, token);
    return r;
}

unsigned active_mask() {
    Block& b = *tls_block;
    TsanQuiet quiet(b);
    auto lk = b.lock();
    unsigned w = tls_tid >> 5;
    return b.lanes_existing(w) & ~b.exited[w];
}

void trap(const Site& site) {
    Block& b = *tls_block;
    TsanQuiet quiet(b);
    auto lk = b.lock();
    fail(b, lk, NLA_EMU_E_TRAP, fmt("%s called __trap() at %s", b.who(tls_tid).c_str(), site_str(site).c_str()));
}

// ---- thread exit -------------------------------------------------------------------------------

static void thread_exit(Block& b, unsigned tid) {
    TsanQuiet quiet(b);
    auto lk = b.lock();
    if (b.err) fail(b, lk, b.err, {});
    unsigned w = tid >> 5, bit = 1u << (tid & 31u);
    b.th[tid].st = St::Done;
    --b.n_run;
    ++b.n_done;
    b.exited[w] |= bit;
    if (b.first_exited < 0) b.first_exited = (int)tid;
    if (b.bar_arrived)
        fail(b, lk, NLA_EMU_E_BARRIER,
             fmt("%s exited while %u thread(s) wait at %s at %s (first: %s): every thread of a block must "
                 "reach each barrier",
                 b.who(tid).c_str(), b.bar_arrived, bar_name(b.bar_op), site_str(b.bar_site).c_str(),
                 b.who(b.bar_first).c_str()));
    if (const auto& c = b.th[tid].copies; !c.empty())
        fail(b, lk, NLA_EMU_E_ASYNC,
             fmt("%s exited with %zu asynchronous copies (cp.async) it never waited for, the first issued at %s: "
                 "commit (nla_cp_async_commit) and wait for (nla_cp_async_wait) every copy before its data is read, "
                 "or do not issue it",
                 b.who(tid).c_str(), c.size(), site_str(c.front().site).c_str()));
    for (const Group& g : b.groups[w])
        if (g.need & bit)
            fail(b, lk, NLA_EMU_E_WARP,
                 fmt("%s exited while lanes 0x%08x of warp %u wait for it at %s at %s (mask 0x%08x)",
                     b.who(tid).c_str(), g.arrived, w, warp_name(b.th[g.first].op), site_str(g.site).c_str(),
                     g.mask));
    if (b.n_run == 0 && b.n_done < b.n) fail(b, lk, NLA_EMU_E_DEADLOCK, deadlock_msg(b));
}

// ---- running a block -----------------------------------------------------------------------------

static std::vector<fiber::Stack> g_stacks;  // grown on demand, kept for the process

// Records a C++ exception that escaped the kernel (a CUDA kernel has none; a bad_alloc, say).
static void escaped(Block& b, const char* what) {
    TsanQuiet quiet(b);
    auto lk = b.lock();
    if (!b.err) {
        b.err = NLA_EMU_E_INTERNAL;
        b.msg = fmt("%s: a C++ exception escaped the kernel: %s", b.who(tls_tid).c_str(), what);
    }
    b.wake_all();
}

static void fiber_main() {
    Block& b = *tls_block;
    try {
        b.k->tramp(b.k->fn, b.args);
        thread_exit(b, tls_tid);
    } catch (const std::exception& e) {
        escaped(b, e.what());
    } catch (...) {
        escaped(b, "unknown");
    }
    for (;;) to_scheduler(b, tls_tid);
}

static void set_thread_vars(const Block& b, unsigned t) {
    threadIdx = b.idx(t);
}

// Fiber modes: warp at a time. Each warp of `warps` (its threads in lane order), in turn, runs
// until none of its threads can (each waits at a block barrier or has exited): its lanes take
// turns in order, meeting at warp collectives; then the next warp runs. The thread that
// completes a block barrier yields, and the next stretch starts from the first warp again, so
// every stretch between two barriers runs its warps in the order of `warps`: a warp runs its
// whole stretch before the next one starts, as far apart as a GPU's warps can drift, and a warp
// that overwrites shared memory another warp still has to read (a missing barrier before a
// buffer is refilled) does so before the reader runs in one of the two (mirrored) orders, even
// when warp collectives (shuffles, mma, ldmatrix) lie between the read and the write. (A warp
// that waited for another warp's progress without a block barrier would spin here forever; no
// CUDA kernel may rely on that either.) Repeats until all threads are done or one fails.
static void run_block_fibers(Block& b, const std::vector<std::vector<unsigned>>& warps, bool guarded) {
    fiber::Context sched;
    tls_sched = &sched;
    tls_block = &b;
    for (unsigned t = 0; t < b.n; ++t) fiber::make(b.th[t].ctx, g_stacks[t], fiber_main);
    sigjmp_buf jb;
    if (sigsetjmp(jb, 1)) {  // a fiber ran into its guard region (fiber::on_segv)
        fiber::disarm();
        b.err = NLA_EMU_E_STACK;
        b.msg = fmt("%s overflowed its %zu KiB stack (deep recursion or large local arrays)",
                    b.who(tls_tid).c_str(), fiber::kStackBytes / 1024);
        return;
    }
    if (guarded) fiber::arm(&jb);
    for (;;) {
        bool ran = false;
        b.restart = false;
        for (const std::vector<unsigned>& lanes : warps) {
            for (bool warp_ran = true; warp_ran && !b.err && !b.restart;) {
                warp_ran = false;
                for (unsigned t : lanes) {
                    if (b.th[t].st != St::Run) continue;
                    set_thread_vars(b, t);
                    tls_tid = t;
                    fiber::watch(g_stacks[t]);
                    fiber::switch_to(sched, b.th[t].ctx);
                    warp_ran = ran = true;
                    if (b.err || b.restart) break;
                }
            }
            if (b.err || b.restart) break;
        }
        if (b.err || b.n_done == b.n) break;
        if (!ran) {  // unreachable: park() fails first; kept as a safety net
            b.err = NLA_EMU_E_DEADLOCK;
            b.msg = deadlock_msg(b);
            break;
        }
    }
    fiber::disarm();
}

// OS-thread mode: one std::thread per CUDA thread, started once per launch and reused for every
// block: the launching thread publishes a block (generation `gen`), the workers run it and count
// themselves out.
struct Pool {
    std::mutex m;
    std::condition_variable start, done;
    unsigned long long gen = 0;
    unsigned finished = 0;
    bool quit = false;
    uint3 bidx{};
};

static void worker_main(Block* b, Pool* p, unsigned t, dim3 gdim) {
    tls_block = b;
    tls_tid = t;
    set_thread_vars(*b, t);
    blockDim = {b->bdim[0], b->bdim[1], b->bdim[2]};
    gridDim = gdim;
    unsigned long long seen = 0;
    for (;;) {
        {
            std::unique_lock<std::mutex> lk(p->m);
            p->start.wait(lk, [&] { return p->gen != seen || p->quit; });
            if (p->quit) return;
            seen = p->gen;
            blockIdx = p->bidx;
        }
        try {
            b->k->tramp(b->k->fn, b->args);
            thread_exit(*b, t);
        } catch (const Abort&) {
        } catch (const std::exception& e) {
            escaped(*b, e.what());
        } catch (...) {
            escaped(*b, "unknown");
        }
        std::lock_guard<std::mutex> lk(p->m);
        if (++p->finished == b->n) p->done.notify_one();
    }
}

struct Workers {
    Pool pool;
    std::vector<std::thread> ts;
    Block& b;
    Workers(Block& b, dim3 gdim) : b(b) {
        ts.reserve(b.n);
        try {
            for (unsigned t = 0; t < b.n; ++t) ts.emplace_back(worker_main, &b, &pool, t, gdim);
        } catch (...) {
            stop();
            throw;
        }
    }
    void run(uint3 bidx) {
        std::unique_lock<std::mutex> lk(pool.m);
        pool.bidx = bidx;
        pool.finished = 0;
        ++pool.gen;
        pool.start.notify_all();
        pool.done.wait(lk, [&] { return pool.finished == b.n; });
    }
    void stop() {
        {
            std::lock_guard<std::mutex> lk(pool.m);
            pool.quit = true;
        }
        pool.start.notify_all();
        for (auto& t : ts) t.join();
        ts.clear();
    }
    ~Workers() { stop(); }
};

// ---- launch ------------------------------------------------------------------------------------

static std::mutex g_launch;                  // one launch at a time
static unsigned char* g_dyn = nullptr;       // dynamic shared memory, then a canary
static std::size_t g_dyn_cap = 0;
constexpr std::size_t kCanary = 256;
constexpr std::size_t kMaxDynSmem = 227 * 1024;  // the most an sm_90 block can opt in to

void* dynamic_smem() { return g_dyn; }


static int set_err(char* err, std::size_t len, int code, const std::string& msg) {
    if (err && len) {
        std::size_t n = msg.size() < len - 1 ? msg.size() : len - 1;
        std::memcpy(err, msg.data(), n);
        err[n] = 0;
    }
    return code;
}

static std::string block_str(unsigned lin, const unsigned grid[3]) {
    return fmt("block (%u,%u,%u)", lin % grid[0], (lin / grid[0]) % grid[1], lin / (grid[0] * grid[1]));
}

// Where an address is: in terms of the kernel's pointer parameter at or below it (the highest),
// with that buffer's length where the caller gave it.
static std::string locate(const KernelReg* k, void** args, const unsigned long long* extents, std::uintptr_t addr) {
    auto in = [addr](const void* lo, std::size_t len) {
        auto a = reinterpret_cast<std::uintptr_t>(lo);
        return lo && addr >= a && addr - a < len;
    };
    if (in(g_dyn, g_dyn_cap)) return fmt("byte %zu of dynamic shared memory", (std::size_t)(addr - (std::uintptr_t)g_dyn));
    if (__start_nla_emu_smem && in(__start_nla_emu_smem, (std::size_t)(__stop_nla_emu_smem - __start_nla_emu_smem)))
        return fmt("address %p in static shared memory", (void*)addr);
    std::string where = fmt("address %p, below every pointer argument", (void*)addr);
    std::uintptr_t best = 0;
    for (int i = 0; i < k->nparams; ++i) {
        if (k->kinds[i] != KIND_PTR_CONST && k->kinds[i] != KIND_PTR_MUT) continue;
        std::uintptr_t p = 0;
        std::memcpy(&p, args[i], sizeof p);
        if (p == 0 || p > addr || p < best) continue;
        best = p;
        std::size_t off = addr - p, e = k->elems[i] ? k->elems[i] : 1;
        where = fmt("element %zu of parameter %d", off / e, i);
        if (off % e) where += fmt(" (its byte %zu)", off % e);
        if (extents) where += fmt(", a buffer of %llu elements", extents[i] / e);
    }
    return where;
}

// The problem the memory check just found (in the running thread), as a message.
static std::string finding_msg(const Block& b, const memcheck::Finding& f) {
    static const char* verb[] = {"reads", "writes", "atomically updates"};
    static const char* past[] = {"read", "wrote", "updated atomically"};
    std::string what = fmt("%s %s %u bytes at %s", b.who(f.thread).c_str(), verb[f.now], f.size,
                           locate(b.k, b.args, b.extents, f.addr).c_str());
    switch (f.problem) {
    case memcheck::OUT_OF_BOUNDS:
        return "out-of-bounds access: " + what + ", outside every buffer passed to the kernel";
    case memcheck::UNINITIALIZED:
        return "uninitialized shared memory: " + what +
               ", which no thread of this block has written since the block started";
    case memcheck::MISALIGNED:
        return "misaligned access: " + what + fmt(" (address %p): a GPU needs a %u-byte access %u-byte aligned",
                                                  (void*)f.addr, f.size, f.size);
    default: {
        unsigned g[3] = {gridDim.x, gridDim.y, gridDim.z};
        std::string other = f.other < 0 ? std::string("other blocks") : block_str((unsigned)f.other, g);
        return "inter-block data race: " + what +
               fmt(", which %s %s earlier in this launch; the blocks of a launch are unordered (use atomics, give "
                   "each block its own outputs, or split the kernel in two launches)",
                   other.c_str(), past[f.before]);
    }
    }
}

void memory_fault() {
    Block& b = *tls_block;
    memcheck::Finding f = memcheck::first();
    TsanQuiet quiet(b);
    auto lk = b.lock();
    fail(b, lk, f.problem == memcheck::RACE ? NLA_EMU_E_RACE : NLA_EMU_E_MEMORY, finding_msg(b, f));
}

void misaligned(const void* p, unsigned bytes, bool write, const Site& site) {
    Block& b = *tls_block;
    memcheck::Finding f;
    f.problem = memcheck::MISALIGNED;
    f.addr = reinterpret_cast<std::uintptr_t>(p);
    f.size = bytes;
    f.now = write ? memcheck::WRITE : memcheck::READ;
    f.thread = tls_tid;
    TsanQuiet quiet(b);
    auto lk = b.lock();
    fail(b, lk, NLA_EMU_E_MEMORY, finding_msg(b, f) + " (at " + site_str(site) + ")");
}

// ---- asynchronous copies (cp.async) --------------------------------------------------------------

bool async_issue(void* dst, const uint4& data, const Site& site) {
    Block& b = *tls_block;
    auto in = [p = reinterpret_cast<std::uintptr_t>(dst)](const void* lo, std::size_t len) {
        auto a = reinterpret_cast<std::uintptr_t>(lo);
        return lo && p >= a && p - a + 16 <= len;
    };
    bool shared = in(g_dyn, b.dyn) ||
                  (__start_nla_emu_smem && in(__start_nla_emu_smem, (std::size_t)(__stop_nla_emu_smem - __start_nla_emu_smem)));
    if (!shared) {
        TsanQuiet quiet(b);
        auto lk = b.lock();
        fail(b, lk, NLA_EMU_E_ASYNC,
             fmt("%s issued an asynchronous copy (cp.async) at %s to %s, which is not 16 bytes inside shared "
                 "memory",
                 b.who(tls_tid).c_str(), site_str(site).c_str(), locate(b.k, b.args, b.extents, (std::uintptr_t)dst).c_str()));
    }
    Th& t = b.th[tls_tid];
    t.copies.push_back(Th::Copy{dst, data, t.committed, b.land_at_issue, site});
    return b.land_at_issue;
}

void async_commit() { ++tls_block->th[tls_tid].committed; }

bool async_landing(int n, void** dst, uint4* data) {
    Th& t = tls_block->th[tls_tid];
    unsigned keep = n < 0 ? 0u : (unsigned)n;
    for (std::size_t i = 0; i < t.copies.size();) {
        const Th::Copy c = t.copies[i];
        if (c.group + keep >= t.committed) {  // a group among the `keep` newest, or uncommitted
            ++i;
            continue;
        }
        t.copies.erase(t.copies.begin() + (std::ptrdiff_t)i);
        if (c.landed) continue;
        *dst = c.dst;
        *data = c.data;
        return true;
    }
    return false;
}

// Checks a launch's memory accesses while it runs (fiber modes of a memcheck build).
struct CheckScope {
    bool on = false;
    ~CheckScope() {
        if (on) memcheck::end();
    }
};

static unsigned long long splitmix(unsigned long long& s) {
    unsigned long long z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int launch(const char* name, const unsigned grid[3], const unsigned block[3], std::size_t dyn, void** args,
                  const unsigned long long* extents, int mode, unsigned long long seed, char* err,
                  std::size_t err_len) {
    auto E = [&](int code, const std::string& m) {
        return set_err(err, err_len, code, fmt("emulated kernel `%s`: ", name ? name : "?") + m);
    };
    if (!name || !grid || !block) return E(NLA_EMU_E_CONFIG, "null name, grid or block");
    int count = 0;
    const KernelReg* k = find_kernel(name, &count);
    if (!k)
        return E(NLA_EMU_E_UNKNOWN_KERNEL,
                 "no such kernel (each extern \"C\" kernel needs `NLA_EMU_KERNEL(name);` at the end of its .cu "
                 "file, under #ifdef NLA_EMU)");
    if (count > 1) return E(NLA_EMU_E_UNKNOWN_KERNEL, fmt("registered %d times", count));
    if (mode < 0 || mode > 2) return E(NLA_EMU_E_CONFIG, fmt("mode %d (0, 1 or 2)", mode));
    unsigned long long nthreads = (unsigned long long)block[0] * block[1] * block[2];
    if (!block[0] || !block[1] || !block[2] || block[0] > 1024 || block[1] > 1024 || block[2] > 64 ||
        nthreads > 1024)
        return E(NLA_EMU_E_CONFIG, fmt("block (%u,%u,%u): each dim >= 1, x,y <= 1024, z <= 64, at most 1024 "
                                       "threads",
                                       block[0], block[1], block[2]));
    unsigned long long nblocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    if (!grid[0] || !grid[1] || !grid[2] || grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535 ||
        nblocks > (1ull << 24))
        return E(NLA_EMU_E_CONFIG, fmt("grid (%u,%u,%u): each dim >= 1, y,z <= 65535, at most 2^24 blocks here",
                                       grid[0], grid[1], grid[2]));
    if (dyn > kMaxDynSmem)
        return E(NLA_EMU_E_CONFIG, fmt("%zu bytes of dynamic shared memory (at most %zu)", dyn, kMaxDynSmem));
    if (k->nparams > 0 && !args) return E(NLA_EMU_E_CONFIG, "null args for a kernel with parameters");

    std::lock_guard<std::mutex> launch_lock(g_launch);
    // dynamic shared memory + canary
    if (g_dyn_cap < dyn + kCanary) {
        std::free(g_dyn);
        g_dyn_cap = (dyn + kCanary + 4095) & ~std::size_t(4095);
        g_dyn = static_cast<unsigned char*>(std::aligned_alloc(128, g_dyn_cap));
        if (!g_dyn) {
            g_dyn_cap = 0;
            return E(NLA_EMU_E_INTERNAL, "out of memory for dynamic shared memory");
        }
    }
    // fiber stacks
    bool fibers = mode != 2, guarded = false;
    if (fibers) {
        while (g_stacks.size() < nthreads) {
            fiber::Stack s;
            if (!fiber::alloc_stack(s)) return E(NLA_EMU_E_INTERNAL, "could not map fiber stacks");
            g_stacks.push_back(s);
        }
        guarded = fiber::install_guard();
    }
    // block order
    std::vector<unsigned> border(nblocks);
    for (unsigned i = 0; i < nblocks; ++i) border[i] = i;
    if (mode == 1) {
        unsigned long long s = seed;
        for (std::size_t i = nblocks; i > 1; --i) std::swap(border[i - 1], border[splitmix(s) % i]);
    }
    // thread order: each warp's lanes, warp after warp (both reversed in mode 1)
    std::vector<std::vector<unsigned>> warps;
    for (unsigned i = 0; i < nthreads; ++i) {
        unsigned t = mode == 1 ? (unsigned)nthreads - 1 - i : i;
        if (warps.empty() || warps.back()[0] / 32 != t / 32) warps.emplace_back();
        warps.back().push_back(t);
    }

    Block b;
    b.k = k;
    b.args = args;
    b.extents = extents;
    std::memcpy(b.bdim, block, sizeof b.bdim);
    b.n = (unsigned)nthreads;
    b.nwarps = (b.n + 31) / 32;
    b.threaded = mode == 2;
    b.land_at_issue = mode != 0;
    b.dyn = dyn;
    b.th.resize(b.n);
    if (b.threaded) b.cv.reset(new std::condition_variable[b.n]);
    b.exited.resize(b.nwarps);
    b.groups.resize(b.nwarps);
    dim3 gdim{grid[0], grid[1], grid[2]};
    char* smem_lo = __start_nla_emu_smem;
    std::size_t smem_len = smem_lo ? (std::size_t)(__stop_nla_emu_smem - __start_nla_emu_smem) : 0;
    blockDim = {block[0], block[1], block[2]};
    gridDim = gdim;
    CheckScope check;
    if (fibers && memcheck::built()) {
        std::vector<memcheck::Range> ignore, shared, buffers;
        auto range = [](std::vector<memcheck::Range>& v, const void* lo, std::size_t len) {
            auto a = reinterpret_cast<std::uintptr_t>(lo);
            v.emplace_back(a, a + len);
        };
        range(shared, smem_lo, smem_len);
        range(shared, g_dyn, dyn);  // past it (the canary) is out of bounds
        for (const fiber::Stack& s : g_stacks) range(ignore, s.map, (std::size_t)(s.lo + s.size - s.map));
        for (const void* v : {(const void*)&threadIdx, (const void*)&blockIdx, (const void*)&blockDim,
                              (const void*)&gridDim})
            range(ignore, v, sizeof(uint3));
        range(ignore, args, sizeof(void*) * (std::size_t)k->nparams);
        for (int i = 0; i < k->nparams; ++i) {
            range(ignore, args[i], k->sizes[i]);
            if (!extents || (k->kinds[i] != KIND_PTR_CONST && k->kinds[i] != KIND_PTR_MUT)) continue;
            const void* p = nullptr;
            std::memcpy(&p, args[i], sizeof p);
            if (p) range(buffers, p, (std::size_t)extents[i]);
        }
        if (!extents) buffers.emplace_back(0, ~std::uintptr_t(0));  // lengths unknown: no bounds
        memcheck::begin(std::move(ignore), std::move(shared), std::move(buffers));
        check.on = true;
    }
    std::unique_ptr<Workers> workers;
    if (b.threaded) {
        try {
            workers = std::make_unique<Workers>(b, gdim);
        } catch (const std::system_error& e) {
            return E(NLA_EMU_E_INTERNAL, fmt("could not start %u OS threads: %s", b.n, e.what()));
        }
    }
    for (unsigned lin : border) {
        uint3 bidx{lin % grid[0], (lin / grid[0]) % grid[1], lin / (grid[0] * grid[1])};
        b.reset();
        if (smem_len) std::memset(smem_lo, 0xff, smem_len);
        std::memset(g_dyn, 0xff, dyn);
        std::memset(g_dyn + dyn, 0xa5, kCanary);
        blockIdx = bidx;
        if (check.on) memcheck::set_block(lin);
        if (fibers)
            run_block_fibers(b, warps, guarded);
        else
            workers->run(bidx);
        auto at = fmt("block (%u,%u,%u): ", bidx.x, bidx.y, bidx.z);
        if (b.err) return E(b.err, at + b.msg);
        for (std::size_t i = 0; i < kCanary; ++i)
            if (g_dyn[dyn + i] != 0xa5)
                return E(NLA_EMU_E_SMEM, at + fmt("wrote byte %zu of dynamic shared memory, past the %zu bytes of "
                                                  "the launch",
                                                  dyn + i, dyn));
    }
    return NLA_EMU_OK;
}

}  // namespace nla_emu

extern "C" int nla_emu_launch(const char* name, const unsigned grid[3], const unsigned block[3], size_t dyn_smem,
                              void** args, const unsigned long long* extents, int mode, unsigned long long seed,
                              char* err, size_t err_len) {
    try {
        return nla_emu::launch(name, grid, block, dyn_smem, args, extents, mode, seed, err, err_len);
    } catch (const std::exception& e) {
        return nla_emu::set_err(err, err_len, NLA_EMU_E_INTERNAL, std::string("emulator: ") + e.what());
    } catch (...) {
        return nla_emu::set_err(err, err_len, NLA_EMU_E_INTERNAL, "emulator: unknown exception");
    }
}

extern "C" int nla_emu_kernel_params(const char* name, size_t* sizes, int* kinds, size_t* elems, size_t cap) {
    if (!name) return -1;
    int count = 0;
    const nla_emu::KernelReg* k = nla_emu::find_kernel(name, &count);
    if (!k) return -1;
    if (count != 1) return -2;
    for (int i = 0; i < k->nparams && (size_t)i < cap; ++i) {
        if (sizes) sizes[i] = k->sizes[i];
        if (kinds) kinds[i] = k->kinds[i];
        if (elems) elems[i] = k->elems[i];
    }
    return k->nparams;
}

extern "C" int nla_emu_memcheck() { return nla_emu::memcheck::built() ? 1 : 0; }
