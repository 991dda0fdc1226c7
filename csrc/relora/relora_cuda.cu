// CUDA kernel of ReLoRA's NF4 merge. Same checks (relora_host.h) and per-element math
// (relora_math.h, common/blockwise_quant.h) as relora_cpu.cpp, so the CPU tests prove the
// arithmetic and this file only has to get the indexing right.
//
// One warp per quantization block, as nf4_quantize_kernel: pass 1 computes the block's merged
// values for the new absmax (a warp max), pass 2 recomputes them and encodes byte pairs. The
// recomputation (2·r multiply-adds per element) replaces a block-sized buffer that would not fit
// in registers for blocksize 4096; the merge runs once per ReLoRA cycle. No dense weight is
// written anywhere.
#include "../common/cuda_guard.h"
#include "../common/cuda_launch.h"
#include <torch/library.h>

#include "relora_host.h"

namespace peftkern {
namespace relora {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerCta = 8;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v = max_propagating_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Assumes: blocksize even (valid blocksizes are powers of two >= 32), so every block starts on
// a byte boundary and only the last block can have an odd length.
__global__ void nf4_merge_lowrank_kernel(const uint8_t* __restrict__ packed,  // [ceil(n / 2)]
                                         const float* __restrict__ absmax,    // [blocks]
                                         LowRank low_rank,                    // A [r, in], B [out, r]
                                         uint8_t* __restrict__ out_packed,    // [ceil(n / 2)]
                                         float* __restrict__ out_absmax,      // [blocks]
                                         int64_t n, int64_t blocksize, int64_t blocks) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarp;
  if (b >= blocks) return;  // whole warps exit together: the shuffles below stay full-warp
  const int64_t start = b * blocksize;
  const int64_t len = min(blocksize, n - start);
  const float scale = absmax[b];

  float m = 0.0f;
  for (int64_t i = lane; i < len; i += kWarp) {
    m = max_propagating_nan(m, fabsf(low_rank.merged(quant::nf4_code_at(packed, start + i), scale, start + i)));
  }
  const float raw_absmax = warp_max(m);
  const quant::BlockNormalizer normalize(raw_absmax, n % blocksize != 0 && b == blocks - 1);
  if (lane == 0) out_absmax[b] = normalize.stored_absmax(raw_absmax);

  for (int64_t j = lane; j < (len + 1) / 2; j += kWarp) {
    const int64_t e = start + 2 * j;
    const int hi = quant::nf4_encode(normalize(low_rank.merged(quant::nf4_code_at(packed, e), scale, e)));
    // The odd element count's missing partner is encoded as 0.0, as bitsandbytes pads.
    const int lo = quant::nf4_encode(
        2 * j + 1 < len ? normalize(low_rank.merged(quant::nf4_code_at(packed, e + 1), scale, e + 1)) : 0.0f);
    out_packed[start / 2 + j] = static_cast<uint8_t>((hi << 4) | lo);
  }
}

std::tuple<at::Tensor, at::Tensor> nf4_merge_lowrank_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                                          const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                          double scaling, int64_t blocksize, at::IntArrayRef shape) {
  const CudaDeviceGuard guard(packed);
  auto [args, new_packed, new_absmax] =
      check_and_allocate_merge(packed, absmax, lora_a, lora_b, scaling, blocksize, shape);
  if (args.numel == 0) return {new_packed, new_absmax};
  const int64_t grid = ceil_div(args.blocks, kWarpsPerCta);
  TORCH_CHECK(grid <= 0x7fffffff, "nf4_merge_lowrank: tensor too large for a 1-D grid");
  PK_LAUNCH(static_cast<unsigned int>(grid), kWarpsPerCta * kWarp, 0, at::cuda::getCurrentCUDAStream(), nf4_merge_lowrank_kernel)(packed.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), args.low_rank, new_packed.mutable_data_ptr<uint8_t>(), new_absmax.mutable_data_ptr<float>(), args.numel, args.blocksize, args.blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {new_packed, new_absmax};
}

}  // namespace
}  // namespace relora
}  // namespace peftkern

PK_CUDA_LIBRARY_IMPL(m) { m.impl("nf4_merge_lowrank", &peftkern::relora::nf4_merge_lowrank_cuda); }
