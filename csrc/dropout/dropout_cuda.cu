// LoRA dropout kernels on CUDA (host code and checks: dropout_host.h; math: dropout_math.h,
// shared with dropout_cpu.cpp, so both draw the same decisions bit for bit).
//
// One thread per Philox block of 4 consecutive flat elements (one evaluation gives all four
// words), grid-stride over the blocks; element e = i·K + j of an [M, K] tensor, so a strided x
// draws what its contiguous copy would. Reads of strided x are uncoalesced; the LoRA inputs are
// contiguous rows in practice (x.reshape(-1, in)), where four neighbours are read per thread.
#include "../common/cuda_launch.h"
#include <torch/library.h>

#include <algorithm>

#include "../common/accumulate.h"
#include "../common/cuda_guard.h"
#include "dropout_host.h"
#include "dropout_math.h"

namespace peftkern {
namespace dropout {
namespace {

constexpr int kThreads = 256;
constexpr unsigned int kMaxBlocks = PK_GRID_STRIDE_CAP(65535u * 16u);

unsigned int grid_for(int64_t groups) {
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(ceil_div(groups, kThreads), 1), kMaxBlocks));
}

// The dropout passes, one Philox draw per block of 4 elements for both of its optional streams:
//   xd != nullptr:      xd[e] = x[e] ⊙ m · scale                  (lora_dropout; backward's xd)
//   grad_x != nullptr:  grad_x[e] += grad_xd[e] ⊙ m · scale       (accumulate; backward's grad_x)
// Layout: x [m, k] strides (s0, s1), grad_xd [m, k] strides (g0, g1); xd, grad_x contiguous [m, k].
// Which streams run is uniform across the grid (no divergence).
template <typename T, typename Acc>
__global__ void lora_dropout_kernel(const T* __restrict__ x, const T* __restrict__ grad_xd, T* __restrict__ xd,
                                    T* __restrict__ grad_x, int64_t numel, int64_t k, int64_t s0, int64_t s1,
                                    int64_t g0, int64_t g1, uint64_t seed, uint64_t offset, uint32_t threshold,
                                    Acc scale) {
  const int64_t groups = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const philox::Words w = philox::block_words(seed, offset, static_cast<uint64_t>(g));
    for (int l = 0; l < 4; ++l) {
      const int64_t e = 4 * g + l;
      if (e >= numel) break;
      const int64_t i = e / k, j = e % k;
      if (xd != nullptr) xd[e] = dropped<T, Acc>(x[i * s0 + j * s1], w.w[l], threshold, scale);
      if (grad_x != nullptr) {
        grad_x[e] = accumulated<T, Acc>(grad_x[e], grad_xd[i * g0 + j * g1], w.w[l], threshold, scale);
      }
    }
  }
}

// mask[e] = keep(word e). Layout: mask bool [numel] contiguous.
__global__ void lora_dropout_mask_kernel(bool* __restrict__ mask, int64_t numel, uint64_t seed, uint64_t offset,
                                         uint32_t threshold) {
  const int64_t groups = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const philox::Words w = philox::block_words(seed, offset, static_cast<uint64_t>(g));
    for (int l = 0; l < 4 && 4 * g + l < numel; ++l) mask[4 * g + l] = keep(w.w[l], threshold);
  }
}

// u[e] = uniform(word e). Layout: u float32 [numel] contiguous.
__global__ void philox_uniform_kernel(float* __restrict__ u, int64_t numel, uint64_t seed, uint64_t offset) {
  const int64_t groups = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const philox::Words w = philox::block_words(seed, offset, static_cast<uint64_t>(g));
    for (int l = 0; l < 4 && 4 * g + l < numel; ++l) u[4 * g + l] = philox::word_to_uniform(w.w[l]);
  }
}

// out[b, l] = word l of counter block groups[b]. Layout: groups int64 [n], out int64 [n, 4].
__global__ void philox_words_kernel(const int64_t* __restrict__ groups, int64_t* __restrict__ out, int64_t n,
                                    uint64_t seed, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < n; b += stride) {
    const philox::Words w = philox::block_words(seed, offset, static_cast<uint64_t>(groups[b]));
    for (int l = 0; l < 4; ++l) out[4 * b + l] = static_cast<int64_t>(w.w[l]);
  }
}

