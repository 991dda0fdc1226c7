// Grouped (mixed-adapter) kernels on CUDA. See grouped_host.h for the ops, their checks and the
// adapter chunks; the per-element math is grouped_math.h, shared with grouped_cpu.cpp.
//
// LoRA takes two launches per call of at most kMaxAdapters (32) adapters, whatever their number
// (punica's SGMV shrink/expand, written simply rather than tuned):
//   shrink: xa[t, j] = scaling[g]·Σ_k x[t, k]·A[g][j, k]   into a float32 (double) [T, R] scratch
//   expand: out[t, o] = base_out[t, o] + Σ_j xa[t, j]·B[g][o, j]
// with R the chunk's largest rank. The adapters are each its own tensors, as nn.Linear holds them
// (A [r_g, K], B [N, r_g], both contiguous): their pointers, ranks and scalings travel BY VALUE in
// the kernel-argument struct LoraChunkArgs (as apex's multi_tensor_apply does), so a call needs no
// device-side table: no allocation for it, no host-to-device copy, no sync. The kernels read the
// struct in place (__grid_constant__: indexing it by the row's adapter makes no local copy).
// Rows without an adapter (-1) are skipped by shrink and copied by expand (first chunk only); rows
// of another chunk's adapters are skipped by both, so every output element is written exactly once.
//
// row_adapter values are trusted (checking them on the host would cost a device sync): a value
// outside [-1, G) fires a device-side assert, and is never used as an index (row_action).
#include "../common/cuda_launch.h"
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "grouped_host.h"
#include "grouped_math.h"
#include "../common/cuda_guard.h"

namespace peftkern {
namespace grouped {
namespace {

constexpr int kWarp = 32;
constexpr int kShrinkThreads = 256;  // 8 warps
constexpr int kThreads = 256;
// Grid dimensions we launch at most; every kernel strides over the rest, so T is unbounded
// (gridDim.y/z are limited to 65535, and 65535 blocks fill any current GPU).
constexpr int64_t kMaxGridRows = PK_GRID_STRIDE_CAP(65535);

unsigned int grid_rows(int64_t rows) {
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(rows, 1), kMaxGridRows));
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // every lane holds the total
}

__device__ __forceinline__ int32_t row_adapter_at(const int32_t* row_adapter, int64_t t, int64_t adapters) {
  const int32_t g = row_adapter[t];
  CUDA_KERNEL_ASSERT_MSG(g >= -1 && g < adapters, "row_adapter value outside [-1, adapters)");
  return g;
}

// One chunk's adapters, a kernel argument passed by value: adapter first + l (l < count) has
// lora_A at a[l] (contiguous [rank[l], K]), lora_B at b[l] (contiguous [N, rank[l]]) and
// scaling[l]. Entries past count are unused (null).
template <typename W, typename Acc>
struct LoraChunkArgs {
  const W* a[kMaxAdapters];
  const W* b[kMaxAdapters];
  Acc scaling[kMaxAdapters];
  int64_t rank[kMaxAdapters];
  int64_t first;  // global index of entry 0
  int64_t count;  // entries in use, <= kMaxAdapters
  int64_t total;  // G, all adapters of the op: row_adapter values are in [-1, total)
};
// Kernel parameters are limited to 4 KB (in all, with the kernels' other ~80 bytes of arguments).
static_assert(sizeof(LoraChunkArgs<double, double>) <= 2048, "LoraChunkArgs must stay well under 4 KB");

// Shrink: xa[t, j] = scaling[g]·Σ_k x[t, k]·A[g][j, k] for each row t whose adapter g is in the chunk.
// Assumes: x any strides (xs0, xs1); A[g] contiguous [r_g, K]; xa contiguous rows of xa_stride >= r_g
// Acc values; blockDim.x a multiple of 32. Grid: 1-D, gridDim.x <= 65535 blocks striding over rows
// (one block per row at a time; g, hence every branch below, is uniform across the block). Warp w
// computes rank rows j = w, w + warps, ... < r_g; its lanes stride over k (reads of A[g][j, :], and
// of x when xs1 == 1, are coalesced; the x row is re-read from L1/L2 for each j), then a shuffle
// reduction. Other rows are skipped: expand never reads their xa row in this chunk.
template <typename T, typename W, typename Acc>
__global__ void lora_shrink_kernel(const T* __restrict__ x, int64_t xs0, int64_t xs1,
                                   const int32_t* __restrict__ row_adapter,  // [T]
                                   Acc* __restrict__ xa, int64_t xa_stride,  // [T, xa_stride]
                                   int64_t rows, int64_t k, const __grid_constant__ LoraChunkArgs<W, Acc> chunk) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  for (int64_t t = blockIdx.x; t < rows; t += gridDim.x) {
    const int32_t g = row_adapter_at(row_adapter, t, chunk.total);
    if (row_action(g, chunk.first, chunk.count, chunk.total) != RowAction::kAdapter) continue;
    const int64_t l = g - chunk.first;
    const int64_t rank = chunk.rank[l];
    const W* a = chunk.a[l];
    const Acc s = chunk.scaling[l];
    const T* x_row = x + t * xs0;
    for (int64_t j = warp; j < rank; j += warps) {
      const W* a_row = a + j * k;
      Acc sum = 0;
      for (int64_t c = lane; c < k; c += kWarp) sum += static_cast<Acc>(x_row[c * xs1]) * static_cast<Acc>(a_row[c]);
      sum = warp_sum(sum);
      if (lane == 0) xa[t * xa_stride + j] = s * sum;
    }
  }
}

