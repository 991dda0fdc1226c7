// IA³ fused kernels on CUDA (the GEMMs around them are cuBLAS through ATen, see ia3_host.h).
// The per-element math is ia3_math.h, shared with ia3_cpu.cpp.
//
// The per-column reduction dl = Σ_rows a ⊙ b is a deterministic two-stage reduction, not float
// atomics: atomics would make dl depend on the order blocks finish (bit-different across runs),
// while here stage 1 writes one partial per (block of kCudaRowsPerBlock rows, column) into a
// [blocks, W] float32 scratch buffer (M/128 · W floats, a small fraction of the [M, W] pass
// itself) and stage 2 adds each column's partials in block order. Same result on every run.
#include "../common/cuda_launch.h"
#include <torch/library.h>

#include <algorithm>

#include "ia3_host.h"
#include "ia3_math.h"
#include "../common/cuda_guard.h"

namespace peftkern {
namespace ia3 {
namespace {

constexpr int kThreads = 256;
constexpr unsigned int kMaxGridY = PK_GRID_STRIDE_CAP(65535);
// scale_reduce stage 1: a block is kTileCols columns x kRowLanes row lanes.
constexpr int kTileCols = 32;
constexpr int kRowLanes = 8;

unsigned int grid_y(int64_t rows) {
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(rows, 1), kMaxGridY));
}

// out[i, j] = x[i, j] * l[j].
// Layout: x any strides (s0, s1), out contiguous [m, w], l [w] contiguous in Acc.
// Grid: x over column tiles of kThreads (thread = column, coalesced when s1 == 1), y strides
// over rows (no size limit on m). int64 indexing throughout.
template <typename T, typename Acc>
__global__ void scale_columns_kernel(const T* __restrict__ x,    // [m, w], strides (s0, s1)
                                     const Acc* __restrict__ l,  // [w]
                                     T* __restrict__ out,        // [m, w]
                                     int64_t m, int64_t w, int64_t s0, int64_t s1) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= w) return;
  const Acc lj = l[j];
  for (int64_t i = blockIdx.y; i < m; i += gridDim.y) {
    out[i * w + j] = static_cast<T>(scaled<Acc>(static_cast<Acc>(x[i * s0 + j * s1]), lj));
  }
}

// acc[i, j] <- acc[i, j] + bias[j] (bias may be null) and out[i, j] = acc[i, j] * l[j].
// Layout: acc and out contiguous [m, w], bias [w], l [w] in Acc. Grid as scale_columns_kernel.
template <typename T, typename Acc>
__global__ void bias_scale_kernel(T* __restrict__ acc,          // [m, w], in/out
                                  const T* __restrict__ bias,   // [w] or null
                                  const Acc* __restrict__ l,    // [w]
                                  T* __restrict__ out,          // [m, w]
                                  int64_t m, int64_t w) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= w) return;
  const Acc lj = l[j];
  for (int64_t i = blockIdx.y; i < m; i += gridDim.y) {
    const T pre = pre_scale_output<T, Acc>(acc[i * w + j], bias, j);
    if (bias != nullptr) acc[i * w + j] = pre;
    out[i * w + j] = static_cast<T>(scaled<Acc>(static_cast<Acc>(pre), lj));
  }
}

// Stage 1 of scale_reduce: out[i, j] = a[i, j] * l[j] for every element, and
// partial[blk, j] = Σ_{i in row block blk} a[i, j] * b[i, j].
// Block: (kTileCols, kRowLanes) threads; blockIdx.x = column tile, blockIdx.y strides over row
// blocks of kCudaRowsPerBlock rows. Lane y sums rows y, y + kRowLanes, ... of the block in order,
// then lane 0 adds the kRowLanes lane sums in lane order (fixed: deterministic).
// Layout: a, b any strides; out contiguous [m, w] and may be the same memory as a (each element
// is read, then written, by one thread: no restrict on those two); partial [blocks, w] in Acc.
template <typename T, typename Acc>
__global__ void scale_reduce_partial_kernel(const T* a, int64_t as0, int64_t as1,
                                            const T* __restrict__ b, int64_t bs0, int64_t bs1,
                                            const Acc* __restrict__ l,  // [w]
                                            T* out,                     // [m, w]
                                            Acc* __restrict__ partial,  // [blocks, w]
                                            int64_t m, int64_t w, int64_t blocks) {
  __shared__ Acc lane_sums[kRowLanes][kTileCols + 1];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
  const bool active = j < w;
  const Acc lj = active ? l[j] : Acc(0);
  for (int64_t blk = blockIdx.y; blk < blocks; blk += gridDim.y) {
    const int64_t block_end = (blk + 1) * kCudaRowsPerBlock;
    const int64_t row_end = block_end < m ? block_end : m;
    Acc sum = 0;
    if (active) {
      for (int64_t i = blk * kCudaRowsPerBlock + threadIdx.y; i < row_end; i += kRowLanes) {
        const Acc av = static_cast<Acc>(a[i * as0 + j * as1]);
        sum = reduce_term<Acc>(sum, av, static_cast<Acc>(b[i * bs0 + j * bs1]));
        out[i * w + j] = static_cast<T>(scaled<Acc>(av, lj));
      }
    }
    lane_sums[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && active) {
      Acc total = 0;
#pragma unroll
      for (int lane = 0; lane < kRowLanes; ++lane) total += lane_sums[lane][threadIdx.x];
      partial[blk * w + j] = total;
    }
    __syncthreads();  // lane_sums is reused by the next row block
  }
}

