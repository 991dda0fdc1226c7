// CUDA's execution model for the host compiler: the same .cu source that nvcc compiles, built as
// C++ with -DPEFTKERN_CUDA_EMULATION (tests only, never shipped), runs its kernels on CPU tensors.
// Included through common/cuda_launch.h, never directly.
//
// The model (DESIGN.md "CUDA kernels on the CPU"):
// - Each GPU thread of a block is a fiber (runtime.cpp); blocks run one after another. A thread
//   runs until its next barrier or warp collective (__syncthreads, __syncwarp, __shfl_*_sync) or
//   its end, then the next thread of the schedule runs. The schedule (in order, reversed, seeded
//   shuffles of the threads between barriers and of the blocks) is chosen per launch from Python,
//   so a missing barrier shows up as a result that depends on it.
// - __shared__ variables are block-static storage (blocks run one at a time). The build rewrites
//   each declaration `__shared__ T name[n];` of a .cu file into `static T name[n];` followed by
//   `use_shared(name)` on the same line (peftkern/emulation.py; `extern __shared__ T name[];`
//   becomes a pointer to the launch's dynamic shared memory), so the runtime knows every kernel's
//   shared arrays: it fills them with 0xFF bytes (NaN in every float format) at the start of every
//   block, so a read before the write that a barrier should order sees poison, not a stale value,
//   and it counts their bytes against the 48 KiB limit.
// - Warp collectives are checked as CUDA defines them: every lane named in the mask must reach the
//   same collective with the same mask; a lane that left, waits at another barrier, or reads from a
//   lane outside the mask is an error, not a guess.
// - Launch limits are enforced: <= 1024 threads a block (x, y <= 1024, z <= 64), grid.y / grid.z
//   <= 65535, grid.x < 2^31, no zero dimension, dynamic + static shared memory <= 48 KiB, kernel
//   arguments <= 4 KiB. A device-side assert aborts the launch with its message.
// What it cannot see: performance, coalescing, FMA contraction choices of nvcc (the host build
// runs with -ffp-contract=off, like the CPU kernels), warp-synchronous code that relies on
// lockstep execution without a collective (it is a race here, as it is on Volta and later).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// --- Qualifiers ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
// Every __shared__ declaration is rewritten before compilation; one left over is a build error.
#define __shared__ PK_EMU_SHARED_DECLARATION_NOT_REWRITTEN

// --- Vector types, with CUDA's alignment (a misaligned vector access is UB, which UBSan reports) -
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

