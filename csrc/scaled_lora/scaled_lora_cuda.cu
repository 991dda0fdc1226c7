// Scaled-LoRA fused kernels on CUDA (the GEMMs around them are cuBLAS through ATen, see
// scaled_lora_host.h). The per-element math is scaled_lora_math.h, shared with scaled_lora_cpu.cpp.
//
// The column reduction dl = Σ_rows a ⊙ b (dλ_b, dλ_d, dE) is a deterministic two-stage reduction,
// not float atomics (atomics would make dl depend on the order blocks finish): stage 1 writes one
// partial per (block of kCudaRowsPerBlock rows, column) into a [blocks, W] scratch buffer in the
// accumulation dtype, stage 2 adds each column's partials in block order. The same design as the
// IA³ reduction (csrc/ia3/ia3_cuda.cu); here with the scaling factors folded in.
#include "../common/cuda_launch.h"
#include <torch/library.h>

#include <algorithm>

#include "scaled_lora_host.h"
#include "scaled_lora_math.h"
#include "../common/cuda_guard.h"

namespace peftkern {
namespace scaled_lora {
namespace {

constexpr int kThreads = 256;
constexpr unsigned int kMaxGridY = PK_GRID_STRIDE_CAP(65535);
// scale_reduce stage 1: a block is kTileCols columns x kRowLanes row lanes.
constexpr int kTileCols = 32;
constexpr int kRowLanes = 8;

unsigned int grid_y(int64_t rows) {
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(rows, 1), kMaxGridY));
}

unsigned int column_tiles(int64_t w, int64_t tile) {
  const int64_t tiles = ceil_div(w, tile);
  TORCH_CHECK(tiles <= 0x7fffffff, "scaled_lora: too many columns (", w, ") for a 1-D grid");
  return static_cast<unsigned int>(tiles);
}

// out[i, j] = alpha·src[i, j]·l[j]. src and out contiguous [m, w] and possibly the same memory
// (each element is read, then written, by one thread: no restrict on those two); l [w] in Acc.
// Grid: x over column tiles of kThreads (thread = column, coalesced), y strides over rows.
template <typename T, typename Acc>
__global__ void scale_columns_kernel(const T* src,                // [m, w]
                                     const Acc* __restrict__ l,   // [w]
                                     Acc alpha, T* out,           // [m, w]
                                     int64_t m, int64_t w) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= w) return;
  for (int64_t i = blockIdx.y; i < m; i += gridDim.y) {
    out[i * w + j] = static_cast<T>(alpha * column_scaled<Acc>(static_cast<Acc>(src[i * w + j]), l, j));
  }
}

// out[i, j] += scaling·v[i, j]·l[j]: the forward epilogue, in place on the base GEMM's output.
// Layout: out and v contiguous [m, w], l [w] in Acc. Grid as scale_columns_kernel.
template <typename T, typename Acc>
__global__ void epilogue_kernel(T* __restrict__ out,          // [m, w], in/out
                                const T* __restrict__ v,      // [m, w]
                                Acc scaling,
                                const Acc* __restrict__ l,    // [w]
                                int64_t m, int64_t w) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= w) return;
  const Acc lj = l[j];
  for (int64_t i = blockIdx.y; i < m; i += gridDim.y) {
    const int64_t e = i * w + j;
    out[e] = static_cast<T>(add_scaled_term<Acc>(static_cast<Acc>(out[e]), static_cast<Acc>(v[e]), scaling, lj));
  }
}

