// Per-element math of bitsandbytes-compatible blockwise quantization (NF4 and the 8-bit
// "dynamic" code used for double quantization), shared by the CPU and CUDA kernels so that the
// CPU tests exercise exactly the arithmetic the GPU runs.
//
// The format (what the bytes mean) is bitsandbytes' NF4:
//   * the flat, row-major weight is cut into blocks of `blocksize` elements (the last block may
//     be partial); each block stores absmax = max |w| in float32;
//   * each element is scaled into [-1, 1] and replaced by the index of the nearest NF4 code
//     value (ties go to the lower index);
//   * two 4-bit indices per byte, element 2i in the HIGH nibble, 2i+1 in the low nibble; an odd
//     element count pads the last low nibble with the code of 0.0 (index 7).
// The rounding rules below are those of bitsandbytes' reference backend (the PyTorch code every
// bitsandbytes device falls back to), which is also the CUDA kernel's rule except at exact ties:
//   * full blocks are scaled by x * (1 / absmax); the partial tail block by x / absmax;
//   * absmax is clamped to >= 1e-38 for scaling; the stored absmax of the tail block is the
//     clamped value, that of full blocks the raw one.
#pragma once

#include "host_device.h"

namespace peftkern {
namespace quant {

constexpr int kNf4Codes = 16;
constexpr int kCode8Size = 256;
// bitsandbytes' double quantization always uses 256-element blocks for the absmax values.
constexpr int64_t kNestedBlocksize = 256;
constexpr float kMinAbsmax = 1e-38f;

// Block sizes bitsandbytes accepts: powers of two from 32 to 4096.
PK_HOST_DEVICE constexpr bool is_valid_blocksize(int64_t blocksize) {
  return blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
}

// The 16 NF4 values (quantiles of N(0, 1) rescaled to [-1, 1], QLoRA paper), as float32,
// exactly as bitsandbytes stores them.
PK_HOST_DEVICE constexpr float nf4_value(int code) {
  switch (code & 15) {
    case 0: return -1.0f;
    case 1: return -0.6961928009986877f;
    case 2: return -0.5250730514526367f;
    case 3: return -0.39491748809814453f;
    case 4: return -0.28444138169288635f;
    case 5: return -0.18477343022823334f;
    case 6: return -0.09105003625154495f;
    case 7: return 0.0f;
    case 8: return 0.07958029955625534f;
    case 9: return 0.16093020141124725f;
    case 10: return 0.24611230194568634f;
    case 11: return 0.33791524171829224f;
    case 12: return 0.44070982933044434f;
    case 13: return 0.5626170039176941f;
    case 14: return 0.7229568362236023f;
    default: return 1.0f;
  }
}

// Decision threshold between code k and k + 1: their float32 midpoint.
PK_HOST_DEVICE constexpr float nf4_threshold(int k) {
  return (nf4_value(k) + nf4_value(k + 1)) * 0.5f;
}

// Index of the nearest NF4 value to `scaled` (in [-1, 1]); a value exactly on a threshold takes
// the lower index. Branch-free (a count of thresholds passed) so that CPU loops vectorise.
PK_HOST_DEVICE int nf4_encode(float scaled) {
  int code = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  // !(s <= t) rather than s > t: a NaN passes every threshold and takes the last code (15), as
  // torch.bucketize places NaN in the reference and as bitsandbytes stores it.
  for (int k = 0; k < kNf4Codes - 1; ++k) code += !(scaled <= nf4_threshold(k)) ? 1 : 0;
  return code;
}

// Index of the nearest value of a sorted 256-entry code table (ties to the lower index): a
// binary search over the midpoints (code[i] + code[i + 1]) / 2.
PK_HOST_DEVICE int code8_encode(float scaled, const float* code) {
  int lo = 0, hi = kCode8Size - 1;  // answer = number of midpoints strictly below `scaled`
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    const float threshold = mul_rn(add_rn(code[mid], code[mid + 1]), 0.5f);
    if (!(scaled <= threshold)) {  // a NaN goes up, to the last code, as in the reference
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Maps the elements of one block into [-1, 1] with bitsandbytes' reference rounding (see the
// file comment): full blocks multiply by a rounded reciprocal, the tail block divides.
struct BlockNormalizer {
  float absmax_clamped;
  float inverse;
  bool is_tail;

  PK_HOST_DEVICE BlockNormalizer(float absmax, bool tail)
      // absmax < kMinAbsmax, not !(absmax > kMinAbsmax): a NaN absmax stays NaN, as torch.clamp keeps it
      : absmax_clamped(absmax < kMinAbsmax ? kMinAbsmax : absmax),
        inverse(rcp_rn(absmax < kMinAbsmax ? kMinAbsmax : absmax)),
        is_tail(tail) {}

  PK_HOST_DEVICE float operator()(float x) const {
    return clamp_unit(is_tail ? div_rn(x, absmax_clamped) : mul_rn(x, inverse));
  }

  // What the format stores for this block.
  PK_HOST_DEVICE float stored_absmax(float raw_absmax) const {
    return is_tail ? absmax_clamped : raw_absmax;
  }
};

// Decoded absmax of one NF4 block under double quantization:
// code8[q] * nested_absmax[block / 256] + offset, rounded after each operation.
PK_HOST_DEVICE float nested_absmax_value(float code_value, float nested_absmax, float offset) {
  return add_rn(mul_rn(code_value, nested_absmax), offset);
}

// The NF4 code of flat element e: element 2i in the high nibble of byte i, 2i + 1 in the low one.
PK_HOST_DEVICE int nf4_code_at(const uint8_t* packed, int64_t e) {
  const int byte = packed[e >> 1];
  return (e & 1) ? (byte & 15) : (byte >> 4);
}

// The absmax of NF4 block b, from either storage: float32 values (`absmax` set), or uint8 codes
// under double quantization (`absmax` null), decoded in registers as nested_absmax_value does.
struct BlockScales {
  const float* absmax;         // [blocks] float32, or nullptr when double-quantized
  const uint8_t* codes;        // [blocks] uint8 codes (double quantization)
  const float* nested_absmax;  // [ceil(blocks / nested_blocksize)]
  const float* nested_code;    // [256]
  const float* nested_offset;  // [1]
  int64_t nested_blocksize;

  PK_HOST_DEVICE float operator()(int64_t b) const {
    if (absmax != nullptr) return absmax[b];
    return nested_absmax_value(nested_code[codes[b]], nested_absmax[b / nested_blocksize],
                               *nested_offset);
  }
};

}  // namespace quant
}  // namespace peftkern
