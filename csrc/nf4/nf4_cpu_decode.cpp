// The CPU NF4 decode primitive (nf4_cpu_decode.h): the portable (scalar) implementation, which
// is the spec the SIMD ones (nf4_cpu_decode_x86.cpp) match bit for bit, and the dispatch to the
// path common/cpu_isa.h chose.
// Scalar: per block segment a 16-entry table of T(nf4_value(k) * absmax) (the same rounding as
// computing each element on its own), then one table lookup per nibble.
#include "nf4_cpu_decode.h"

#include <algorithm>

#include "nf4_cpu_decode_x86.h"

namespace peftkern {
namespace nf4 {
namespace cpu {
namespace {

template <typename T>
void decode_range_scalar(const uint8_t* packed, const quant::BlockScales& scales,
                         int64_t blocksize, int64_t first, int64_t count, T* out) {
  // The code values read through a volatile: with constants, GCC turns -1.0f * absmax (code 0)
  // into a negation, which flips the sign of a NaN absmax where a multiply (the SIMD paths',
  // torch's) keeps it.
  float values[quant::kNf4Codes];
  for (int k = 0; k < quant::kNf4Codes; ++k) {
    const volatile float value = quant::nf4_value(k);
    values[k] = value;
  }
  const int64_t end = first + count;
  for (int64_t e = first; e < end;) {
    const int64_t block = e / blocksize;
    const int64_t segment_end = std::min(end, (block + 1) * blocksize);
    const float scale = scales(block);
    T table[quant::kNf4Codes];
    for (int k = 0; k < quant::kNf4Codes; ++k) table[k] = static_cast<T>(mul_rn(values[k], scale));
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

template <typename T>
void decode_range_dispatch(const uint8_t* packed, const quant::BlockScales& scales,
                           int64_t blocksize, int64_t first, int64_t count, T* out) {
  using peftkern::cpu::Isa;
  switch (peftkern::cpu::active_isa()) {
#if defined(PK_X86)
    case Isa::kAvx512:
      return x86::decode_range_avx512(packed, scales, blocksize, first, count, out);
    case Isa::kAvx2:
      return x86::decode_range_avx2(packed, scales, blocksize, first, count, out);
#endif
    default:
      return decode_range_scalar(packed, scales, blocksize, first, count, out);
  }
}

}  // namespace

void decode_range(const uint8_t* packed, const quant::BlockScales& scales, int64_t blocksize,
                  int64_t first, int64_t count, float* out) {
  decode_range_dispatch(packed, scales, blocksize, first, count, out);
}
void decode_range(const uint8_t* packed, const quant::BlockScales& scales, int64_t blocksize,
                  int64_t first, int64_t count, c10::Half* out) {
  decode_range_dispatch(packed, scales, blocksize, first, count, out);
}
void decode_range(const uint8_t* packed, const quant::BlockScales& scales, int64_t blocksize,
                  int64_t first, int64_t count, c10::BFloat16* out) {
  decode_range_dispatch(packed, scales, blocksize, first, count, out);
}

}  // namespace cpu
}  // namespace nf4
}  // namespace peftkern
