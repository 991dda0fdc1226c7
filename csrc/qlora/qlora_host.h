// Host-side checks and output allocation for the QLoRA decode op `nf4_lora_gemv`, shared by the
// CPU and CUDA implementations so both accept and reject exactly the same inputs.
//
//   out[t, o] = sum_i x[t, i] * deq(W)[o, i] + bias[o] + scaling * sum_r xa[t, r] * lora_b[o, r]
//
// W is [N, K] in NF4 (bitsandbytes' layout over the flat row-major weight, blocks of
// `blocksize` elements that may straddle rows when K is not a multiple of it); its absmax is
// float32 [blocks], or uint8 codes [blocks] with nested_absmax / nested_code / nested_offset under
// double quantization. xa = x·Aᵀ [T, r] is computed by the caller (T·K·r FLOP, negligible).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../common/checks.h"
#include "../common/outputs.h"
#include "../nf4/nf4_host.h"

namespace peftkern {
namespace qlora {

struct GemvArgs {
  int64_t tokens, in_features, out_features, rank, blocksize;
  quant::BlockScales scales;  // where the absmax of each block is read from
};

// Checks the NF4 weight W [rows, cols] (packed codes, absmax and, under double quantization, the
// nested tensors) against `ref` (x or grad_out: same device) and returns where its block scales are
// read from. Shared by every op that reads an NF4 weight in place.
inline quant::BlockScales check_nf4_weight(const char* op, const at::Tensor& ref, const char* ref_name,
                                           const at::Tensor& packed, const at::Tensor& absmax,
                                           const std::optional<at::Tensor>& nested_absmax,
                                           const std::optional<at::Tensor>& nested_code,
                                           const std::optional<at::Tensor>& nested_offset,
                                           int64_t blocksize, int64_t nested_blocksize,
                                           int64_t rows, int64_t cols) {
  check_blocksize(blocksize, op);
  const int64_t n = rows * cols;
  const int64_t blocks = ceil_div(n, blocksize);
  check_dtype(packed, op, "packed", {at::kByte});
  check_numel(packed, op, "packed", ceil_div(n, 2));
  TORCH_CHECK(packed.is_contiguous(), op, ": packed must be contiguous");
  check_device(packed, op, "packed", ref, ref_name);
  check_device(absmax, op, "absmax", ref, ref_name);
  TORCH_CHECK(absmax.is_contiguous(), op, ": absmax must be contiguous");
  check_numel(absmax, op, "absmax", blocks);
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK(nested == nested_code.has_value() && nested == nested_offset.has_value(), op,
              ": nested_absmax, nested_code and nested_offset go together");
  if (nested) {
    check_dtype(absmax, op, "absmax (codes, under double quantization)", {at::kByte});
    check_blocksize(nested_blocksize, op, "nested_blocksize");
    check_dtype(*nested_absmax, op, "nested_absmax", {at::kFloat});
    check_numel(*nested_absmax, op, "nested_absmax", ceil_div(blocks, nested_blocksize));
    check_dtype(*nested_code, op, "nested_code", {at::kFloat});
    check_numel(*nested_code, op, "nested_code", quant::kCode8Size);
    check_dtype(*nested_offset, op, "nested_offset", {at::kFloat});
    check_numel(*nested_offset, op, "nested_offset", 1);
    for (const auto* t : {&*nested_absmax, &*nested_code, &*nested_offset}) {
      check_device(*t, op, "every quant-state tensor", ref, ref_name);
      TORCH_CHECK(t->is_contiguous(), op, ": quant-state tensors must be contiguous");
    }
    return nf4::block_scales(absmax, *nested_absmax, *nested_code, *nested_offset, nested_blocksize);
  }
  check_dtype(absmax, op, "absmax", {at::kFloat});
  return nf4::block_scales(absmax);
}

// A 2-D [rows, cols] tensor of `ref`'s dtype and device with contiguous rows (the GEMM operands the
// fused ops read as they are).
inline void check_matrix(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref,
                         const char* ref_name, int64_t rows, int64_t cols) {
  check_like(t, op, name, ref, ref_name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must be [", rows,
              ", ", cols, "], got ", t.sizes());
}

inline GemvArgs check_nf4_lora_gemv(const at::Tensor& x, const at::Tensor& packed,
                                    const at::Tensor& absmax,
                                    const std::optional<at::Tensor>& nested_absmax,
                                    const std::optional<at::Tensor>& nested_code,
                                    const std::optional<at::Tensor>& nested_offset,
                                    int64_t blocksize, int64_t nested_blocksize,
                                    int64_t out_features, const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& xa,
                                    const std::optional<at::Tensor>& lora_b) {
  constexpr const char* op = "nf4_lora_gemv";
  check_dtype(x, op, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, in_features], got shape ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, op, ": x rows must be contiguous (stride 1)");
  TORCH_CHECK(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  const quant::BlockScales scales =
      check_nf4_weight(op, x, "x", packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                       nested_blocksize, out_features, x.size(1));
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype ",
                x.scalar_type(), ", got ", bias->scalar_type());
    check_numel(*bias, op, "bias", out_features);
    check_device(*bias, op, "bias", x, "x");
    TORCH_CHECK(bias->is_contiguous(), op, ": bias must be contiguous");
  }
  TORCH_CHECK(xa.has_value() == lora_b.has_value(), op, ": xa and lora_b go together");
  int64_t rank = 0;
  if (xa.has_value()) {
    for (const auto* t : {&*xa, &*lora_b}) {
      TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": xa and lora_b must have x's dtype ",
                  x.scalar_type(), ", got ", t->scalar_type());
      TORCH_CHECK(t->dim() == 2 && t->is_contiguous(), op,
                  ": xa and lora_b must be contiguous 2-D tensors");
      check_device(*t, op, "xa / lora_b", x, "x");
    }
    rank = xa->size(1);
    TORCH_CHECK(xa->size(0) == x.size(0), op, ": xa must be [tokens, r] = [", x.size(0), ", r], got ",
                xa->sizes());
    TORCH_CHECK(lora_b->size(0) == out_features && lora_b->size(1) == rank, op,
                ": lora_b must be [out_features, r] = [", out_features, ", ", rank, "], got ",
                lora_b->sizes());
  }
  return {x.size(0), x.size(1), out_features, rank, blocksize, scales};
}

