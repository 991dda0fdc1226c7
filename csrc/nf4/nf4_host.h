// Host-side argument checking and output allocation for the NF4 ops, shared by the CPU and
// CUDA implementations so both accept and reject exactly the same inputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/outputs.h"

namespace peftkern {
namespace nf4 {

// Everything a kernel needs to know about one NF4 dequantization, already validated.
struct DequantArgs {
  int64_t numel;
  int64_t blocksize;
  int64_t nested_blocksize;  // 0 when the absmax is stored as float32
};

inline std::tuple<at::Tensor, at::Tensor> check_and_allocate_quantize(const at::Tensor& weight,
                                                                      int64_t blocksize) {
  constexpr const char* op = "nf4_quantize";
  check_dtype(weight, op, "weight", {at::kFloat, at::kHalf, at::kBFloat16});
  check_blocksize(blocksize, op);
  const int64_t n = weight.numel();
  auto packed = new_output({ceil_div(n, 2), 1}, weight.options().dtype(at::kByte));
  auto absmax = new_output({ceil_div(n, blocksize)}, weight.options().dtype(at::kFloat));
  return {packed, absmax};
}

// Where a kernel reads each block's absmax (common/blockwise_quant.h): the float32 absmax, or under
// double quantization the uint8 codes with the nested absmax, code table and offset. Pointers
// only: check the tensors first (check_dequantize / check_dequantize_nested, or the QLoRA ops'
// checks); they must outlive the BlockScales.
inline quant::BlockScales block_scales(const at::Tensor& absmax) {
  quant::BlockScales scales{};
  scales.absmax = absmax.const_data_ptr<float>();
  return scales;
}

inline quant::BlockScales block_scales(const at::Tensor& codes, const at::Tensor& nested_absmax,
                                       const at::Tensor& nested_code, const at::Tensor& nested_offset,
                                       int64_t nested_blocksize) {
  quant::BlockScales scales{};
  scales.codes = codes.const_data_ptr<uint8_t>();
  scales.nested_absmax = nested_absmax.const_data_ptr<float>();
  scales.nested_code = nested_code.const_data_ptr<float>();
  scales.nested_offset = nested_offset.const_data_ptr<float>();
  scales.nested_blocksize = nested_blocksize;
  return scales;
}

inline void check_packed(const at::Tensor& packed, const char* op, int64_t numel) {
  check_dtype(packed, op, "packed", {at::kByte});
  check_numel(packed, op, "packed", ceil_div(numel, 2));
  TORCH_CHECK(packed.is_contiguous(), op, ": packed must be contiguous");
}

inline DequantArgs check_dequantize(const at::Tensor& packed, const at::Tensor& absmax,
                                    int64_t blocksize, at::IntArrayRef shape,
                                    at::ScalarType dtype) {
  constexpr const char* op = "nf4_dequantize";
  check_blocksize(blocksize, op);
  check_float_dtype(dtype, op, "dtype");
  const int64_t n = shape_numel(shape, op);
  check_packed(packed, op, n);
  check_dtype(absmax, op, "absmax", {at::kFloat});
  check_device(absmax, op, "absmax", packed, "packed");
  check_numel(absmax, op, "absmax", ceil_div(n, blocksize));
  TORCH_CHECK(absmax.is_contiguous(), op, ": absmax must be contiguous");
  return {n, blocksize, 0};
}

inline DequantArgs check_dequantize_nested(const at::Tensor& packed,
                                           const at::Tensor& absmax_codes,
                                           const at::Tensor& nested_absmax,
                                           const at::Tensor& nested_code,
                                           const at::Tensor& nested_offset, int64_t blocksize,
                                           int64_t nested_blocksize, at::IntArrayRef shape,
                                           at::ScalarType dtype) {
  constexpr const char* op = "nf4_dequantize_nested";
  check_blocksize(blocksize, op);
  check_blocksize(nested_blocksize, op, "nested_blocksize");
  check_float_dtype(dtype, op, "dtype");
  const int64_t n = shape_numel(shape, op);
  const int64_t blocks = ceil_div(n, blocksize);
  check_packed(packed, op, n);
  check_dtype(absmax_codes, op, "absmax_codes", {at::kByte});
  check_numel(absmax_codes, op, "absmax_codes", blocks);
  check_dtype(nested_absmax, op, "nested_absmax", {at::kFloat});
  check_numel(nested_absmax, op, "nested_absmax", ceil_div(blocks, nested_blocksize));
  check_dtype(nested_code, op, "nested_code", {at::kFloat});
  check_numel(nested_code, op, "nested_code", quant::kCode8Size);
  check_dtype(nested_offset, op, "nested_offset", {at::kFloat});
  check_numel(nested_offset, op, "nested_offset", 1);
  for (const auto* t : {&absmax_codes, &nested_absmax, &nested_code, &nested_offset}) {
    check_device(*t, op, "every quant-state tensor", packed, "packed");
    TORCH_CHECK(t->is_contiguous(), op, ": quant-state tensors must be contiguous");
  }
  return {n, blocksize, nested_blocksize};
}

// The ops whose nested tensors are optional (nf4_dequantize_into, nf4_decode_range): the three go
// together, then the checks of nf4_dequantize or nf4_dequantize_nested for `numel` elements of
// `dtype` (messages name nf4_dequantize(_nested)).
inline DequantArgs check_optional_nested(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                                         const std::optional<at::Tensor>& nested_absmax,
                                         const std::optional<at::Tensor>& nested_code,
                                         const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                                         int64_t nested_blocksize, int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(nested_absmax.has_value() == nested_code.has_value() &&
                  nested_absmax.has_value() == nested_offset.has_value(),
              op, ": nested_absmax, nested_code and nested_offset go together");
  if (nested_absmax.has_value()) {
    return check_dequantize_nested(packed, absmax, *nested_absmax, *nested_code, *nested_offset, blocksize,
                                   nested_blocksize, {numel}, dtype);
  }
  return check_dequantize(packed, absmax, blocksize, {numel}, dtype);
}

// block_scales of either kind, for tensors checked by check_optional_nested
inline quant::BlockScales block_scales(const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                                       const std::optional<at::Tensor>& nested_code,
                                       const std::optional<at::Tensor>& nested_offset, int64_t nested_blocksize) {
  return nested_absmax.has_value()
             ? block_scales(absmax, *nested_absmax, *nested_code, *nested_offset, nested_blocksize)
             : block_scales(absmax);
}

// nf4_dequantize_into: check_optional_nested for out's element count and dtype, plus out's own
// checks (a float dtype, contiguous, on packed's device).
inline DequantArgs check_dequantize_into(const at::Tensor& out, const at::Tensor& packed, const at::Tensor& absmax,
                                         const std::optional<at::Tensor>& nested_absmax,
                                         const std::optional<at::Tensor>& nested_code,
                                         const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                                         int64_t nested_blocksize) {
  constexpr const char* op = "nf4_dequantize_into";
  check_dtype(out, op, "out", {at::kFloat, at::kHalf, at::kBFloat16});
  check_device(out, op, "out", packed, "packed");
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  return check_optional_nested(op, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                               nested_blocksize, out.numel(), out.scalar_type());
}

inline std::tuple<at::Tensor, at::Tensor> check_and_allocate_quantize_8bit(
    const at::Tensor& x, const at::Tensor& code, int64_t blocksize) {
  constexpr const char* op = "quantize_blockwise_8bit";
  check_dtype(x, op, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dtype(code, op, "code", {at::kFloat});
  check_numel(code, op, "code", quant::kCode8Size);
  check_device(code, op, "code", x, "x");
  check_blocksize(blocksize, op);
  auto codes = new_output(x.sizes(), x.options().dtype(at::kByte));
  auto absmax = new_output({ceil_div(x.numel(), blocksize)}, x.options().dtype(at::kFloat));
  return {codes, absmax};
}

inline at::Tensor check_and_allocate_dequantize_8bit(const at::Tensor& codes,
                                                     const at::Tensor& absmax,
                                                     const at::Tensor& code, int64_t blocksize) {
  constexpr const char* op = "dequantize_blockwise_8bit";
  check_dtype(codes, op, "codes", {at::kByte});
  check_dtype(absmax, op, "absmax", {at::kFloat});
  check_dtype(code, op, "code", {at::kFloat});
  check_numel(code, op, "code", quant::kCode8Size);
  check_blocksize(blocksize, op);
  check_numel(absmax, op, "absmax", ceil_div(codes.numel(), blocksize));
  check_device(absmax, op, "absmax", codes, "codes");
  check_device(code, op, "code", codes, "codes");
  return new_output(codes.sizes(), codes.options().dtype(at::kFloat));
}

}  // namespace nf4
}  // namespace peftkern
