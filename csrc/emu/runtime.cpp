// The runtime of the CUDA emulation (see cuda_emulation.h): fibers, the block scheduler, warp
// collectives, launch limits, schedules for race detection, and per-site launch statistics.
//
// Fibers, not OS threads: a block's 256 GPU threads are 256 fibers on the launching OS thread, and
// a switch is a few register moves (x86-64 assembly below; ucontext elsewhere). Running GPU threads
// as OS threads with pthread barriers would let ThreadSanitizer name a shared-memory race between
// two GPU threads, but costs a kernel round trip per barrier and per shuffle and makes every run
// nondeterministic; here the interleaving is chosen (in order, reversed, seeded shuffles), so a
// race shows up as a bit difference between schedules that reproduces from its seed.
#include "cuda_emulation.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define PK_EMU_ASAN 1
#else
#define PK_EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace peftkern {
namespace emu {

thread_local const ThreadState* g_current = nullptr;

namespace {

constexpr size_t kStackBytes = 256 * 1024;       // per GPU thread; kernels use a few hundred bytes
constexpr size_t kMaxSharedBytes = 48 * 1024;     // the default limit without an opt-in attribute
constexpr unsigned kMaxThreadsPerBlock = 1024;

// ---- Context switch ------------------------------------------------------------------------------
#if defined(__x86_64__)
// switch(save, next): saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *save, and resumes the context saved at `next`.
// A new fiber's stack is laid out as if it had called switch, returning into fiber_start, which
// calls entry(arg) with entry and arg taken from r13 and r12.
asm(R"(
.text
.p2align 4
.globl pk_emu_switch_context
.hidden pk_emu_switch_context
.type pk_emu_switch_context,@function
pk_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size pk_emu_switch_context,.-pk_emu_switch_context

.p2align 4
.globl pk_emu_fiber_start
.hidden pk_emu_fiber_start
.type pk_emu_fiber_start,@function
pk_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
.size pk_emu_fiber_start,.-pk_emu_fiber_start
)");
extern "C" void pk_emu_switch_context(void** save, void* next);
extern "C" void pk_emu_fiber_start();
#endif

struct Fiber {
  unsigned char* base = nullptr;  // mmap'd: a guard page, then the stack
  size_t size = 0;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
  void* asan_fake_stack = nullptr;

  Fiber() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    size = kStackBytes + page;
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "CUDA emulation: could not map a fiber stack");
    base = static_cast<unsigned char*>(p);
    mprotect(base, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
  }
  ~Fiber() { munmap(base, size); }
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  unsigned char* stack_bottom() const { return base + static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  size_t stack_size() const { return kStackBytes; }
};

// ---- The running launch ------------------------------------------------------------------------
enum class Status { kRunnable, kAtBarrier, kAtCollective, kDone };

struct GpuThread {
  ThreadState state;
  Status status = Status::kRunnable;
  Collective kind = Collective::kSyncWarp;
  unsigned mask = 0;
  uint64_t bits = 0, result = 0;
  int operand = 0, width = 32;
  const char* file = "";
  int line = 0;
};

enum class Schedule { kForward, kReverse, kShuffle };

struct SharedArray {
  unsigned char* address;
  size_t bytes;
};

// The static __shared__ arrays of one kernel instantiation, as its threads reached them.
struct KernelShared {
  std::vector<SharedArray> arrays;
  size_t bytes = 0;
};

struct Launcher {
  std::vector<std::unique_ptr<Fiber>> fibers;
  std::vector<GpuThread> threads;
  size_t running = 0;  // index of the GPU thread on the CPU now
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_context;
#endif
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  void* scheduler_fake_stack = nullptr;

