// The CPU NF4 decode primitive that every CPU consumer of an NF4 weight calls: the dequantize
// ops, the fused dequant + GEMM tiles of QLoRA and anything else that needs dense values of a
// stretch of an NF4 weight.
//
//   out[i] = T(nf4_value(code(first + i)) * absmax(block(first + i)))   for i in [0, count)
//
// with one float32 rounding of the product, then one rounding to T: the same values, bit for
// bit, as the reference (`peftkern.nf4.dequantize_reference`) and bitsandbytes. `first` may be
// odd (mid-byte) and the range may start and end anywhere inside quantization blocks.
// Single-threaded: callers split the work (at::parallel_for) and each thread decodes its own
// ranges into its own buffer.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../common/blockwise_quant.h"

namespace peftkern {
namespace nf4 {
namespace cpu {

void decode_range(const uint8_t* packed, const quant::BlockScales& scales, int64_t blocksize,
                  int64_t first, int64_t count, float* out);
void decode_range(const uint8_t* packed, const quant::BlockScales& scales, int64_t blocksize,
                  int64_t first, int64_t count, c10::Half* out);
void decode_range(const uint8_t* packed, const quant::BlockScales& scales, int64_t blocksize,
                  int64_t first, int64_t count, c10::BFloat16* out);

}  // namespace cpu
}  // namespace nf4
}  // namespace peftkern