// Expand: out[t, o] = base_out[t, o] + Σ_j xa[t, j]·B[g][o, j] (rounded once) for a row whose adapter
// g is in the chunk; base_out[t, o] for a row without an adapter when chunk.first == 0; nothing for
// the other rows (another chunk's).
// Assumes: base_out any strides (bs0, bs1); xa as shrink wrote it (the rows of this chunk's
// adapters); B[g] contiguous [N, r_g], so thread o reads B[g][o·r_g + j], j < r_g; out contiguous
// [T, N]. Grid: x = column tiles of blockDim.x (thread = output column o: the writes of out are
// coalesced, the reads of B[g] span r_g·blockDim.x contiguous values per row, each a broadcast of
// xa[t, j] across the block), y <= 65535 striding over rows. No shared memory, no __syncthreads
// (so the early return of the threads past N is safe).
template <typename T, typename W, typename Acc>
__global__ void lora_expand_kernel(const T* __restrict__ base_out, int64_t bs0, int64_t bs1,
                                   const Acc* __restrict__ xa, int64_t xa_stride,  // [T, xa_stride]
                                   const int32_t* __restrict__ row_adapter,       // [T]
                                   T* __restrict__ out,                           // [T, N]
                                   int64_t rows, int64_t n, const __grid_constant__ LoraChunkArgs<W, Acc> chunk) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= n) return;
  for (int64_t t = blockIdx.y; t < rows; t += gridDim.y) {
    const int32_t g = row_adapter_at(row_adapter, t, chunk.total);
    const RowAction action = row_action(g, chunk.first, chunk.count, chunk.total);
    if (action == RowAction::kSkip) continue;
    const T base = base_out[t * bs0 + o * bs1];
    if (action == RowAction::kCopyBase) {
      out[t * n + o] = base;
      continue;
    }
    const int64_t l = g - chunk.first;
    const int64_t rank = chunk.rank[l];
    const W* b_row = chunk.b[l] + o * rank;
    const Acc* xa_row = xa + t * xa_stride;
    Acc lora = 0;
    for (int64_t j = 0; j < rank; ++j) lora += xa_row[j] * static_cast<Acc>(b_row[j]);
    out[t * n + o] = lora_output<T, Acc>(base, lora);
  }
}

// IA³: out[r, f] = t[r, f]·scales[g, f] (rounded once) for a row r with an adapter g, else t[r, f].
// Assumes: scales contiguous [G, F] in Acc; t any strides (s0, s1); out contiguous [T, F].
// Grid: 1-D grid-stride loop over the T·F output elements (int64 indices; consecutive threads
// write consecutive elements of a row).
template <typename T, typename Acc>
__global__ void ia3_grouped_kernel(const T* __restrict__ t, int64_t s0, int64_t s1,
                                   const Acc* __restrict__ scales,          // [G, F]
                                   const int32_t* __restrict__ row_adapter,  // [T]
                                   T* __restrict__ out,                     // [T, F]
                                   int64_t rows, int64_t width, int64_t adapters) {
  const int64_t total = rows * width;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t r = i / width, f = i % width;
    const int32_t g = row_adapter_at(row_adapter, r, adapters);
    const T v = t[r * s0 + f * s1];
    out[i] = has_adapter(g, adapters) ? ia3_scaled<T, Acc>(v, scales[static_cast<int64_t>(g) * width + f]) : v;
  }
}

