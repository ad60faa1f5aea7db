// A CPU emulation of the CUDA execution model, for tests: the kernels in csrc/cuda/*.cuh are
// compiled by a host compiler against this header (through resflow/cuda_compat.h) and run on
// the CPU, so their indexing, shared memory, barriers and warp intrinsics are checked against the
// CPU ops without a GPU. Never part of the user-facing build (nvcc sees the real CUDA instead).
//
// Model: blocks run one after another; the threads of a block are fibers (ucontext) on the
// calling OS thread, scheduled warp by warp (32 lanes) until each reaches a warp collective, a
// __syncthreads or the end of the kernel. A warp collective is released when every lane its mask
// names waits at a collective with the same mask; a block barrier when every live thread waits at
// it. Everything is deterministic. Errors are detected, reported with thread ranges and
// file:line, and thrown as resflow_emu::EmulationError, never a hang: a divergent __syncthreads,
// a warp collective facing __syncthreads, a mask naming a lane that is absent or has exited.
//
// Under ThreadSanitizer (-fsanitize=thread) every fiber is a TSan fiber, switches carry no
// synchronisation, and happens-before edges exist only at barriers and warp collectives, so a
// missing __syncthreads / __syncwarp between a shared-memory write and read is reported as a race.
// Under AddressSanitizer the stack switches are announced so fiber stacks are checked too.
// Header-only, C++17, Linux (ucontext, mmap).
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#define RESFLOW_EMU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define RESFLOW_EMU_TSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define RESFLOW_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RESFLOW_EMU_ASAN 1
#endif
#endif

#if defined(RESFLOW_EMU_TSAN)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#endif
#if defined(RESFLOW_EMU_ASAN)
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
}
#endif

// ---------------------------------------------------------------------------------------------
// Qualifiers and built-in types
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __noinline__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared memory is declared through RESFLOW_SHARED / RESFLOW_SHARED_ARRAY
// (resflow/cuda_compat.h), which the emulator counts against the per-block limit; a bare
// __shared__ does not compile here.
#define __shared__ __shared___is_not_emulated_use_RESFLOW_SHARED

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace resflow_emu {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxPayloadBytes = 16;
// Shared memory a block may use, static and dynamic together, without opting in (every GPU).
constexpr size_t kMaxSharedBytes = 48 * 1024;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
using uint3 = dim3;

class EmulationError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

// Emulator bookkeeping is invisible to TSan; only the kernels' own accesses are checked.
struct IgnoreScope {
  IgnoreScope() noexcept {
#if defined(RESFLOW_EMU_TSAN)
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
#endif
  }
  ~IgnoreScope() {
#if defined(RESFLOW_EMU_TSAN)
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
#endif
  }
  IgnoreScope(const IgnoreScope&) = delete;
  IgnoreScope& operator=(const IgnoreScope&) = delete;
};

inline void tsan_release(void* token) {
#if defined(RESFLOW_EMU_TSAN)
  __tsan_release(token);
#else
  (void)token;
#endif
}

inline void tsan_acquire(void* token) {
#if defined(RESFLOW_EMU_TSAN)
  __tsan_acquire(token);
#else
  (void)token;
#endif
}

enum class State : uint8_t { Ready, AtBarrier, AtWarp, Exited };
enum class WarpOp : uint8_t { Sync, Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All };
enum class BarrierOp : uint8_t { Sync, Count, And, Or };

inline const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::Shfl: return "__shfl_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Any: return "__any_sync";
    default: return "__all_sync";
  }
}

inline const char* barrier_op_name(BarrierOp op) {
  switch (op) {
    case BarrierOp::Count: return "__syncthreads_count";
    case BarrierOp::And: return "__syncthreads_and";
    case BarrierOp::Or: return "__syncthreads_or";
    default: return "__syncthreads";
  }
}

struct Site {
  const char* file = "";
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
};

inline std::string site_str(const Site& s) {
  const char* slash = std::strrchr(s.file, '/');
  return std::string(slash ? slash + 1 : s.file) + ":" + std::to_string(s.line);
}

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  size_t stack_size = 0;
  dim3 tid;
  int linear = 0;
  State state = State::Ready;
  Site site;
  // A pending warp collective.
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  int width = kWarpSize;
  int arg = 0;
  size_t payload_size = 0;
  unsigned char payload[kMaxPayloadBytes];
  unsigned char result[kMaxPayloadBytes];
  unsigned warp_collectives = 0;  // parity selects the TSan token of the next collective
  // A pending block barrier.
  BarrierOp barrier_op = BarrierOp::Sync;
  int predicate = 0;
  int barrier_result = 0;
  std::exception_ptr error;