  void (*body)(void*) = nullptr;
  void* context = nullptr;
  std::string error;  // set by a failing GPU thread; the launch throws it once control is back
  std::unique_ptr<unsigned char[]> dynamic;
  size_t dynamic_bytes = 0;
  KernelShared* shared = nullptr;  // of the kernel running now
  std::string site;                // "file:line (kernel)" of the launch running now

  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
  std::mt19937_64 rng;
};

std::mutex g_mutex;  // one launch at a time: __shared__ storage is static
Launcher g_launcher;

struct SiteStats {
  std::string file, kernel;
  int line = 0;
  std::map<std::string, int64_t> launches;  // by instantiation
  int64_t blocks = 0, threads = 0;
};
std::map<std::string, SiteStats> g_stats;  // by "file:line"
std::map<const char*, KernelShared> g_kernel_shared;  // by instantiation (its signature string)

GpuThread& current_thread() { return g_launcher.threads[g_launcher.running]; }

// Back to the scheduler, from the GPU thread that runs now; returns when it is resumed.
void yield_to_scheduler(bool finished) {
  Launcher& l = g_launcher;
  Fiber& f = *l.fibers[l.running];
#if PK_EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.asan_fake_stack, l.scheduler_stack_bottom,
                                 l.scheduler_stack_size);
#endif
#if defined(__x86_64__)
  pk_emu_switch_context(&f.sp, l.scheduler_sp);
#else
  swapcontext(&f.context, &l.scheduler_context);
#endif
#if PK_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, &l.scheduler_stack_bottom, &l.scheduler_stack_size);
#endif
  (void)finished;
}

extern "C" void pk_emu_fiber_main(void* arg) {
  Launcher& l = g_launcher;
#if PK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &l.scheduler_stack_bottom, &l.scheduler_stack_size);
#endif
  (void)arg;
  try {
    l.body(l.context);
  } catch (const std::exception& e) {
    if (l.error.empty()) l.error = std::string("exception in a GPU thread: ") + e.what();
  }
  current_thread().status = Status::kDone;
  yield_to_scheduler(true);
  __builtin_trap();  // a finished GPU thread is never resumed
}

#if !defined(__x86_64__)
void fiber_trampoline() { pk_emu_fiber_main(nullptr); }
#endif

void start_fiber(Fiber& f) {
#if PK_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(f.stack_bottom(), f.stack_size());  // frames left by the last thread
#endif
#if defined(__x86_64__)
  const uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack_bottom()) + f.stack_size()) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<uint64_t*>(top - 80);  // the 64-byte frame switch pops, 16-aligned
  uint32_t mxcsr = 0;
  uint16_t fpu_cw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  frame[0] = mxcsr | (static_cast<uint64_t>(fpu_cw) << 32);
  frame[1] = 0;                                                          // r15
  frame[2] = 0;                                                          // r14
  frame[3] = reinterpret_cast<uint64_t>(&pk_emu_fiber_main);             // r13: entry
  frame[4] = 0;                                                          // r12: its argument
  frame[5] = 0;                                                          // rbx
  frame[6] = 0;                                                          // rbp
  frame[7] = reinterpret_cast<uint64_t>(&pk_emu_fiber_start);            // return address
  f.sp = frame;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack_bottom();
  f.context.uc_stack.ss_size = f.stack_size();
  f.context.uc_link = nullptr;
  makecontext(&f.context, &fiber_trampoline, 0);
#endif
}

