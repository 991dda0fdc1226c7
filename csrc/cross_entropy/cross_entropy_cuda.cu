// CUDA kernels of the fused cross-entropy ops. Same checks (cross_entropy_host.h) and per-row math
// (cross_entropy_math.h) as cross_entropy_cpu.cpp.
//
// Forward: one block per row (grid-stride over rows); the block reads the row twice (max, then
// sum of exp(z - max); the row stays in L2 between) and reduces each in a fixed-order tree, so the
// result is the same on every run. Backward: one block per row, each thread writing its strided
// logits' gradients; no reduction, no barrier. Ignored rows (label == ignore_index) read nothing.
// Assumes: logits' column stride 1 (the host copies otherwise); vocab < 2^31 not needed (int64
// indices throughout).
#include "../common/cuda_launch.h"
#include <torch/library.h>

#include <algorithm>

#include "../common/cuda_block_reduce.h"
#include "../common/cuda_guard.h"
#include "../common/dispatch.h"
#include "cross_entropy_host.h"

namespace peftkern {
namespace cross_entropy {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = PK_GRID_STRIDE_CAP(65535);

struct Max {
  __device__ float operator()(float a, float b) const { return b > a ? b : a; }  // NaN dropped (see the sum)
};

template <typename T>
__global__ void cross_entropy_fwd_kernel(const T* __restrict__ logits,        // [rows, vocab], row stride `stride`
                                         const int64_t* __restrict__ labels,  // [rows]
                                         float* __restrict__ loss,            // [rows]
                                         float* __restrict__ lse,             // [rows]
                                         int64_t rows, int64_t vocab, int64_t stride, int64_t ignore_index) {
  __shared__ float scratch[kThreads];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t y = labels[r];
    if (is_ignored(y, ignore_index)) {  // the same branch for the whole block: no barrier skipped by some
      if (threadIdx.x == 0) loss[r] = lse[r] = 0.0f;
      continue;
    }
    const T* z = logits + r * stride;
    float m = -INFINITY;
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) m = Max{}(m, static_cast<float>(z[v]));
    const float row_max = cuda::block_reduce<kThreads>(m, scratch, Max{});
    float s = 0.0f;
    if (row_max != -INFINITY) {
      for (int64_t v = threadIdx.x; v < vocab; v += kThreads) s += expf(static_cast<float>(z[v]) - row_max);
    }
    const float sum = cuda::block_reduce<kThreads>(s, scratch, cuda::Add{});
    if (threadIdx.x == 0) {
      const float l = row_lse(row_max, sum);
      lse[r] = l;
      loss[r] = label_in_range(y, vocab) ? l - static_cast<float>(z[y]) : NAN;
    }
  }
}

template <typename T>
__global__ void cross_entropy_bwd_kernel(const float* __restrict__ grad_loss,  // [rows]
                                         const T* __restrict__ logits,         // [rows, vocab], row stride `stride`
                                         const int64_t* __restrict__ labels,   // [rows]
                                         const float* __restrict__ lse,        // [rows]
                                         T* __restrict__ out,                  // [rows, vocab], contiguous
                                         int64_t rows, int64_t vocab, int64_t stride, int64_t ignore_index) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t y = labels[r];
    T* o = out + r * vocab;
    if (is_ignored(y, ignore_index)) {
      for (int64_t v = threadIdx.x; v < vocab; v += kThreads) o[v] = T(0.0f);
      continue;
    }
    const T* z = logits + r * stride;
    const float g = grad_loss[r], l = lse[r];
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      o[v] = static_cast<T>(logit_grad(expf(static_cast<float>(z[v]) - l), v == y, g));
    }
  }
}

unsigned int grid_for(int64_t rows) { return static_cast<unsigned int>(std::min<int64_t>(rows, kMaxGrid)); }

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                          int64_t ignore_index) {
  const CudaDeviceGuard guard(logits);
  Forward f = check_and_allocate_fwd(logits, labels, ignore_index);
  const Args& a = f.in.args;
  if (a.rows == 0) return {f.loss, f.lse};
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(a.dtype, "cross_entropy_fwd_cuda", [&] {
    PK_LAUNCH(grid_for(a.rows), kThreads, 0, at::cuda::getCurrentCUDAStream(), cross_entropy_fwd_kernel<scalar_t>)(static_cast<const scalar_t*>(a.logits), a.labels, f.loss.mutable_data_ptr<float>(), f.lse.mutable_data_ptr<float>(), a.rows, a.vocab, a.stride, a.ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {f.loss, f.lse};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& lse, int64_t ignore_index) {
  const CudaDeviceGuard guard(logits);
  Backward b = check_and_allocate_bwd(grad_loss, logits, labels, lse, ignore_index);
  const Args& a = b.in.args;
  if (b.out.numel() == 0) return b.out;
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(a.dtype, "cross_entropy_bwd_cuda", [&] {
    PK_LAUNCH(grid_for(a.rows), kThreads, 0, at::cuda::getCurrentCUDAStream(), cross_entropy_bwd_kernel<scalar_t>)(b.grad_loss.const_data_ptr<float>(), static_cast<const scalar_t*>(a.logits), a.labels, b.lse.const_data_ptr<float>(), b.out.mutable_data_ptr<scalar_t>(), a.rows, a.vocab, a.stride, a.ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return b.out;
}

}  // namespace
}  // namespace cross_entropy
}  // namespace peftkern

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("cross_entropy_fwd", &peftkern::cross_entropy::cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &peftkern::cross_entropy::cross_entropy_bwd_cuda);
}
