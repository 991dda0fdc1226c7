// CPU kernels of the NF4 family: blockwise NF4 quantize / dequantize (plain and with
// double-quantized absmax) and the 8-bit blockwise quantizer used for double quantization.
//
// Parallel over quantization blocks with at::parallel_for (OpenMP in PyTorch's builds, and it
// honours torch.set_num_threads); the inner loops are branch-free so GCC vectorises them at -O3.
// The per-element math comes from common/blockwise_quant.h, shared with the CUDA kernels.
#include "../common/dispatch.h"
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "nf4_cpu_decode.h"
#include "nf4_host.h"

namespace peftkern {
namespace nf4 {
namespace {

using quant::BlockNormalizer;

// Enough blocks per task that each task moves ~64 KB: below that, threading costs more than it
// saves.
int64_t grain_in_blocks(int64_t blocksize) { return std::max<int64_t>(1, 65536 / blocksize); }

template <typename T>
float block_absmax(const T* x, int64_t len) {
  float m = 0.0f;
  for (int64_t i = 0; i < len; ++i) m = max_propagating_nan(m, std::fabs(static_cast<float>(x[i])));
  return m;
}

template <typename T>
void quantize_nf4(const T* weight, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  const int64_t blocks = ceil_div(n, blocksize);
  const bool has_tail = n % blocksize != 0;
  at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t first, int64_t last) {
    uint8_t codes[4096 + 1];  // one block of codes (blocksize <= 4096) plus the odd-count pad
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const T* x = weight + start;
      const float raw_absmax = block_absmax(x, len);
      const BlockNormalizer normalize(raw_absmax, has_tail && b == blocks - 1);
      absmax[b] = normalize.stored_absmax(raw_absmax);
      for (int64_t i = 0; i < len; ++i) {
        codes[i] = static_cast<uint8_t>(quant::nf4_encode(normalize(static_cast<float>(x[i]))));
      }
      // Only the very last block can have odd length (blocksize is even); its missing partner
      // is encoded as the value 0.0, as bitsandbytes pads.
      codes[len] = static_cast<uint8_t>(quant::nf4_encode(0.0f));
      uint8_t* out = packed + start / 2;
      for (int64_t j = 0; j < (len + 1) / 2; ++j) {
        out[j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
      }
    }
  });
}

// Each task decodes whole blocks (absmax read directly, or decoded from the double quantization)
template <typename T>
void dequantize_nf4(const uint8_t* packed, const DequantArgs& args,
                    const quant::BlockScales& scales, T* out) {
  const int64_t n = args.numel, blocksize = args.blocksize;
  at::parallel_for(0, ceil_div(n, blocksize), grain_in_blocks(blocksize),
                   [&](int64_t first, int64_t last) {
                     const int64_t start = first * blocksize;
                     const int64_t end = std::min(n, last * blocksize);
                     cpu::decode_range(packed, scales, blocksize, start, end - start, out + start);
                   });
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& weight, int64_t blocksize) {
  auto [packed, absmax] = check_and_allocate_quantize(weight, blocksize);
  const at::Tensor w = weight.contiguous();
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(w.scalar_type(), "nf4_quantize", [&] {
    quantize_nf4(w.const_data_ptr<scalar_t>(), w.numel(), blocksize,
                 packed.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>());
  });
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  const DequantArgs args = check_dequantize(packed, absmax, blocksize, shape, dtype);
  at::Tensor out = new_output(shape, packed.options().dtype(dtype));
  const quant::BlockScales scales = block_scales(absmax);
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(dtype, "nf4_dequantize", [&] {
    dequantize_nf4(packed.const_data_ptr<uint8_t>(), args, scales, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor nf4_dequantize_nested_cpu(const at::Tensor& packed, const at::Tensor& absmax_codes,
                                     const at::Tensor& nested_absmax,
                                     const at::Tensor& nested_code,
                                     const at::Tensor& nested_offset, int64_t blocksize,
                                     int64_t nested_blocksize, at::IntArrayRef shape,
                                     at::ScalarType dtype) {
  const DequantArgs args =
      check_dequantize_nested(packed, absmax_codes, nested_absmax, nested_code, nested_offset,
                              blocksize, nested_blocksize, shape, dtype);
  at::Tensor out = new_output(shape, packed.options().dtype(dtype));
  const quant::BlockScales scales =
      block_scales(absmax_codes, nested_absmax, nested_code, nested_offset, nested_blocksize);
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(dtype, "nf4_dequantize_nested", [&] {
    dequantize_nf4(packed.const_data_ptr<uint8_t>(), args, scales, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

void nf4_dequantize_into_cpu(at::Tensor& out, const at::Tensor& packed, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& nested_absmax,
                             const std::optional<at::Tensor>& nested_code,
                             const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                             int64_t nested_blocksize) {
  const DequantArgs args = check_dequantize_into(out, packed, absmax, nested_absmax, nested_code, nested_offset,
                                                 blocksize, nested_blocksize);
  const quant::BlockScales scales = block_scales(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize);
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(out.scalar_type(), "nf4_dequantize_into", [&] {
    dequantize_nf4(packed.const_data_ptr<uint8_t>(), args, scales, out.mutable_data_ptr<scalar_t>());
  });
}

at::Tensor nf4_decode_range_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code,
                               const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                               int64_t nested_blocksize, int64_t numel, int64_t first, int64_t count,
                               at::ScalarType dtype) {
  constexpr const char* op = "nf4_decode_range";
  check_optional_nested(op, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
                        numel, dtype);
  const quant::BlockScales scales = block_scales(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize);
  TORCH_CHECK(first >= 0 && count >= 0 && first + count <= numel, op, ": the range [", first, ", ",
              first, " + ", count, ") must lie inside the ", numel, " elements");
  at::Tensor out = new_output({count}, packed.options().dtype(dtype));
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(dtype, op, [&] {
    cpu::decode_range(packed.const_data_ptr<uint8_t>(), scales, blocksize, first, count,
                      out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cpu(const at::Tensor& x,
                                                               const at::Tensor& code,
                                                               int64_t blocksize) {
  auto [codes, absmax] = check_and_allocate_quantize_8bit(x, code, blocksize);
  const at::Tensor xc = x.contiguous();
  const at::Tensor table = code.contiguous();
  const float* code_ptr = table.const_data_ptr<float>();
  const int64_t n = xc.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  const bool has_tail = n % blocksize != 0;
  uint8_t* codes_ptr = codes.mutable_data_ptr<uint8_t>();
  float* absmax_ptr = absmax.mutable_data_ptr<float>();
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(xc.scalar_type(), "quantize_8bit", [&] {
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const float raw_absmax = block_absmax(src + start, len);
        const BlockNormalizer normalize(raw_absmax, has_tail && b == blocks - 1);
        absmax_ptr[b] = normalize.stored_absmax(raw_absmax);
        for (int64_t i = 0; i < len; ++i) {
          codes_ptr[start + i] = static_cast<uint8_t>(
              quant::code8_encode(normalize(static_cast<float>(src[start + i])), code_ptr));
        }
      }
    });
  });
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_8bit_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                                         const at::Tensor& code, int64_t blocksize) {
  at::Tensor out = check_and_allocate_dequantize_8bit(codes, absmax, code, blocksize);
  const at::Tensor q = codes.contiguous();
  const at::Tensor a = absmax.contiguous();
  const at::Tensor table = code.contiguous();
  const uint8_t* q_ptr = q.const_data_ptr<uint8_t>();
  const float* a_ptr = a.const_data_ptr<float>();
  const float* code_ptr = table.const_data_ptr<float>();
  float* out_ptr = out.mutable_data_ptr<float>();
  at::parallel_for(0, q.numel(), 65536, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      out_ptr[i] = mul_rn(code_ptr[q_ptr[i]], a_ptr[i / blocksize]);
    }
  });
  return out;
}

at::Tensor nf4_code_table() {
  at::Tensor table = at::empty({quant::kNf4Codes}, at::TensorOptions().dtype(at::kFloat));
  float* p = table.mutable_data_ptr<float>();
  for (int k = 0; k < quant::kNf4Codes; ++k) p[k] = quant::nf4_value(k);
  return table;
}

}  // namespace
}  // namespace nf4
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("nf4_quantize", &peftkern::nf4::nf4_quantize_cpu);
  m.impl("nf4_dequantize", &peftkern::nf4::nf4_dequantize_cpu);
  m.impl("nf4_dequantize_nested", &peftkern::nf4::nf4_dequantize_nested_cpu);
  m.impl("nf4_dequantize_into", &peftkern::nf4::nf4_dequantize_into_cpu);
  m.impl("nf4_decode_range", &peftkern::nf4::nf4_decode_range_cpu);
  m.impl("quantize_blockwise_8bit", &peftkern::nf4::quantize_blockwise_8bit_cpu);
  m.impl("dequantize_blockwise_8bit", &peftkern::nf4::dequantize_blockwise_8bit_cpu);
}

// No tensor arguments, so no dispatch key: a catch-all kernel.
TORCH_LIBRARY_FRAGMENT(peftkern, m) { m.impl("nf4_code_table", &peftkern::nf4::nf4_code_table); }