void resume(size_t index) {
  Launcher& l = g_launcher;
  l.running = index;
  g_current = &l.threads[index].state;
  Fiber& f = *l.fibers[index];
#if PK_EMU_ASAN
  __sanitizer_start_switch_fiber(&l.scheduler_fake_stack, f.stack_bottom(), f.stack_size());
#endif
#if defined(__x86_64__)
  pk_emu_switch_context(&l.scheduler_sp, f.sp);
#else
  swapcontext(&l.scheduler_context, &f.context);
#endif
#if PK_EMU_ASAN
  __sanitizer_finish_switch_fiber(l.scheduler_fake_stack, nullptr, nullptr);
#endif
  g_current = nullptr;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

// A source path from csrc/ on (the checkout's location left out).
std::string relative(const char* file) {
  std::string f = file;
  const auto slash = f.rfind("csrc/");
  return slash == std::string::npos ? f : f.substr(slash);
}

std::string where(const char* file, int line) { return relative(file) + ":" + std::to_string(line); }

const char* collective_name(Collective kind) {
  switch (kind) {
    case Collective::kShflIdx: return "__shfl_sync";
    case Collective::kShflUp: return "__shfl_up_sync";
    case Collective::kShflDown: return "__shfl_down_sync";
    case Collective::kShflXor: return "__shfl_xor_sync";
    case Collective::kSyncWarp: return "__syncwarp";
  }
  return "?";
}

std::string describe(const GpuThread& t) {
  switch (t.status) {
    case Status::kDone: return "has exited";
    case Status::kAtBarrier: return "waits at __syncthreads (" + where(t.file, t.line) + ")";
    case Status::kAtCollective:
      return "waits at " + std::string(collective_name(t.kind)) + " (" + where(t.file, t.line) + ")";
    case Status::kRunnable: return "is running";
  }
  return "?";
}

// Resolves every warp collective whose lanes have all arrived; throws on a divergent one.
bool resolve_collectives(size_t block_threads) {
  Launcher& l = g_launcher;
  bool progressed = false;
  for (size_t warp_base = 0; warp_base < block_threads; warp_base += 32) {
    const size_t lanes = std::min<size_t>(32, block_threads - warp_base);
    for (size_t lane = 0; lane < lanes; ++lane) {
      GpuThread& t = l.threads[warp_base + lane];
      if (t.status != Status::kAtCollective) continue;
      const std::string at = collective_name(t.kind) + std::string(" at ") + where(t.file, t.line);
      TORCH_CHECK((t.mask >> lane) & 1u, "CUDA emulation: lane ", lane, " calls ", at, " with mask 0x", std::hex,
                  t.mask, std::dec, ", which does not name the lane itself");
      // Every lane the mask names must be here, at the same collective with the same mask.
      for (size_t other = 0; other < 32; ++other) {
        if (!((t.mask >> other) & 1u)) continue;
        TORCH_CHECK(other < lanes, "CUDA emulation: ", at, " names lane ", other,
                    " in its mask, but the block has no such thread (", block_threads, " threads)");
        const GpuThread& o = l.threads[warp_base + other];
        TORCH_CHECK(o.status == Status::kAtCollective && o.kind == t.kind && o.mask == t.mask,
                    "CUDA emulation: divergent warp collective: lane ", lane, " waits at ", at, " (mask 0x", std::hex,
                    t.mask, std::dec, ") but lane ", other, " ", describe(o));
        TORCH_CHECK(o.width == t.width && o.width > 0 && o.width <= 32 && (o.width & (o.width - 1)) == 0,
                    "CUDA emulation: ", at, ": width must be one power of two <= 32 for every lane");
      }
      // All present: exchange.
      for (size_t other = 0; other < 32; ++other) {
        if (!((t.mask >> other) & 1u)) continue;
        GpuThread& o = l.threads[warp_base + other];
        const int me = static_cast<int>(other), w = o.width, base = me & ~(w - 1);
        int src = me;
        switch (o.kind) {
          case Collective::kShflIdx: src = base + (o.operand & (w - 1)); break;
          case Collective::kShflUp: src = me - o.operand < base ? me : me - o.operand; break;
          case Collective::kShflDown: src = me + o.operand >= base + w ? me : me + o.operand; break;
          case Collective::kShflXor: src = (me ^ o.operand) >= base + w ? me : (me ^ o.operand); break;
          case Collective::kSyncWarp: break;
        }
        if (o.kind != Collective::kSyncWarp) {
          TORCH_CHECK(src >= 0 && src < 32 && ((t.mask >> src) & 1u), "CUDA emulation: ", at, ": lane ", me,
                      " reads lane ", src, ", which is not in the mask 0x", std::hex, t.mask);
          o.result = l.threads[warp_base + static_cast<size_t>(src)].bits;
        }
      }
      for (size_t other = 0; other < 32; ++other) {
        if ((t.mask >> other) & 1u) l.threads[warp_base + other].status = Status::kRunnable;
      }
      progressed = true;
    }
  }
  return progressed;
}

void check_launch(const Site& site, dim3 grid, dim3 block, size_t shared_bytes) {
  const std::string at = where(site.file, site.line) + " (" + site.kernel + ")";
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  TORCH_CHECK(block.x >= 1 && block.y >= 1 && block.z >= 1 && block.x <= 1024 && block.y <= 1024 && block.z <= 64 &&
                  threads <= kMaxThreadsPerBlock,
              "CUDA emulation: invalid configuration argument: block (", block.x, ", ", block.y, ", ", block.z,
              ") at ", at, " (CUDA allows x, y <= 1024, z <= 64, at most 1024 threads, none zero)");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535 &&
                  grid.z <= 65535,
              "CUDA emulation: invalid configuration argument: grid (", grid.x, ", ", grid.y, ", ", grid.z, ") at ",
              at, " (CUDA allows x < 2^31, y, z <= 65535, none zero)");
}

std::string shared_limit_error(size_t dynamic_bytes, size_t static_bytes, const std::string& declared = "") {
  std::ostringstream s;
  s << "too much shared memory at " << g_launcher.site << ": " << dynamic_bytes << " dynamic + " << static_bytes
    << " static bytes > " << kMaxSharedBytes << " (CUDA's limit without cudaFuncSetAttribute)" << declared;
  return s.str();
}