// Stage 2: dl[j] = Σ_blk partial[blk, j], in block order. One thread per column (coalesced).
// blocks may be 0 (no rows): dl is then 0.
template <typename Acc>
__global__ void scale_reduce_final_kernel(const Acc* __restrict__ partial,  // [blocks, w]
                                          Acc* __restrict__ dl,             // [w]
                                          int64_t w, int64_t blocks) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= w) return;
  Acc total = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) total += partial[blk * w + j];
  dl[j] = total;
}

unsigned int column_tiles(int64_t w, int64_t tile) {
  const int64_t tiles = ceil_div(w, tile);
  TORCH_CHECK(tiles <= 0x7fffffff, "ia3: too many columns (", w, ") for a 1-D grid");
  return static_cast<unsigned int>(tiles);
}

struct CudaKernels {
  static void scale_columns(const at::Tensor& x, const at::Tensor& l, at::Tensor& out) {
    const int64_t m = x.size(0), w = x.size(1);
    if (m == 0 || w == 0) return;
    const dim3 grid(column_tiles(w, kThreads), grid_y(m));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ia3_scale_columns", [&] {
      using Acc = acc_type<scalar_t>;
      PK_LAUNCH(grid, kThreads, 0, at::cuda::getCurrentCUDAStream(), scale_columns_kernel<scalar_t, Acc>)(
          x.const_data_ptr<scalar_t>(), l.const_data_ptr<Acc>(), out.mutable_data_ptr<scalar_t>(), m, w,
          x.stride(0), x.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void bias_scale(at::Tensor& acc, const at::Tensor& bias, const at::Tensor& l, at::Tensor& out) {
    const int64_t m = acc.size(0), w = acc.size(1);
    if (m == 0 || w == 0) return;
    const dim3 grid(column_tiles(w, kThreads), grid_y(m));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc.scalar_type(), "ia3_bias_scale", [&] {
      using Acc = acc_type<scalar_t>;
      PK_LAUNCH(grid, kThreads, 0, at::cuda::getCurrentCUDAStream(), bias_scale_kernel<scalar_t, Acc>)(
          acc.mutable_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
          l.const_data_ptr<Acc>(), out.mutable_data_ptr<scalar_t>(), m, w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void scale_reduce(const at::Tensor& a, const at::Tensor& b, const at::Tensor& l, at::Tensor& out,
                           at::Tensor& dl) {
    const int64_t m = a.size(0), w = a.size(1);
    if (w == 0) return;
    const int64_t blocks = ceil_div(m, kCudaRowsPerBlock);
    at::Tensor partial = at::empty({blocks, w}, dl.options());  // scratch, fully written by stage 1
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "ia3_scale_reduce", [&] {
      using Acc = acc_type<scalar_t>;
      if (blocks > 0) {
        const dim3 grid(column_tiles(w, kTileCols), grid_y(blocks));
        const dim3 block(kTileCols, kRowLanes);
        PK_LAUNCH(grid, block, 0, stream, scale_reduce_partial_kernel<scalar_t, Acc>)(
            a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1), b.const_data_ptr<scalar_t>(), b.stride(0),
            b.stride(1), l.const_data_ptr<Acc>(), out.data_ptr<scalar_t>(), partial.mutable_data_ptr<Acc>(), m,
            w, blocks);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      PK_LAUNCH(column_tiles(w, kThreads), kThreads, 0, stream, scale_reduce_final_kernel<Acc>)(
          partial.const_data_ptr<Acc>(), dl.mutable_data_ptr<Acc>(), w, blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

using CudaOps = Ops<CudaKernels>;

at::Tensor input_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& ia3_l) {
  const CudaDeviceGuard guard(x);
  return CudaOps::input_fwd(x, weight, bias, ia3_l);
}

std::tuple<at::Tensor, at::Tensor> input_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                             const at::Tensor& weight, const at::Tensor& ia3_l) {
  const CudaDeviceGuard guard(x);
  return CudaOps::input_bwd(grad_out, x, weight, ia3_l);
}

std::tuple<at::Tensor, at::Tensor> output_fwd(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias, const at::Tensor& ia3_l) {
  const CudaDeviceGuard guard(x);
  return CudaOps::output_fwd(x, weight, bias, ia3_l);
}

std::tuple<at::Tensor, at::Tensor> output_bwd(const at::Tensor& grad_out, const at::Tensor& pre,
                                              const at::Tensor& weight, const at::Tensor& ia3_l) {
  const CudaDeviceGuard guard(grad_out);
  return CudaOps::output_bwd(grad_out, pre, weight, ia3_l);
}

}  // namespace
}  // namespace ia3
}  // namespace peftkern

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("ia3_input_linear_fwd", &peftkern::ia3::input_fwd);
  m.impl("ia3_input_linear_bwd", &peftkern::ia3::input_bwd);
  m.impl("ia3_output_linear_fwd", &peftkern::ia3::output_fwd);
  m.impl("ia3_output_linear_bwd", &peftkern::ia3::output_bwd);
}
