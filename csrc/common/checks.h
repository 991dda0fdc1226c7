// Input checks for host code. Every message names the op, the argument and what was expected,
// so a user sees "nf4_dequantize: absmax must be float32, got Half" rather than a crash.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

#include "blockwise_quant.h"

namespace peftkern {

inline void check_dtype(const at::Tensor& t, const char* op, const char* name,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto dtype : allowed) {
    if (t.scalar_type() == dtype) return;
  }
  std::string expected;
  for (auto dtype : allowed) {
    if (!expected.empty()) expected += " or ";
    expected += c10::toString(dtype);
  }
  TORCH_CHECK(false, op, ": ", name, " must be ", expected, ", got ", t.scalar_type());
}

inline void check_device(const at::Tensor& t, const char* op, const char* name,
                         const at::Tensor& reference, const char* reference_name) {
  TORCH_CHECK(t.device() == reference.device(), op, ": ", name, " is on ", t.device(), " but ",
              reference_name, " is on ", reference.device());
}

// `name` must have `ref`'s dtype and device: the tensors an op reads together (its GEMMs and
// elementwise epilogues take one dtype). The message names both, e.g. "lora_a is Double but x is Float".
inline void check_like(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref,
                       const char* ref_name = "x") {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but ", ref_name,
              " is ", ref.scalar_type(), " (cast them to one dtype first)");
  check_device(t, op, name, ref, ref_name);
}

inline void check_numel(const at::Tensor& t, const char* op, const char* name, int64_t expected) {
  TORCH_CHECK(t.numel() == expected, op, ": ", name, " must have ", expected,
              " elements, has ", t.numel(), " (shape ", t.sizes(), ")");
}

inline void check_blocksize(int64_t blocksize, const char* op, const char* name = "blocksize") {
  TORCH_CHECK(quant::is_valid_blocksize(blocksize), op, ": ", name,
              " must be a power of two from 32 to 4096 (as bitsandbytes accepts), got ",
              blocksize);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t shape_numel(at::IntArrayRef shape, const char* op) {
  int64_t n = 1;
  for (auto s : shape) {
    TORCH_CHECK(s >= 0, op, ": shape ", shape, " has a negative size");
    n *= s;
  }
  return n;
}

inline void check_float_dtype(at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
}

}  // namespace peftkern