void run_block(size_t block_threads, dim3 block, dim3 grid, uint3 block_idx, size_t shared_bytes) {
  Launcher& l = g_launcher;
  // Fresh shared memory for the block, filled with 0xFF bytes: NaN in every float format.
  for (const SharedArray& a : l.shared->arrays) std::memset(a.address, 0xFF, a.bytes);
  if (shared_bytes > 0) std::memset(l.dynamic.get(), 0xFF, shared_bytes);

  for (size_t i = 0; i < block_threads; ++i) {
    GpuThread& t = l.threads[i];
    t = GpuThread{};
    t.state.thread_idx = {static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                          static_cast<unsigned>(i / (uint64_t{block.x} * block.y))};
    t.state.block_idx = block_idx;
    t.state.block_dim = block;
    t.state.grid_dim = grid;
    start_fiber(*l.fibers[i]);
  }

  std::vector<size_t> order;
  order.reserve(block_threads);
  while (true) {
    order.clear();
    for (size_t i = 0; i < block_threads; ++i) {
      if (l.threads[i].status == Status::kRunnable) order.push_back(i);
    }
    if (l.schedule == Schedule::kReverse) std::reverse(order.begin(), order.end());
    if (l.schedule == Schedule::kShuffle) std::shuffle(order.begin(), order.end(), l.rng);
    for (size_t i : order) {
      resume(i);
      TORCH_CHECK(l.error.empty(), "CUDA emulation: ", l.error);
    }
    size_t done = 0, at_barrier = 0;
    for (size_t i = 0; i < block_threads; ++i) {
      done += l.threads[i].status == Status::kDone;
      at_barrier += l.threads[i].status == Status::kAtBarrier;
    }
    if (done == block_threads) return;
    if (resolve_collectives(block_threads)) continue;
    // Threads that exited do not hold back a barrier (as on sm_70+); the rest must all be there.
    TORCH_CHECK(at_barrier == block_threads - done,
                "CUDA emulation: deadlock in block (", block_idx.x, ", ", block_idx.y, ", ", block_idx.z,
                "): some threads wait at __syncthreads while others wait at a warp collective");
    for (size_t i = 0; i < block_threads; ++i) {
      if (l.threads[i].status == Status::kAtBarrier) l.threads[i].status = Status::kRunnable;
    }
  }
}

}  // namespace

void sync_threads(const char* file, int line) {
  GpuThread& t = current_thread();
  t.status = Status::kAtBarrier;
  t.file = file;
  t.line = line;
  yield_to_scheduler(false);
}

uint64_t warp_collective(Collective kind, unsigned mask, uint64_t bits, int operand, int width, const char* file,
                         int line) {
  GpuThread& t = current_thread();
  t.status = Status::kAtCollective;
  t.kind = kind;
  t.mask = mask;
  t.bits = bits;
  t.operand = operand;
  t.width = width;
  t.file = file;
  t.line = line;
  yield_to_scheduler(false);
  return current_thread().result;
}

void device_assert_fail(const char* condition, const char* message, const char* file, int line) {
  Launcher& l = g_launcher;
  const ThreadState& s = current_thread().state;
  std::ostringstream text;
  text << "device-side assert triggered at " << where(file, line) << ": " << message << " (" << condition
       << ") in block (" << s.block_idx.x << ", " << s.block_idx.y << ", " << s.block_idx.z << "), thread ("
       << s.thread_idx.x << ", " << s.thread_idx.y << ", " << s.thread_idx.z << ")";
  if (l.error.empty()) l.error = text.str();
  current_thread().status = Status::kDone;
  yield_to_scheduler(true);
  __builtin_trap();  // never resumed: the scheduler throws l.error
}

unsigned char* dynamic_shared() { return g_launcher.dynamic.get(); }

void use_shared(void* address, size_t bytes, const char* file, int line) {
  Launcher& l = g_launcher;
  KernelShared& k = *l.shared;
  auto* p = static_cast<unsigned char*>(address);
  for (const SharedArray& a : k.arrays) {
    if (a.address == p) return;
  }
  k.arrays.push_back({p, bytes});
  k.bytes += bytes;
  std::memset(p, 0xFF, bytes);  // first reached in this block: nothing has written it yet
  if (k.bytes + l.dynamic_bytes > kMaxSharedBytes && l.error.empty()) {
    l.error = shared_limit_error(l.dynamic_bytes, k.bytes, "; the last array is declared at " + where(file, line));
    current_thread().status = Status::kDone;
    yield_to_scheduler(true);
    __builtin_trap();
  }
}