// The fused dequant + GEMM ops (CPU: qlora_gemm_cpu.cpp), already validated.
struct GemmArgs {
  int64_t tokens, in_features, out_features, rank, blocksize, tile_bytes;
  quant::BlockScales scales;
};

// nf4_lora_linear_fwd: out = x·deq(W)ᵀ + bias + scaling·xa·lora_bᵀ, W [out_features, K].
inline GemmArgs check_nf4_lora_linear_fwd(const at::Tensor& x, const at::Tensor& packed,
                                          const at::Tensor& absmax,
                                          const std::optional<at::Tensor>& nested_absmax,
                                          const std::optional<at::Tensor>& nested_code,
                                          const std::optional<at::Tensor>& nested_offset,
                                          int64_t blocksize, int64_t nested_blocksize,
                                          int64_t out_features, const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& xa,
                                          const std::optional<at::Tensor>& lora_b, int64_t tile_bytes) {
  constexpr const char* op = "nf4_lora_linear_fwd";
  check_dtype(x, op, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, in_features], got shape ", x.sizes());
  TORCH_CHECK(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  TORCH_CHECK(tile_bytes >= 0, op, ": tile_bytes must be >= 0 (0: the default), got ", tile_bytes);
  const int64_t m = x.size(0), k = x.size(1);
  const quant::BlockScales scales = check_nf4_weight(op, x, "x", packed, absmax, nested_absmax, nested_code,
                                                     nested_offset, blocksize, nested_blocksize, out_features, k);
  if (bias.has_value()) {
    check_like(*bias, op, "bias", x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must be [", out_features,
                "], got ", bias->sizes());
  }
  TORCH_CHECK(xa.has_value() == lora_b.has_value(), op, ": xa and lora_b go together");
  int64_t rank = 0;
  if (xa.has_value()) {
    TORCH_CHECK(xa->dim() == 2, op, ": xa must be 2-D [tokens, r], got shape ", xa->sizes());
    rank = xa->size(1);
    check_matrix(*xa, op, "xa", x, "x", m, rank);
    check_matrix(*lora_b, op, "lora_b", x, "x", out_features, rank);
  }
  return {m, k, out_features, rank, blocksize, tile_bytes, scales};
}

// nf4_lora_linear_bwd_input: grad_x = grad_out·deq(W) + grad_xa·lora_a, W [N, in_features].
inline GemmArgs check_nf4_lora_linear_bwd_input(const at::Tensor& grad_out, const at::Tensor& packed,
                                                const at::Tensor& absmax,
                                                const std::optional<at::Tensor>& nested_absmax,
                                                const std::optional<at::Tensor>& nested_code,
                                                const std::optional<at::Tensor>& nested_offset,
                                                int64_t blocksize, int64_t nested_blocksize,
                                                int64_t in_features, const std::optional<at::Tensor>& grad_xa,
                                                const std::optional<at::Tensor>& lora_a, int64_t tile_bytes) {
  constexpr const char* op = "nf4_lora_linear_bwd_input";
  check_dtype(grad_out, op, "grad_out", {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK(grad_out.dim() == 2, op, ": grad_out must be 2-D [tokens, out_features], got shape ",
              grad_out.sizes());
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  TORCH_CHECK(tile_bytes >= 0, op, ": tile_bytes must be >= 0 (0: the default), got ", tile_bytes);
  const int64_t m = grad_out.size(0), n = grad_out.size(1);
  const quant::BlockScales scales =
      check_nf4_weight(op, grad_out, "grad_out", packed, absmax, nested_absmax, nested_code, nested_offset,
                       blocksize, nested_blocksize, n, in_features);
  TORCH_CHECK(grad_xa.has_value() == lora_a.has_value(), op, ": grad_xa and lora_a go together");
  int64_t rank = 0;
  if (grad_xa.has_value()) {
    TORCH_CHECK(grad_xa->dim() == 2, op, ": grad_xa must be 2-D [tokens, r], got shape ", grad_xa->sizes());
    rank = grad_xa->size(1);
    check_matrix(*grad_xa, op, "grad_xa", grad_out, "grad_out", m, rank);
    check_matrix(*lora_a, op, "lora_a", grad_out, "grad_out", rank, in_features);
  }
  return {m, in_features, n, rank, blocksize, tile_bytes, scales};
}

// The data of an optional tensor argument, or null when it is absent.
template <typename T>
const T* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

}  // namespace qlora
}  // namespace peftkern