namespace peftkern {
namespace emu {

// The state of the GPU thread running now (set by the runtime around every fiber switch).
struct ThreadState {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern thread_local const ThreadState* g_current;

// Warp collectives and barriers: the calling fiber parks until the runtime resolves the sync.
enum class Collective { kShflIdx, kShflUp, kShflDown, kShflXor, kSyncWarp };
void sync_threads(const char* file, int line);
uint64_t warp_collective(Collective kind, unsigned mask, uint64_t bits, int operand, int width, const char* file,
                         int line);
[[noreturn]] void device_assert_fail(const char* condition, const char* message, const char* file, int line);

template <typename T>
T shuffle(Collective kind, unsigned mask, T value, int operand, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffled values are at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_collective(kind, mask, bits, operand, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// --- Launch -------------------------------------------------------------------------------------
// One launch site, as PK_LAUNCH wrote it.
struct Site {
  const char* file;
  int line;
  const char* kernel;  // the kernel expression at the site, e.g. "nf4_quantize_kernel<scalar_t>"
};

// Runs every block of the grid, each GPU thread calling `thread_body(context)`; throws c10::Error
// for a launch CUDA would refuse, a device-side assert, or a divergent / deadlocked collective.
void run_grid(const Site& site, const char* instantiation, dim3 grid, dim3 block, size_t shared_bytes,
              void (*thread_body)(void*), void* context);

template <typename... Params>
class Launch {
 public:
  Launch(Site site, const char* instantiation, dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(Params...))
      : site_(site), instantiation_(instantiation), grid_(grid), block_(block), shared_bytes_(shared_bytes),
        kernel_(kernel) {}

  // Kernel arguments are copied once, by value, as a launch copies them to the parameter space;
  // each GPU thread then calls the kernel with its own copy (parameters are per-thread values).
  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    using Tuple = std::tuple<std::decay_t<Params>...>;
    static_assert(sizeof(Tuple) <= 4096, "kernel parameters are limited to 4 KiB");
    struct Context {
      void (*kernel)(Params...);
      Tuple args;
    } context{kernel_, Tuple(static_cast<std::decay_t<Params>>(std::forward<Args>(args))...)};
    auto body = [](void* raw) {
      auto* c = static_cast<Context*>(raw);
      Tuple copy = c->args;
      std::apply(c->kernel, copy);
    };
    run_grid(site_, instantiation_, grid_, block_, shared_bytes_, body, &context);
  }

 private:
  Site site_;
  const char* instantiation_;
  dim3 grid_, block_;
  size_t shared_bytes_;
  void (*kernel_)(Params...);
};

// The kernel instantiation's name at one launch line, template arguments included (e.g. "...
// [with auto Kernel = ...::nf4_lora_gemv_kernel<float, 8>; int Line = 154]"): the coverage report
// lists the instantiations that ran, per launch site.
template <auto Kernel, int Line>
const char* kernel_name() {
  return __PRETTY_FUNCTION__;
}

// Adds a compiled kernel instantiation to the list the coverage report checks; returns its name.
const char* register_instantiation(const char* name);

// One per kernel instantiation that a launch site compiles (every dtype branch of a dispatch), its
// name registered when the library loads: so the report knows what should have run, not only
// what did.
template <auto Kernel, int Line>
struct Instantiation {
  static inline const char* const name = register_instantiation(kernel_name<Kernel, Line>());
};

struct LaunchSite {
  Site site;
  dim3 grid, block;
  size_t shared_bytes;
  const char* instantiation;
  template <typename... Params>
  Launch<Params...> operator<<(void (*kernel)(Params...)) const {
    return Launch<Params...>(site, instantiation, grid, block, shared_bytes, kernel);
  }
};

// Dynamic shared memory of the running launch (zero-size launches get a valid empty buffer).
unsigned char* dynamic_shared();
// Called where a rewritten __shared__ declaration stands, by every GPU thread that reaches it: the
// first time a kernel reaches it, the array is added to that kernel's shared arrays (poisoned now
// and at every later block start) and the kernel's shared bytes are checked against the limit.
void use_shared(void* address, size_t bytes, const char* file, int line);
// The grid-stride cap under emulation: a few blocks, so small shapes stride.
constexpr int64_t kEmulatedGridStrideCap = 3;

struct Stream {};  // what at::cuda::getCurrentCUDAStream() returns here; never used

}  // namespace emu
}  // namespace peftkern

// --- Built-in variables ---------------------------------------------------------------------------
#define threadIdx (::peftkern::emu::g_current->thread_idx)
#define blockIdx (::peftkern::emu::g_current->block_idx)
#define blockDim (::peftkern::emu::g_current->block_dim)
#define gridDim (::peftkern::emu::g_current->grid_dim)
constexpr int warpSize = 32;

// --- Barriers, warp collectives, assertions -------------------------------------------------------
#define __syncthreads() ::peftkern::emu::sync_threads(__FILE__, __LINE__)
#define __syncwarp(...)                                                                                    \
  ((void)::peftkern::emu::warp_collective(::peftkern::emu::Collective::kSyncWarp, PK_EMU_MASK(__VA_ARGS__), 0, \
                                          0, 32, __FILE__, __LINE__))
#define PK_EMU_MASK(...) PK_EMU_MASK_(__VA_ARGS__ __VA_OPT__(, ) 0xffffffffu, 0)
#define PK_EMU_MASK_(m, ...) (m)
#define PK_EMU_SHFL(kind, mask, var, operand, ...)                                                     \
  ::peftkern::emu::shuffle(::peftkern::emu::Collective::kind, (mask), (var), (operand), PK_EMU_WIDTH(__VA_ARGS__), \
                           __FILE__, __LINE__)
#define PK_EMU_WIDTH(...) PK_EMU_MASK_(__VA_ARGS__ __VA_OPT__(, ) 32, 0)
#define __shfl_sync(mask, var, src, ...) PK_EMU_SHFL(kShflIdx, mask, var, src, __VA_ARGS__)
#define __shfl_up_sync(mask, var, delta, ...) PK_EMU_SHFL(kShflUp, mask, var, delta, __VA_ARGS__)
#define __shfl_down_sync(mask, var, delta, ...) PK_EMU_SHFL(kShflDown, mask, var, delta, __VA_ARGS__)
#define __shfl_xor_sync(mask, var, lane_mask, ...) PK_EMU_SHFL(kShflXor, mask, var, lane_mask, __VA_ARGS__)

#undef CUDA_KERNEL_ASSERT
#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT(cond) \
  ((cond) ? (void)0 : ::peftkern::emu::device_assert_fail(#cond, "", __FILE__, __LINE__))
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) \
  ((cond) ? (void)0 : ::peftkern::emu::device_assert_fail(#cond, msg, __FILE__, __LINE__))

// --- Device functions CUDA declares globally ------------------------------------------------------
// min / max overloads as CUDA's math headers declare them (same-type arguments in our kernels).
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// --- Host-side runtime API that the .cu files' host code calls ------------------------------------
namespace at {
namespace cuda {
struct EmulatedDeviceProp {
  int multiProcessorCount = 1;  // small, so grids capped by "SMs × k" stride in small tests
  int warpSize = 32;
  int maxThreadsPerBlock = 1024;
};
inline const EmulatedDeviceProp* getCurrentDeviceProperties() {
  static const EmulatedDeviceProp prop;
  return &prop;
}
inline ::peftkern::emu::Stream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace at

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)  // an emulated launch reports its errors by throwing

// --- The spellings of common/cuda_launch.h ----------------------------------------------------------
#define PK_LAUNCH(grid, block, shared_bytes, stream, ...)                                                 \
  (::peftkern::emu::LaunchSite{{__FILE__, __LINE__, #__VA_ARGS__}, dim3(grid), dim3(block),               \
                               static_cast<size_t>(shared_bytes), ::peftkern::emu::Instantiation<__VA_ARGS__, __LINE__>::name} \
   << __VA_ARGS__)
#define PK_GRID_STRIDE_CAP(n) \
  ((n) < ::peftkern::emu::kEmulatedGridStrideCap ? (n) : ::peftkern::emu::kEmulatedGridStrideCap)
#define PK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(peftkern_emu, CPU, m)