#if defined(RESFLOW_EMU_TSAN)
  void* tsan_fiber = nullptr;
#endif
#if defined(RESFLOW_EMU_ASAN)
  void* asan_fake_stack = nullptr;
#endif
};

// Fiber stacks: mmap'ed with a PROT_NONE guard page below, reused across launches.
inline size_t fiber_stack_bytes() {
  static const size_t bytes = [] {
    const char* env = std::getenv("RESFLOW_EMU_STACK");
    const size_t requested = env ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : 0;
    return requested >= 16384 ? requested : size_t{64} * 1024;
  }();
  return bytes;
}

inline char* stack_for(size_t index) {
  static std::vector<char*> stacks;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (stacks.size() <= index) {
    const size_t total = fiber_stack_bytes() + page;
    void* mem = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
      throw EmulationError("resflow_emu: cannot allocate fiber stacks");
    }
    mprotect(mem, page, PROT_NONE);
    stacks.push_back(static_cast<char*>(mem) + page);
  }
  return stacks[index];
}

class Scheduler;

struct Globals {
  Scheduler* scheduler = nullptr;
  Fiber* current = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  unsigned char* dynamic_shared = nullptr;
  // The kernel's static shared arrays met so far in this launch (address, bytes).
  std::vector<std::pair<const void*, size_t>> static_shared;
};

inline Globals& globals() {
  static Globals g;
  return g;
}

