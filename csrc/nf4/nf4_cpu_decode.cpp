// The portable (scalar) implementation of the CPU NF4 decode primitive (nf4_cpu_decode.h).
// Per block segment: a 16-entry table of T(nf4_value(k) * absmax) (the same rounding as
// computing each element on its own), then one table lookup per nibble.
#include "nf4_cpu_decode.h"

#include <algorithm>

namespace peftkern {
namespace nf4 {
namespace cpu {
namespace {

template <typename T>
void decode_range_scalar(const uint8_t* packed, const quant::BlockScales& scales,
                         int64_t blocksize, int64_t first, int64_t count, T* out) {
  const int64_t end = first + count;
  for (int64_t e = first; e < end;) {
    const int64_t block = e / blocksize;
    const int64_t segment_end = std::min(end, (block + 1) * blocksize);
    const float scale = scales(block);
    T table[quant::kNf4Codes];
    for (int k = 0; k < quant::kNf4Codes; ++k) {
      table[k] = static_cast<T>(mul_rn(quant::nf4_value(k), scale));
    }
    T* o = out + (e - first);
    int64_t i = e;
    if (i < segment_end && (i & 1)) *o++ = table[packed[i++ >> 1] & 15];  // a mid-byte start
    for (; i + 1 < segment_end; i += 2) {
      const uint8_t byte = packed[i >> 1];
      *o++ = table[byte >> 4];
      *o++ = table[byte & 15];
    }
    if (i < segment_end) *o++ = table[packed[i++ >> 1] >> 4];  // a mid-byte end
    e = segment_end;
  }
}

}  // namespace

void decode_range(const uint8_t* packed, const quant::BlockScales& scales, int64_t blocksize,
                  int64_t first, int64_t count, float* out) {
  decode_range_scalar(packed, scales, blocksize, first, count, out);
}
void decode_range(const uint8_t* packed, const quant::BlockScales& scales, int64_t blocksize,
                  int64_t first, int64_t count, c10::Half* out) {
  decode_range_scalar(packed, scales, blocksize, first, count, out);
}
void decode_range(const uint8_t* packed, const quant::BlockScales& scales, int64_t blocksize,
                  int64_t first, int64_t count, c10::BFloat16* out) {
  decode_range_scalar(packed, scales, blocksize, first, count, out);
}

}  // namespace cpu
}  // namespace nf4
}  // namespace peftkern