// Stage 1 of scale_reduce: out[i, j] = out_alpha·a[i, j]·l[j] for every element, and
// partial[blk, j] = Σ_{i in row block blk} a[i, j]·b[i, j].
// Block: (kTileCols, kRowLanes) threads; blockIdx.x = column tile, blockIdx.y strides over row
// blocks of kCudaRowsPerBlock rows. Lane y sums rows y, y + kRowLanes, ... of the block in order,
// then lane 0 adds the kRowLanes lane sums in lane order (fixed: deterministic).
// Layout: a, b, out contiguous [m, w] (out may be a); partial [blocks, w] in Acc.
template <typename T, typename Acc>
__global__ void scale_reduce_partial_kernel(const T* a,                 // [m, w]
                                            const T* __restrict__ b,    // [m, w]
                                            const Acc* __restrict__ l,  // [w]
                                            Acc out_alpha, T* out,      // [m, w]
                                            Acc* __restrict__ partial,  // [blocks, w]
                                            int64_t m, int64_t w, int64_t blocks) {
  __shared__ Acc lane_sums[kRowLanes][kTileCols + 1];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
  const bool active = j < w;
  for (int64_t blk = blockIdx.y; blk < blocks; blk += gridDim.y) {
    const int64_t block_end = (blk + 1) * kCudaRowsPerBlock;
    const int64_t row_end = block_end < m ? block_end : m;
    Acc sum = 0;
    if (active) {
      for (int64_t i = blk * kCudaRowsPerBlock + threadIdx.y; i < row_end; i += kRowLanes) {
        const Acc av = static_cast<Acc>(a[i * w + j]);
        sum = reduce_term<Acc>(sum, av, static_cast<Acc>(b[i * w + j]));
        out[i * w + j] = static_cast<T>(out_alpha * column_scaled<Acc>(av, l, j));
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

// Stage 2: dl[j] = sum_alpha·Σ_blk partial[blk, j], in block order. One thread per column,
// grid-stride over columns. blocks may be 0 (no rows): dl is then 0.
template <typename Acc>
__global__ void scale_reduce_final_kernel(const Acc* __restrict__ partial,  // [blocks, w]
                                          Acc sum_alpha,
                                          Acc* __restrict__ dl,             // [w]
                                          int64_t w, int64_t blocks) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < w;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc total = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) total += partial[blk * w + j];
    dl[j] = sum_alpha * total;
  }
}

struct CudaKernels {
  static void scale_columns(const at::Tensor& src, const at::Tensor& l, double alpha, at::Tensor& out) {
    const int64_t m = src.size(0), w = src.size(1);
    if (m == 0 || w == 0) return;
    const dim3 grid(column_tiles(w, kThreads), grid_y(m));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scaled_lora_scale_columns", [&] {
      using Acc = acc_type<scalar_t>;
      PK_LAUNCH(grid, kThreads, 0, at::cuda::getCurrentCUDAStream(), scale_columns_kernel<scalar_t, Acc>)(
          src.const_data_ptr<scalar_t>(), l.const_data_ptr<Acc>(), static_cast<Acc>(alpha),
          out.data_ptr<scalar_t>(), m, w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void epilogue(at::Tensor& out, const at::Tensor& v, double scaling, const at::Tensor& l) {
    const int64_t m = out.size(0), w = out.size(1);
    if (m == 0 || w == 0) return;
    const dim3 grid(column_tiles(w, kThreads), grid_y(m));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scaled_lora_epilogue", [&] {
      using Acc = acc_type<scalar_t>;
      PK_LAUNCH(grid, kThreads, 0, at::cuda::getCurrentCUDAStream(), epilogue_kernel<scalar_t, Acc>)(
          out.mutable_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), static_cast<Acc>(scaling),
          l.const_data_ptr<Acc>(), m, w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void scale_reduce(const at::Tensor& a, const at::Tensor& b, const at::Tensor& l, double out_alpha,
                           double sum_alpha, at::Tensor& out, at::Tensor& dl) {
    const int64_t m = a.size(0), w = a.size(1);
    if (w == 0) return;
    const int64_t blocks = ceil_div(m, kCudaRowsPerBlock);
    at::Tensor partial = at::empty({blocks, w}, dl.options());  // scratch, fully written by stage 1
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "scaled_lora_scale_reduce", [&] {
      using Acc = acc_type<scalar_t>;
      if (blocks > 0) {
        const dim3 grid(column_tiles(w, kTileCols), grid_y(blocks));
        const dim3 block(kTileCols, kRowLanes);
        PK_LAUNCH(grid, block, 0, stream, scale_reduce_partial_kernel<scalar_t, Acc>)(
            a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), l.const_data_ptr<Acc>(),
            static_cast<Acc>(out_alpha), out.data_ptr<scalar_t>(), partial.mutable_data_ptr<Acc>(), m, w, blocks);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const unsigned int tiles = std::min<unsigned int>(column_tiles(w, kThreads), PK_GRID_STRIDE_CAP(65535u));
      PK_LAUNCH(tiles, kThreads, 0, stream, scale_reduce_final_kernel<Acc>)(
          partial.const_data_ptr<Acc>(), static_cast<Acc>(sum_alpha), dl.mutable_data_ptr<Acc>(), w, blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

using CudaOps = Ops<CudaKernels>;

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                       const at::Tensor& lora_b, const std::optional<at::Tensor>& rank_scale,
                                       const std::optional<at::Tensor>& out_scale, double scaling,
                                       double dropout_p, int64_t seed, int64_t offset) {
  const CudaDeviceGuard guard(x);
  return CudaOps::fwd(x, weight, bias, lora_a, lora_b, rank_scale, out_scale, scaling, dropout_p, seed, offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& xa, const std::optional<at::Tensor>& rank_scale,
    const std::optional<at::Tensor>& out_scale, double scaling, double dropout_p,
    int64_t seed, int64_t offset, std::array<bool, 4> output_mask) {
  const CudaDeviceGuard guard(x);
  return CudaOps::bwd(grad_out, x, weight, lora_a, lora_b, xa, rank_scale, out_scale, scaling, dropout_p, seed,
                      offset, output_mask);
}

}  // namespace
}  // namespace scaled_lora
}  // namespace peftkern

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("scaled_lora_linear_fwd", &peftkern::scaled_lora::fwd);
  m.impl("scaled_lora_linear_bwd", &peftkern::scaled_lora::bwd);
}