// The scheduler of one block: runs its threads as fibers and releases barriers and collectives.
class Scheduler {
 public:
  Scheduler(std::function<void()> body, dim3 block_dim, const char* launch_file, int launch_line)
      : body_(std::move(body)), launch_site_{launch_file, launch_line} {
    const int n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
    fibers_.resize(n);
    for (int i = 0; i < n; ++i) {
      Fiber& f = fibers_[i];
      f.linear = i;
      f.tid = dim3(i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y));
      f.stack = stack_for(i);
      f.stack_size = fiber_stack_bytes();
    }
  }

  // Runs one block to completion; throws EmulationError on a synchronisation error.
  void run_block() {
#if defined(RESFLOW_EMU_TSAN)
    main_tsan_fiber_ = __tsan_get_current_fiber();
#endif
    for (Fiber& f : fibers_) {
      reset(f);
    }
    // Host code before the block (and earlier blocks) happens-before the block's threads.
    tsan_release(&start_token_);
    try {
      schedule();
    } catch (...) {
      finish_all();
      throw;
    }
    finish_all();
  }

  // Called from a fiber: record what it waits for and switch to the scheduler.
  void wait(Fiber& f) {
    swap_to_scheduler(f);
  }

  Fiber& fiber(int linear) { return fibers_[linear]; }
  int size() const { return static_cast<int>(fibers_.size()); }

  // TSan tokens: consecutive phases alternate, so a thread arriving early at the next barrier
  // does not give the previous phase's stragglers a happens-before edge they should not have.
  void* block_token(unsigned phase) { return &block_tokens_[phase & 1]; }
  void* warp_token(int warp, unsigned phase) { return &warp_tokens_[(warp * 2 + (phase & 1)) % kTokenSlots]; }
  unsigned block_phase() const { return block_phase_; }

  static void entry() {
    Fiber* fp;
    Scheduler* sp;
    {
      IgnoreScope ignore;
      fp = globals().current;
      sp = globals().scheduler;
#if defined(RESFLOW_EMU_ASAN)
      __sanitizer_finish_switch_fiber(nullptr, &sp->main_stack_bottom_, &sp->main_stack_size_);
#endif
    }
    Fiber& f = *fp;
    Scheduler& s = *sp;
    tsan_acquire(&s.start_token_);
    try {
      s.body_();
    } catch (...) {
      f.error = std::current_exception();
    }
    tsan_release(&s.exit_token_);
    {
      IgnoreScope ignore;
      f.state = State::Exited;
    }
    s.swap_to_scheduler(f, /*exiting=*/true);
  }

 private:
  void schedule() {
    const int warps = (size() + kWarpSize - 1) / kWarpSize;
    for (;;) {
      for (Fiber& f : fibers_) {
        if (f.state == State::Ready) {
          resume(f);
          if (f.error) {
            std::rethrow_exception(f.error);
          }
        }
      }
      bool released = false;
      for (int w = 0; w < warps; ++w) {
        released = release_warp(w) || released;
      }
      if (!released) {
        released = release_block();
      }
      if (std::all_of(fibers_.begin(), fibers_.end(), [](const Fiber& f) { return f.state == State::Exited; })) {
        return;
      }
      if (!released) {
        fail(deadlock_report());
      }
    }
  }

  static constexpr int kTokenSlots = 2 * (kMaxThreadsPerBlock / kWarpSize);

  void reset(Fiber& f) {
    f.state = State::Ready;
    f.error = nullptr;
    f.warp_collectives = 0;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = f.stack_size;
    f.context.uc_link = nullptr;
    makecontext(&f.context, &Scheduler::entry, 0);
#if defined(RESFLOW_EMU_TSAN)
    f.tsan_fiber = __tsan_create_fiber(0);
#endif
  }

  void finish_all() {
#if defined(RESFLOW_EMU_TSAN)
    for (Fiber& f : fibers_) {
      if (f.tsan_fiber == nullptr) {
        continue;
      }
      if (f.state != State::Exited) {
        // A fiber abandoned by an error never released the exit token: two synchronising
        // switches (no code runs in between) order its accesses before the host's next ones.
        __tsan_switch_to_fiber(f.tsan_fiber, 0);
        __tsan_switch_to_fiber(main_tsan_fiber_, 0);
      }
      __tsan_destroy_fiber(f.tsan_fiber);
      f.tsan_fiber = nullptr;
    }
#endif
    // The block's threads happen-before the host code after it (and later blocks).
    tsan_acquire(&exit_token_);
  }

  void resume(Fiber& f) {
    Globals& g = globals();
    g.current = &f;
#if defined(RESFLOW_EMU_ASAN)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, f.stack_size);
#endif
#if defined(RESFLOW_EMU_TSAN)
    // Switches carry no synchronisation: happens-before comes only from barriers.
    __tsan_switch_to_fiber(f.tsan_fiber, 1 /* __tsan_switch_to_fiber_no_sync */);
#endif
    swapcontext(&main_context_, &f.context);
#if defined(RESFLOW_EMU_ASAN)
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    g.current = nullptr;
  }

  // Runs in the fiber. Its reads of the scheduler's state are bookkeeping (ignored by TSan); the
  // TSan switch itself must stay outside the ignore scope, which belongs to the fiber.
  void swap_to_scheduler(Fiber& f, bool exiting = false) {
#if defined(RESFLOW_EMU_ASAN)
    {
      IgnoreScope ignore;
      __sanitizer_start_switch_fiber(exiting ? nullptr : &f.asan_fake_stack, main_stack_bottom_, main_stack_size_);
    }
#endif
#if defined(RESFLOW_EMU_TSAN)
    void* main_fiber;
    {
      IgnoreScope ignore;
      main_fiber = main_tsan_fiber_;
    }
    __tsan_switch_to_fiber(main_fiber, 1);
#endif
    swapcontext(&f.context, &main_context_);
#if defined(RESFLOW_EMU_ASAN)
    IgnoreScope ignore;
    __sanitizer_finish_switch_fiber(f.asan_fake_stack, &main_stack_bottom_, &main_stack_size_);
#endif
    (void)exiting;
  }

  int warp_lanes(int warp) const { return std::min(kWarpSize, size() - warp * kWarpSize); }

  // Releases every group of lanes of `warp` whose collective can complete; true if any did.
  bool release_warp(int warp) {
    const int base = warp * kWarpSize;
    const int lanes = warp_lanes(warp);
    bool released = false;
    for (int lane = 0; lane < lanes; ++lane) {
      Fiber& f = fibers_[base + lane];
      if (f.state != State::AtWarp) {
        continue;
      }
      const unsigned mask = f.mask;
      if (!(mask >> lane & 1u)) {
        fail("warp collective " + std::string(warp_op_name(f.op)) + " at " + site_str(f.site) + ": thread " +
             std::to_string(f.linear) + " (lane " + std::to_string(lane) + ") is not in its own mask " + hex(mask));
      }
      bool complete = true;
      for (int other = 0; other < kWarpSize; ++other) {
        if (!(mask >> other & 1u)) {
          continue;
        }
        if (other >= lanes) {
          fail(std::string(warp_op_name(f.op)) + " at " + site_str(f.site) + ": mask " + hex(mask) + " names lane " +
               std::to_string(other) + " of warp " + std::to_string(warp) + ", which does not exist (the block has " +
               std::to_string(size()) + " threads)");
        }
        const Fiber& o = fibers_[base + other];
        if (o.state == State::Exited) {
          fail(std::string(warp_op_name(f.op)) + " at " + site_str(f.site) + ": mask " + hex(mask) + " names lane " +
               std::to_string(other) + " (thread " + std::to_string(o.linear) + "), which has exited");
        }
        if (o.state != State::AtWarp || o.mask != mask) {
          complete = false;
        } else if (o.op != f.op || o.width != f.width || o.payload_size != f.payload_size) {
          fail("lanes of warp " + std::to_string(warp) + " with mask " + hex(mask) + " meet at different collectives: " +
               warp_op_name(f.op) + " at " + site_str(f.site) + " and " + warp_op_name(o.op) + " at " +
               site_str(o.site));
        }
      }
      if (complete) {
        compute_warp(warp, mask);
        released = true;
      }
    }
    return released;
  }

  void compute_warp(int warp, unsigned mask) {
    const int base = warp * kWarpSize;
    const Fiber& first = fibers_[base + __builtin_ctz(mask)];
    const WarpOp op = first.op;
    const int width = first.width;
    unsigned ballot = 0;
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (mask >> lane & 1u) {
        ballot |= (fibers_[base + lane].predicate != 0 ? 1u : 0u) << lane;
      }
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (!(mask >> lane & 1u)) {
        continue;
      }
      Fiber& f = fibers_[base + lane];
      switch (op) {
        case WarpOp::Sync:
          break;
        case WarpOp::Ballot:
          std::memcpy(f.result, &ballot, sizeof(ballot));
          break;
        case WarpOp::Any: {
          const int any = ballot != 0;
          std::memcpy(f.result, &any, sizeof(any));
          break;
        }
        case WarpOp::All: {
          const int all = ballot == mask;
          std::memcpy(f.result, &all, sizeof(all));
          break;
        }
        default: {
          const int src = shuffle_source(op, lane, f.arg, width);
          if (src >= 0 && src < kWarpSize && (mask >> src & 1u)) {
            std::memcpy(f.result, fibers_[base + src].payload, f.payload_size);
          } else {
            // Reading a lane that does not take part is undefined on hardware: poison it.
            std::memset(f.result, 0xFF, f.payload_size);
          }
        }
      }
      f.state = State::Ready;
    }
  }

  // Source lane of a shuffle, as the CUDA programming guide defines it for sub-warps of `width`.
  static int shuffle_source(WarpOp op, int lane, int arg, int width) {
    const int group = lane / width;
    const int in_group = lane % width;
    switch (op) {
      case WarpOp::Shfl:
        return group * width + ((arg % width) + width) % width;
      case WarpOp::ShflUp:
        return in_group >= arg ? lane - arg : lane;
      case WarpOp::ShflDown:
        return in_group + arg < width ? lane + arg : lane;
      default: {
        const int src = lane ^ arg;
        return (src / width > group || src >= kWarpSize) ? lane : src;
      }
    }
  }

  // Releases the block barrier when every live thread waits at it; true if it did.
  bool release_block() {
    const Fiber* first = nullptr;
    for (const Fiber& f : fibers_) {
      if (f.state == State::Exited) {
        continue;
      }
      if (f.state != State::AtBarrier) {
        return false;
      }
      first = first ? first : &f;
    }
    if (first == nullptr) {
      return false;
    }
    for (const Fiber& f : fibers_) {
      if (f.state == State::AtBarrier && (!(f.site == first->site) || f.barrier_op != first->barrier_op)) {
        fail("divergent barrier: threads of one block wait at different __syncthreads:\n" + where_report());
      }
    }
    int count = 0, live = 0;
    for (const Fiber& f : fibers_) {
      if (f.state == State::AtBarrier) {
        ++live;
        count += f.predicate != 0;
      }
    }
    for (Fiber& f : fibers_) {
      if (f.state != State::AtBarrier) {
        continue;
      }
      switch (f.barrier_op) {
        case BarrierOp::Count: f.barrier_result = count; break;
        case BarrierOp::And: f.barrier_result = count == live; break;
        case BarrierOp::Or: f.barrier_result = count > 0; break;
        default: break;
      }
      f.state = State::Ready;
    }
    ++block_phase_;
    return true;
  }

  std::string describe(const Fiber& f) const {
    switch (f.state) {
      case State::AtBarrier: return std::string("wait at ") + barrier_op_name(f.barrier_op) + " " + site_str(f.site);
      case State::AtWarp:
        return std::string("wait at ") + warp_op_name(f.op) + " (mask " + hex(f.mask) + ") " + site_str(f.site);
      case State::Exited: return "have exited";
      default: return "are running";
    }
  }

  // "threads 0-31: wait at __shfl_down_sync (mask 0xffffffff) kernel_utils.cuh:62", one line per range.
  std::string where_report() const {
    std::string out;
    int start = 0;
    for (int i = 1; i <= size(); ++i) {
      if (i == size() || describe(fibers_[i]) != describe(fibers_[start])) {
        out += "  threads " + std::to_string(start) + (i - 1 > start ? "-" + std::to_string(i - 1) : "") + ": " +
               describe(fibers_[start]) + "\n";
        start = i;
      }
    }
    return out;
  }

  std::string deadlock_report() const {
    bool warp_vs_barrier = false;
    for (int i = 0; i < size(); ++i) {
      const Fiber& f = fibers_[i];
      if (f.state != State::AtWarp) {
        continue;
      }
      const int base = i / kWarpSize * kWarpSize;
      for (int lane = 0; lane < kWarpSize; ++lane) {
        if ((f.mask >> lane & 1u) && base + lane < size() && fibers_[base + lane].state == State::AtBarrier) {
          warp_vs_barrier = true;
        }
      }
    }
    return std::string(warp_vs_barrier ? "a warp collective faces __syncthreads: "
                                       : "no barrier or collective can complete (mismatched masks): ") +
           "the block would hang on a GPU.\n" + where_report();
  }

  [[noreturn]] void fail(const std::string& what) const {
    const Globals& g = globals();
    std::ostringstream msg;
    msg << "resflow_emu: " << what << (what.back() == '\n' ? "" : "\n") << "  in block (" << g.block_idx.x << ","
        << g.block_idx.y << "," << g.block_idx.z << ") of the launch at " << site_str(launch_site_);
    throw EmulationError(msg.str());
  }

  static std::string hex(unsigned v) {
    std::ostringstream s;
    s << "0x" << std::hex << v;
    return s.str();
  }

  std::function<void()> body_;
  Site launch_site_;
  std::vector<Fiber> fibers_;
  ucontext_t main_context_;
  unsigned block_phase_ = 0;
  char block_tokens_[2] = {0, 0};
  char start_token_ = 0;
  char exit_token_ = 0;
  char warp_tokens_[kTokenSlots] = {};
