// CPU kernel of ReLoRA's NF4 merge: per quantization block, decode the codes, add the block's
// slice of s·B·A, take the new absmax and re-encode, all in a block-sized stack buffer: the
// dense weight is never written. Parallel over blocks (at::parallel_for); the per-element math
// is relora_math.h and common/blockwise_quant.h, shared with the CUDA kernel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "relora_host.h"

namespace peftkern {
namespace relora {
namespace {

void merge_blocks(const uint8_t* packed, const float* absmax, const MergeArgs& args, uint8_t* out_packed,
                  float* out_absmax) {
  const int64_t n = args.numel, blocksize = args.blocksize, blocks = args.blocks;
  const bool has_tail = n % blocksize != 0;
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
    float values[4096];       // one block (blocksize <= 4096)
    double delta[4096];       // its s·B·A slice before scaling, in float64
    uint8_t codes[4096 + 1];  // its codes plus the odd-count pad
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      // The block's delta, row segment by row segment, k outer and the contiguous columns inner
      // (vectorisable over A's rows): per element the same float64 sum in the same k order as
      // LowRank::delta, so the same bits.
      const LowRank& lr = args.low_rank;
      for (int64_t e = start; e < start + len;) {
        const int64_t o = e / lr.in_features, i0 = e % lr.in_features;
        const int64_t seg = std::min(start + len - e, lr.in_features - i0);
        double* acc = delta + (e - start);
        std::fill(acc, acc + seg, 0.0);
        for (int64_t k = 0; k < lr.rank; ++k) {
          const double bk = static_cast<double>(lr.lora_b[o * lr.rank + k]);
          const float* a_row = lr.lora_a + k * lr.in_features + i0;
          for (int64_t i = 0; i < seg; ++i) acc[i] += bk * static_cast<double>(a_row[i]);
        }
        e += seg;
      }
      float raw_absmax = 0.0f;
      for (int64_t i = 0; i < len; ++i) {
        const float deq = mul_rn(quant::nf4_value(quant::nf4_code_at(packed, start + i)), absmax[b]);
        values[i] = add_rn(deq, static_cast<float>(lr.scaling * delta[i]));
        raw_absmax = max_propagating_nan(raw_absmax, std::fabs(values[i]));
      }
      const quant::BlockNormalizer normalize(raw_absmax, has_tail && b == blocks - 1);
      out_absmax[b] = normalize.stored_absmax(raw_absmax);
      for (int64_t i = 0; i < len; ++i) codes[i] = static_cast<uint8_t>(quant::nf4_encode(normalize(values[i])));
      // Only the last block can have odd length (blocksize is even): its pad encodes 0.0.
      codes[len] = static_cast<uint8_t>(quant::nf4_encode(0.0f));
      uint8_t* out = out_packed + start / 2;
      for (int64_t j = 0; j < (len + 1) / 2; ++j) out[j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> nf4_merge_lowrank_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                                                         const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                         double scaling, int64_t blocksize, at::IntArrayRef shape) {
  auto [args, new_packed, new_absmax] =
      check_and_allocate_merge(packed, absmax, lora_a, lora_b, scaling, blocksize, shape);
  if (args.numel == 0) return {new_packed, new_absmax};
  merge_blocks(packed.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), args,
               new_packed.mutable_data_ptr<uint8_t>(), new_absmax.mutable_data_ptr<float>());
  return {new_packed, new_absmax};
}

}  // namespace
}  // namespace relora
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, CPU, m) { m.impl("nf4_merge_lowrank", &peftkern::relora::nf4_merge_lowrank_cpu); }