struct CudaKernels {
  // x -> xd (xd defined) and grad_xd accumulated into grad_x (grad_x defined); see the kernel.
  static void launch(const at::Tensor& x, at::Tensor* xd, const at::Tensor& grad_xd, at::Tensor* grad_x,
                     uint64_t seed, uint64_t offset, uint32_t threshold, double scale) {
    const int64_t numel = x.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout", [&] {
      using Acc = acc_type<scalar_t>;
      const auto stream = at::cuda::getCurrentCUDAStream();
      PK_LAUNCH(grid_for(ceil_div(numel, 4)), kThreads, 0, stream, lora_dropout_kernel<scalar_t, Acc>)(
          x.const_data_ptr<scalar_t>(), grad_xd.const_data_ptr<scalar_t>(),
          xd != nullptr ? xd->mutable_data_ptr<scalar_t>() : nullptr,
          grad_x != nullptr ? grad_x->mutable_data_ptr<scalar_t>() : nullptr, numel, x.size(1), x.stride(0),
          x.stride(1), grad_xd.stride(0), grad_xd.stride(1), seed, offset, threshold, static_cast<Acc>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void dropout(const at::Tensor& x, at::Tensor& out, uint64_t seed, uint64_t offset, uint32_t threshold,
                      double scale) {
    launch(x, &out, x, nullptr, seed, offset, threshold, scale);
  }

  static void accumulate(at::Tensor& out, const at::Tensor& x, uint64_t seed, uint64_t offset, uint32_t threshold,
                         double scale) {
    launch(x, nullptr, x, &out, seed, offset, threshold, scale);
  }

  static void backward(at::Tensor& grad_x, const at::Tensor& grad_xd, const at::Tensor& x, at::Tensor& xd,
                       uint64_t seed, uint64_t offset, uint32_t threshold, double scale) {
    launch(x, &xd, grad_xd, &grad_x, seed, offset, threshold, scale);
  }

  static void mask(at::Tensor& out, uint64_t seed, uint64_t offset, uint32_t threshold) {
    const int64_t numel = out.numel();
    PK_LAUNCH(grid_for(ceil_div(numel, 4)), kThreads, 0, at::cuda::getCurrentCUDAStream(), lora_dropout_mask_kernel)(
        out.mutable_data_ptr<bool>(), numel, seed, offset, threshold);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void uniform(at::Tensor& out, uint64_t seed, uint64_t offset) {
    const int64_t numel = out.numel();
    PK_LAUNCH(grid_for(ceil_div(numel, 4)), kThreads, 0, at::cuda::getCurrentCUDAStream(), philox_uniform_kernel)(
        out.mutable_data_ptr<float>(), numel, seed, offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void words(const at::Tensor& groups, at::Tensor& out, uint64_t seed, uint64_t offset) {
    const int64_t n = groups.numel();
    PK_LAUNCH(grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream(), philox_words_kernel)(
        groups.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), n, seed, offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

using CudaOps = Ops<CudaKernels>;

at::Tensor lora_dropout(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  const CudaDeviceGuard guard(x);
  return CudaOps::dropout(x, p, seed, offset);
}
void lora_dropout_accumulate(at::Tensor& out, const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  const CudaDeviceGuard guard(x);
  CudaOps::accumulate(out, x, p, seed, offset);
}
at::Tensor lora_dropout_backward(at::Tensor& grad_x, const at::Tensor& grad_xd, const at::Tensor& x, double p,
                                 int64_t seed, int64_t offset) {
  const CudaDeviceGuard guard(x);
  return CudaOps::backward(grad_x, grad_xd, x, p, seed, offset);
}
at::Tensor lora_dropout_mask(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  const CudaDeviceGuard guard(x);
  return CudaOps::mask(x, p, seed, offset);
}
at::Tensor philox_uniform(const at::Tensor& x, int64_t seed, int64_t offset) {
  const CudaDeviceGuard guard(x);
  return CudaOps::uniform(x, seed, offset);
}
at::Tensor philox_words(const at::Tensor& groups, int64_t seed, int64_t offset) {
  const CudaDeviceGuard guard(groups);
  return CudaOps::words(groups, seed, offset);
}

}  // namespace
}  // namespace dropout
}  // namespace peftkern

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("lora_dropout", &peftkern::dropout::lora_dropout);
  m.impl("lora_dropout_accumulate_", &peftkern::dropout::lora_dropout_accumulate);
  m.impl("lora_dropout_backward_", &peftkern::dropout::lora_dropout_backward);
  m.impl("lora_dropout_mask", &peftkern::dropout::lora_dropout_mask);
  m.impl("philox_uniform", &peftkern::dropout::philox_uniform);
  m.impl("philox_words", &peftkern::dropout::philox_words);
}