#if defined(RESFLOW_EMU_TSAN)
  void* main_tsan_fiber_ = nullptr;
#endif
#if defined(RESFLOW_EMU_ASAN)
  const void* main_stack_bottom_ = nullptr;
  size_t main_stack_size_ = 0;
#endif
};

inline Fiber& current_fiber(const char* what) {
  Globals& g = globals();
  if (g.current == nullptr) {
    throw EmulationError(std::string("resflow_emu: ") + what + " called outside an emulated kernel");
  }
  return *g.current;
}

inline int barrier(BarrierOp op, int predicate, Site site) {
  Scheduler* s;
  Fiber* f;
  unsigned phase;
  {
    IgnoreScope ignore;
    f = &current_fiber(barrier_op_name(op));
    s = globals().scheduler;
    f->state = State::AtBarrier;
    f->barrier_op = op;
    f->predicate = predicate;
    f->site = site;
    phase = s->block_phase();
  }
  tsan_release(s->block_token(phase));
  s->wait(*f);
  tsan_acquire(s->block_token(phase));
  IgnoreScope ignore;
  return f->barrier_result;
}

template <class T>
T warp_collective(WarpOp op, unsigned mask, const T& value, int arg, int width, Site site) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= kMaxPayloadBytes,
                "warp shuffle payloads must be trivially copyable and at most 16 bytes");
  Scheduler* s;
  Fiber* f;
  unsigned phase;
  int warp;
  {
    IgnoreScope ignore;
    f = &current_fiber(warp_op_name(op));
    s = globals().scheduler;
    if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
      throw EmulationError("resflow_emu: " + std::string(warp_op_name(op)) + " at " + site_str(site) +
                           ": width must be a power of two in [1, 32], got " + std::to_string(width));
    }
    f->state = State::AtWarp;
    f->op = op;
    f->mask = mask;
    f->arg = arg;
    f->width = width;
    f->site = site;
    f->payload_size = sizeof(T);
    std::memcpy(f->payload, &value, sizeof(T));
    f->predicate = 0;
    std::memcpy(&f->predicate, &value, std::min(sizeof(T), sizeof(int)));
    phase = f->warp_collectives++;
    warp = f->linear / kWarpSize;
  }
  tsan_release(s->warp_token(warp, phase));
  s->wait(*f);
  tsan_acquire(s->warp_token(warp, phase));
  IgnoreScope ignore;
  T out;
  std::memcpy(&out, f->result, sizeof(T));
  return out;
}

