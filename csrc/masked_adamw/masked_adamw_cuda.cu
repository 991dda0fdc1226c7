// CUDA kernels of the fused masked AdamW. Same checks (masked_adamw_host.h) and per-element math
// (masked_adamw_math.h) as masked_adamw_cpu.cpp, so the CPU tests prove the arithmetic and this
// file only has to get the indexing right.
//
// One thread per group of 4 elements (one Philox block: F draws it once for its 4 decisions; D
// reads one nibble of the mask), grid-striding over the groups. The op is memory-bound (28 bytes
// per fp32 element: param, grad, two moments), so the plain per-element loads coalesce across
// the warp and nothing is staged in shared memory.
#include "../common/cuda_guard.h"
#include "../common/cuda_launch.h"
#include <torch/library.h>

#include <algorithm>

#include "../common/dispatch.h"
#include "masked_adamw_host.h"

namespace peftkern {
namespace masked_adamw {
namespace {

constexpr int kThreads = 256;

// The factors of group q's (up to) 4 elements: see Mask in masked_adamw_math.h.
__device__ __forceinline__ void group_factors(const Mask& mask, int64_t q, float factor[4]) {
  if (mask.bits != nullptr) {
#pragma unroll
    for (int j = 0; j < 4; ++j) factor[j] = bit_at(mask.bits, 4 * q + j) ? 1.0f : 0.0f;
  } else if (!mask.draws()) {
#pragma unroll
    for (int j = 0; j < 4; ++j) factor[j] = mask.keep_scale;
  } else {
    const philox::Words w = philox::block_words(mask.seed, mask.offset, static_cast<uint64_t>(q));
#pragma unroll
    for (int j = 0; j < 4; ++j) factor[j] = keep_from_word(w.w[j], mask.reserve_p) ? mask.keep_scale : 0.0f;
  }
}

// In place on param, exp_avg, exp_avg_sq. Layout: every array contiguous [n]; bits [ceil(n / 8)]
// (a mask byte may be read for elements past n in the last group: it exists, their factor is unused).
template <typename P>
__global__ void masked_adamw_kernel(P* __restrict__ param,            // [n]
                                    const P* __restrict__ grad,       // [n]
                                    float* __restrict__ exp_avg,      // [n]
                                    float* __restrict__ exp_avg_sq,   // [n]
                                    Mask mask, Constants constants, int64_t n) {
  const int64_t groups = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < groups; q += stride) {
    float factor[4];
    group_factors(mask, q, factor);
    const int64_t first = 4 * q;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t e = first + j;
      if (e < n) update<P>(param[e], grad[e], exp_avg[e], exp_avg_sq[e], factor[j], constants);
    }
  }
}

// keep[e] = F's decision for element e (the mask masked_adamw_kernel applies), bool [n].
__global__ void masked_adamw_keep_mask_kernel(bool* __restrict__ keep, Mask mask, int64_t n) {
  const int64_t groups = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < groups; q += stride) {
    float factor[4];
    group_factors(mask, q, factor);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (4 * q + j < n) keep[4 * q + j] = factor[j] != 0.0f;
    }
  }
}

unsigned int grid_for(int64_t n) {
  const int64_t blocks = ceil_div(ceil_div(n, 4), kThreads);
  return static_cast<unsigned int>(std::min<int64_t>(blocks, PK_GRID_STRIDE_CAP(int64_t{1} << 20)));
}

void masked_adamw_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_sq, const c10::optional<at::Tensor>& mask_bits, double reserve_p,
                       int64_t seed, int64_t offset, double lr, double beta1, double beta2, double eps,
                       double weight_decay, double step_size) {
  const CudaDeviceGuard guard(param);
  const StepArgs args = check_step(param, grad, exp_avg, exp_avg_sq, mask_bits, reserve_p, seed, offset, lr, beta1,
                                   beta2, eps, weight_decay, step_size);
  if (args.numel == 0) return;
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(param.scalar_type(), "masked_adamw_", [&] {
    PK_LAUNCH(grid_for(args.numel), kThreads, 0, at::cuda::getCurrentCUDAStream(), masked_adamw_kernel<scalar_t>)(param.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), exp_avg.mutable_data_ptr<float>(), exp_avg_sq.mutable_data_ptr<float>(), args.mask, args.constants, args.numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor masked_adamw_keep_mask_cuda(const at::Tensor& like, double reserve_p, int64_t seed, int64_t offset) {
  const CudaDeviceGuard guard(like);
  auto [mask, out] = check_keep_mask(like, reserve_p, seed, offset);
  if (out.numel() == 0) return out;
  PK_LAUNCH(grid_for(out.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream(), masked_adamw_keep_mask_kernel)(out.mutable_data_ptr<bool>(), mask, out.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace masked_adamw
}  // namespace peftkern

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("masked_adamw_", &peftkern::masked_adamw::masked_adamw_cuda);
  m.impl("masked_adamw_keep_mask", &peftkern::masked_adamw::masked_adamw_keep_mask_cuda);
}