void run_grid(const Site& site, const char* instantiation, dim3 grid, dim3 block, size_t shared_bytes,
              void (*thread_body)(void*), void* context) {
  std::lock_guard<std::mutex> lock(g_mutex);
  check_launch(site, grid, block, shared_bytes);
  Launcher& l = g_launcher;
  const size_t block_threads = size_t{block.x} * block.y * block.z;
  while (l.fibers.size() < block_threads) l.fibers.push_back(std::make_unique<Fiber>());
  if (l.threads.size() < block_threads) l.threads.resize(block_threads);
  l.body = thread_body;
  l.context = context;
  l.error.clear();
  l.dynamic.reset(new unsigned char[std::max<size_t>(shared_bytes, 1)]);  // heap: ASan bounds-checks it
  l.dynamic_bytes = shared_bytes;
  l.site = where(site.file, site.line) + " (" + site.kernel + ")";
  l.shared = &g_kernel_shared[instantiation];
  TORCH_CHECK(l.shared->bytes + shared_bytes <= kMaxSharedBytes, "CUDA emulation: ",
              shared_limit_error(shared_bytes, l.shared->bytes));
  l.rng.seed(l.seed);

  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::vector<uint64_t> block_order;
  if (l.schedule != Schedule::kForward) {
    block_order.resize(blocks);
    std::iota(block_order.begin(), block_order.end(), uint64_t{0});
    if (l.schedule == Schedule::kReverse) std::reverse(block_order.begin(), block_order.end());
    if (l.schedule == Schedule::kShuffle) std::shuffle(block_order.begin(), block_order.end(), l.rng);
  }
  for (uint64_t n = 0; n < blocks; ++n) {
    const uint64_t b = block_order.empty() ? n : block_order[n];
    const uint3 idx{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                    static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    run_block(block_threads, block, grid, idx, shared_bytes);
  }

  SiteStats& s = g_stats[where(site.file, site.line)];
  s.file = relative(site.file);
  s.line = site.line;
  s.kernel = site.kernel;
  s.launches[instantiation] += 1;
  s.blocks += static_cast<int64_t>(blocks);
  s.threads += static_cast<int64_t>(blocks * block_threads);
}

// Function-local: it is filled by static initialisers, in any order across the library's files.
std::set<std::string>& compiled_instantiations() {
  static std::set<std::string> names;
  return names;
}

const char* register_instantiation(const char* name) {
  compiled_instantiations().insert(name);
  return name;
}

std::string instantiations_json() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::ostringstream out;
  out << "[";
  bool first = true;
  for (const auto& name : compiled_instantiations()) {
    out << (first ? "" : ", ") << json_string(name);
    first = false;
  }
  out << "]";
  return out.str();
}

// ---- Control, from Python (csrc/emu/library.cpp registers these as ops) -------------------------------
void set_schedule(const std::string& mode, int64_t seed) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (mode == "forward") {
    g_launcher.schedule = Schedule::kForward;
  } else if (mode == "reverse") {
    g_launcher.schedule = Schedule::kReverse;
  } else if (mode == "shuffle") {
    g_launcher.schedule = Schedule::kShuffle;
  } else {
    TORCH_CHECK(false, "CUDA emulation: schedule must be forward, reverse or shuffle, got '", mode, "'");
  }
  g_launcher.seed = static_cast<uint64_t>(seed);
}


std::string launch_stats() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::ostringstream out;
  out << "[";
  bool first_site = true;
  for (const auto& [key, s] : g_stats) {
    out << (first_site ? "" : ", ") << "{\"site\": " << json_string(key) << ", \"file\": " << json_string(s.file)
        << ", \"line\": " << s.line << ", \"kernel\": " << json_string(s.kernel) << ", \"blocks\": " << s.blocks
        << ", \"threads\": " << s.threads << ", \"instantiations\": {";
    bool first = true;
    for (const auto& [name, count] : s.launches) {
      out << (first ? "" : ", ") << json_string(name) << ": " << count;
      first = false;
    }
    out << "}}";
    first_site = false;
  }
  out << "]";
  return out.str();
}

void reset_launch_stats() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_stats.clear();
}

int64_t static_shared_bytes() {
  std::lock_guard<std::mutex> lock(g_mutex);
  size_t most = 0;
  for (const auto& [name, k] : g_kernel_shared) most = std::max(most, k.bytes);
  return static_cast<int64_t>(most);
}

}  // namespace emu
}  // namespace peftkern