// Static shared bytes of the last completed launch (what cudaFuncGetAttributes calls
// sharedSizeBytes), for the tests of launch plans that must leave room for them.
inline size_t& last_static_shared_bytes() {
  static size_t bytes = 0;
  return bytes;
}

inline size_t static_shared_total(const Globals& g) {
  size_t total = 0;
  for (const auto& entry : g.static_shared) {
    total += entry.second;
  }
  return total;
}

// Called where a kernel declares a static shared array (one function-local static per kernel
// instantiation, one copy per block since blocks run one at a time): counted once per launch.
inline void note_static_shared(const void* address, size_t bytes) {
  IgnoreScope ignore;
  auto& entries = globals().static_shared;
  for (const auto& entry : entries) {
    if (entry.first == address) {
      return;
    }
  }
  entries.emplace_back(address, bytes);
}

// Every kernel launched in this process, for the tests' coverage check.
inline std::vector<const void*>& launched_kernels() {
  static std::vector<const void*> launched;
  return launched;
}

// Launches completed in this process (tests compare it before and after a call).
inline int64_t& launch_count() {
  static int64_t count = 0;
  return count;
}

inline void record_launch(const void* kernel) {
  ++launch_count();
  auto& launched = launched_kernels();
  if (std::find(launched.begin(), launched.end(), kernel) == launched.end()) {
    launched.push_back(kernel);
  }
}