unsigned int column_tiles(int64_t n, int64_t tile) {
  const int64_t tiles = ceil_div(n, tile);
  TORCH_CHECK(tiles <= 0x7fffffff, "lora_grouped_fwd: too many columns (", n, ") for a 1-D grid");
  return static_cast<unsigned int>(tiles);
}

struct CudaKernels {
  // One chunk of <= kMaxAdapters adapters; T > 0 and N > 0 (grouped_host.h returns before otherwise).
  // Two launches on the current stream (one when every rank of the chunk is 0).
  static void lora(const at::Tensor& base_out, const at::Tensor& x, const LoraChunk& chunk,
                   const at::Tensor& row_adapter, at::Tensor& out) {
    constexpr const char* op = "lora_grouped_fwd";
    const int64_t rows = x.size(0), k = x.size(1), n = out.size(1), count = chunk.count();
    TORCH_CHECK(count <= kMaxAdapters, op, ": internal error: a chunk of ", count, " adapters");
    const int64_t max_rank = chunk.max_rank();
    const auto stream = at::cuda::getCurrentCUDAStream();
    // Scratch, written by shrink for every row of the chunk's adapters; the only rows expand reads.
    // Stream-ordered by the caching allocator, so it may be freed right after the launches.
    at::Tensor xa = at::empty({rows, max_rank}, x.options().dtype(acc_dtype(x.scalar_type())));
    dispatch_lora_dtypes(x.scalar_type(), chunk.weight_dtype(x.scalar_type()), [&]<typename T, typename W>() {
      using Acc = acc_type<T>;
      LoraChunkArgs<W, Acc> args{};  // value-initialised: unused entries null / 0
      for (int64_t l = 0; l < count; ++l) {
        args.a[l] = chunk.a[l].const_data_ptr<W>();
        args.b[l] = chunk.b[l].const_data_ptr<W>();
        args.scaling[l] = static_cast<Acc>(chunk.scaling[l]);
        args.rank[l] = chunk.rank(l);
      }
      args.first = chunk.first;
      args.count = count;
      args.total = chunk.total;
      const int32_t* ra = row_adapter.const_data_ptr<int32_t>();
      if (max_rank > 0) {  // all ranks 0 (or no adapter): xa is empty and every LoRA term is 0
        PK_LAUNCH(grid_rows(rows), kShrinkThreads, 0, stream, lora_shrink_kernel<T, W, Acc>)(
            x.const_data_ptr<T>(), x.stride(0), x.stride(1), ra, xa.mutable_data_ptr<Acc>(), max_rank, rows, k, args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const dim3 grid(column_tiles(n, kThreads), grid_rows(rows));
      PK_LAUNCH(grid, kThreads, 0, stream, lora_expand_kernel<T, W, Acc>)(
          base_out.const_data_ptr<T>(), base_out.stride(0), base_out.stride(1), xa.const_data_ptr<Acc>(), max_rank,
          ra, out.mutable_data_ptr<T>(), rows, n, args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // T > 0 and F > 0.
  static void ia3(const at::Tensor& t, const at::Tensor& scales, const at::Tensor& row_adapter, at::Tensor& out) {
    const int64_t rows = t.size(0), width = t.size(1), adapters = scales.size(0);
    // Enough blocks to fill the GPU several times over; the loop strides over the rest.
    const int64_t blocks = std::min<int64_t>(ceil_div(rows * width, kThreads), PK_GRID_STRIDE_CAP(65535 * 8));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "ia3_grouped_scale", [&] {
      using Acc = acc_type<scalar_t>;
      PK_LAUNCH(static_cast<unsigned int>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream(), ia3_grouped_kernel<scalar_t, Acc>)(
          t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1), scales.const_data_ptr<Acc>(),
          row_adapter.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(), rows, width, adapters);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

using CudaOps = Ops<CudaKernels>;

at::Tensor lora_fwd(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a, at::TensorList lora_b,
                    c10::ArrayRef<double> scaling, const at::Tensor& row_adapter) {
  const CudaDeviceGuard guard(x);
  return CudaOps::lora_fwd(base_out, x, lora_a, lora_b, scaling, row_adapter);
}

at::Tensor ia3_scale(const at::Tensor& t, const at::Tensor& scales, const at::Tensor& row_adapter) {
  const CudaDeviceGuard guard(t);
  return CudaOps::ia3_scale(t, scales, row_adapter);
}

}  // namespace
}  // namespace grouped
}  // namespace peftkern

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("lora_grouped_fwd", &peftkern::grouped::lora_fwd);
  m.impl("ia3_grouped_scale", &peftkern::grouped::ia3_scale);
}