// Converts launch arguments to the kernel's parameter types once, as a CUDA launch does, and runs
// every block.
template <class... Params>
class Launcher {
 public:
  Launcher(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, const char* file, int line)
      : kernel_(kernel), grid_(grid), block_(block), shared_bytes_(shared_bytes), file_(file), line_(line) {}

  template <class... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    const std::tuple<std::decay_t<Params>...> params(static_cast<std::decay_t<Params>>(std::forward<Args>(args))...);
    run([&] { std::apply(kernel_, params); });
  }

 private:
  void run(const std::function<void()>& body) const {
    static std::mutex launch_mutex;
    const std::lock_guard<std::mutex> lock(launch_mutex);
    const Site site{file_, line_};
    const unsigned threads = block_.x * block_.y * block_.z;
    if (threads == 0 || threads > static_cast<unsigned>(kMaxThreadsPerBlock) || block_.z > 64 ||
        grid_.x == 0 || grid_.y == 0 || grid_.z == 0 || grid_.y > 65535 || grid_.z > 65535) {
      throw EmulationError("resflow_emu: invalid launch configuration at " + site_str(site) + ": grid (" +
                           std::to_string(grid_.x) + "," + std::to_string(grid_.y) + "," + std::to_string(grid_.z) +
                           "), block (" + std::to_string(block_.x) + "," + std::to_string(block_.y) + "," +
                           std::to_string(block_.z) + ")");
    }
    if (shared_bytes_ > kMaxSharedBytes) {
      throw EmulationError("resflow_emu: " + std::to_string(shared_bytes_) +
                           " bytes of dynamic shared memory requested at " + site_str(site) + " (limit 49152)");
    }
    std::vector<unsigned char> dynamic_shared(shared_bytes_ + 16);
    Scheduler scheduler(body, block_, file_, line_);
    Globals& g = globals();
    g.scheduler = &scheduler;
    g.block_dim = block_;
    g.grid_dim = grid_;
    g.dynamic_shared = dynamic_shared.data();
    struct Reset {
      ~Reset() { globals() = Globals(); }
    } reset;
    for (unsigned z = 0; z < grid_.z; ++z) {
      for (unsigned y = 0; y < grid_.y; ++y) {
        for (unsigned x = 0; x < grid_.x; ++x) {
          g.block_idx = dim3(x, y, z);
          // Dynamic shared memory starts every block as NaN bytes, never as stale or zero data.
          std::memset(dynamic_shared.data(), 0xFF, dynamic_shared.size());
          scheduler.run_block();
          // A GPU refuses the launch ("invalid argument") when static + dynamic exceed the limit.
          const size_t static_bytes = static_shared_total(g);
          if (static_bytes + shared_bytes_ > kMaxSharedBytes) {
            throw EmulationError("resflow_emu: " + std::to_string(static_bytes) + " bytes of static and " +
                                 std::to_string(shared_bytes_) + " bytes of dynamic shared memory at " +
                                 site_str(site) + " exceed the 49152 a block may use without opting in");
          }
        }
      }
    }
    last_static_shared_bytes() = static_shared_total(g);
    record_launch(reinterpret_cast<const void*>(kernel_));
  }

  void (*kernel_)(Params...);
  dim3 grid_, block_;
  size_t shared_bytes_;
  const char* file_;
  int line_;
};

}  // namespace detail

using detail::last_static_shared_bytes;
using detail::launch_count;
using detail::launched_kernels;
using detail::note_static_shared;

template <class... Params>
detail::Launcher<Params...> launcher(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                                     cudaStream_t /*stream*/, const char* file, int line) {
  return detail::Launcher<Params...>(kernel, grid, block, shared_bytes, file, line);
}

template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(detail::globals().dynamic_shared);
}

// Built-in variables, read through functions so each fiber sees its own thread index.
inline dim3 thread_idx() {
  detail::IgnoreScope ignore;
  return detail::current_fiber("threadIdx").tid;
}
inline dim3 block_idx() {
  detail::IgnoreScope ignore;
  return detail::globals().block_idx;
}
inline dim3 block_dim() {
  detail::IgnoreScope ignore;
  return detail::globals().block_dim;
}
inline dim3 grid_dim() {
  detail::IgnoreScope ignore;
  return detail::globals().grid_dim;
}

}  // namespace resflow_emu

using resflow_emu::dim3;
using resflow_emu::uint3;

#define threadIdx (::resflow_emu::thread_idx())
#define blockIdx (::resflow_emu::block_idx())
#define blockDim (::resflow_emu::block_dim())
#define gridDim (::resflow_emu::grid_dim())
constexpr int warpSize = ::resflow_emu::kWarpSize;

// ---------------------------------------------------------------------------------------------
// Synchronisation and warp intrinsics (the call site is recorded for the error reports)
// ---------------------------------------------------------------------------------------------
#define RESFLOW_EMU_SITE const char *emu_file = __builtin_FILE(), int emu_line = __builtin_LINE()
#define RESFLOW_EMU_AT ::resflow_emu::detail::Site{emu_file, emu_line}

inline void __syncthreads(RESFLOW_EMU_SITE) {
  ::resflow_emu::detail::barrier(::resflow_emu::detail::BarrierOp::Sync, 0, RESFLOW_EMU_AT);
}
inline int __syncthreads_count(int predicate, RESFLOW_EMU_SITE) {
  return ::resflow_emu::detail::barrier(::resflow_emu::detail::BarrierOp::Count, predicate, RESFLOW_EMU_AT);
}
inline int __syncthreads_and(int predicate, RESFLOW_EMU_SITE) {
  return ::resflow_emu::detail::barrier(::resflow_emu::detail::BarrierOp::And, predicate, RESFLOW_EMU_AT);
}
inline int __syncthreads_or(int predicate, RESFLOW_EMU_SITE) {
  return ::resflow_emu::detail::barrier(::resflow_emu::detail::BarrierOp::Or, predicate, RESFLOW_EMU_AT);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, RESFLOW_EMU_SITE) {
  ::resflow_emu::detail::warp_collective(::resflow_emu::detail::WarpOp::Sync, mask, 0, 0, warpSize, RESFLOW_EMU_AT);
}
template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, RESFLOW_EMU_SITE) {
  return ::resflow_emu::detail::warp_collective(::resflow_emu::detail::WarpOp::Shfl, mask, var, src_lane, width,
                                                RESFLOW_EMU_AT);
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, RESFLOW_EMU_SITE) {
  return ::resflow_emu::detail::warp_collective(::resflow_emu::detail::WarpOp::ShflUp, mask, var,
                                                static_cast<int>(delta), width, RESFLOW_EMU_AT);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, RESFLOW_EMU_SITE) {
  return ::resflow_emu::detail::warp_collective(::resflow_emu::detail::WarpOp::ShflDown, mask, var,
                                                static_cast<int>(delta), width, RESFLOW_EMU_AT);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, RESFLOW_EMU_SITE) {
  return ::resflow_emu::detail::warp_collective(::resflow_emu::detail::WarpOp::ShflXor, mask, var, lane_mask, width,
                                                RESFLOW_EMU_AT);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, RESFLOW_EMU_SITE) {
  return ::resflow_emu::detail::warp_collective<unsigned>(::resflow_emu::detail::WarpOp::Ballot, mask,
                                                          predicate != 0 ? 1u : 0u, 0, warpSize, RESFLOW_EMU_AT);
}
inline int __any_sync(unsigned mask, int predicate, RESFLOW_EMU_SITE) {
  return ::resflow_emu::detail::warp_collective<int>(::resflow_emu::detail::WarpOp::Any, mask, predicate != 0, 0,
                                                     warpSize, RESFLOW_EMU_AT);
}
inline int __all_sync(unsigned mask, int predicate, RESFLOW_EMU_SITE) {
  return ::resflow_emu::detail::warp_collective<int>(::resflow_emu::detail::WarpOp::All, mask, predicate != 0, 0,
                                                     warpSize, RESFLOW_EMU_AT);
}
// Lanes of the current warp that have not exited (hardware may report fewer after divergence).
inline unsigned __activemask() {
  ::resflow_emu::detail::IgnoreScope ignore;
  const auto& g = ::resflow_emu::detail::globals();
  const int me = ::resflow_emu::detail::current_fiber("__activemask").linear;
  const int base = me / warpSize * warpSize;
  unsigned mask = 0;
  for (int lane = 0; lane < warpSize && base + lane < g.scheduler->size(); ++lane) {
    if (g.scheduler->fiber(base + lane).state != ::resflow_emu::detail::State::Exited) {
      mask |= 1u << lane;
    }
  }
  return mask;
}
#undef RESFLOW_EMU_SITE
#undef RESFLOW_EMU_AT

// ---------------------------------------------------------------------------------------------
// Atomics (relaxed, on any arithmetic type).
// ---------------------------------------------------------------------------------------------
namespace resflow_emu::detail {
// A relaxed atomic read-modify-write (as CUDA's atomics are): only one fiber runs at a time, so the
// compare-and-swap succeeds at once; the __atomic builtins make ThreadSanitizer see an atomic
// access instead of a race between threads updating the same address.
template <class T, class F>
T read_modify_write(T* address, const F& update) {
  T old;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  T desired = update(old);
  while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    desired = update(old);
  }
  return old;
}
}  // namespace resflow_emu::detail

template <class T>
T atomicAdd(T* address, T value) {
  return ::resflow_emu::detail::read_modify_write(address, [&](T old) { return old + value; });
}
template <class T>
T atomicSub(T* address, T value) {
  return ::resflow_emu::detail::read_modify_write(address, [&](T old) { return old - value; });
}
template <class T>
T atomicExch(T* address, T value) {
  return ::resflow_emu::detail::read_modify_write(address, [&](T) { return value; });
}
template <class T>
T atomicMin(T* address, T value) {
  return ::resflow_emu::detail::read_modify_write(address, [&](T old) { return value < old ? value : old; });
}
template <class T>
T atomicMax(T* address, T value) {
  return ::resflow_emu::detail::read_modify_write(address, [&](T old) { return old < value ? value : old; });
}
template <class T>
T atomicAnd(T* address, T value) {
  return ::resflow_emu::detail::read_modify_write(address, [&](T old) { return old & value; });
}
template <class T>
T atomicOr(T* address, T value) {
  return ::resflow_emu::detail::read_modify_write(address, [&](T old) { return old | value; });
}
template <class T>
T atomicXor(T* address, T value) {
  return ::resflow_emu::detail::read_modify_write(address, [&](T old) { return old ^ value; });
}
template <class T>
T atomicCAS(T* address, T compare, T value) {
  return ::resflow_emu::detail::read_modify_write(address, [&](T old) { return old == compare ? value : old; });
}

// ---------------------------------------------------------------------------------------------
// Memory fences, loads and device math intrinsics (the <cmath> functions come from libm as they are)
// ---------------------------------------------------------------------------------------------
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
template <class T>
T __ldg(const T* p) {
  return *p;
}
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
namespace resflow_emu::detail {
template <class To, class From>
To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}
}  // namespace resflow_emu::detail

inline int __float_as_int(float x) { return ::resflow_emu::detail::bit_cast<int>(x); }
inline float __int_as_float(int i) { return ::resflow_emu::detail::bit_cast<float>(i); }
inline unsigned __float_as_uint(float x) { return ::resflow_emu::detail::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned i) { return ::resflow_emu::detail::bit_cast<float>(i); }
inline long long __double_as_longlong(double x) { return ::resflow_emu::detail::bit_cast<long long>(x); }
inline double __longlong_as_double(long long i) { return ::resflow_emu::detail::bit_cast<double>(i); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) {
    r |= ((x >> i) & 1u) << (31 - i);
  }
  return r;
}
// CUDA's global min/max overloads for integer and floating types.
template <class T, class = std::enable_if_t<std::is_arithmetic<T>::value>>
T min(T a, T b) {
  return b < a ? b : a;
}
template <class T, class = std::enable_if_t<std::is_arithmetic<T>::value>>
T max(T a, T b) {
  return a < b ? b : a;
}
