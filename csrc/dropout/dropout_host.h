// LoRA dropout without a mask: host code shared by CPU and CUDA (checks, output allocation, the
// calls into the device's kernels), and the two entry points the LoRA families call.
//
// The decision for element e = i·K + j of x [M, K] is drawn from (seed, offset, e) with Philox
// (common/philox.h, dropout_math.h), so forward and backward draw it again instead of storing a
// mask, and CPU and CUDA draw the same decisions. Design (a) of issue 13: in forward one pass
// writes xd = x ⊙ m/(1−p) for the A-projection GEMM and xd is freed right after it; in backward
// one pass draws m once for both xd (for grad_A's GEMM, freed after it) and
// grad_x += (grad_xa·A) ⊙ m/(1−p).
// Why not (b), dropout inside custom GEMM kernels: see DESIGN.md "LoRA dropout without a mask".
//
// `Kernels` (dropout_cpu.cpp, dropout_cuda.cu), for stream (seed, offset) and threshold =
// keep_threshold(p), scale = 1/(1−p):
//   dropout(x [M, K] any strides, out [M, K] contiguous, ...)   out = x ⊙ m · scale
//   accumulate(out [M, K] contiguous in/out, x [M, K] any strides, ...)   out += x ⊙ m · scale
//   backward(grad_x [M, K] contiguous in/out, grad_xd, x [M, K] any strides, xd [M, K] contiguous, ...)
//       grad_x += grad_xd ⊙ m · scale and xd = x ⊙ m · scale, one draw of m
//   mask(out bool [n] contiguous, ...)         out[e] = m[e]
//   uniform(out float32 [n] contiguous, ...)   out[e] = uniform(word e)
//   words(groups int64 [G], out int64 [G, 4], ...)   the raw words of the given counter blocks
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>

#include "../common/checks.h"
#include "../common/outputs.h"
#include "../rank_product/rank_product.h"
#include "dropout_math.h"

namespace peftkern {
namespace dropout {

// Seeds and offsets travel as torch `int` (int64) and are read as the uint64 they encode.
inline uint64_t as_u64(int64_t v) { return static_cast<uint64_t>(v); }

inline void check_p(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
}

inline void check_x(const char* op, const at::Tensor& x) {
  check_dtype(x, op, "x", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, features], got shape ", x.sizes());
}

template <class Kernels>
struct Ops {
  static at::Tensor dropout(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
    constexpr const char* op = "lora_dropout";
    check_x(op, x);
    check_p(op, p);
    at::Tensor out = new_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (out.numel() > 0) Kernels::dropout(x, out, as_u64(seed), as_u64(offset), keep_threshold(p), 1.0 / (1.0 - p));
    return out;
  }

  static void accumulate(at::Tensor& out, const at::Tensor& x, double p, int64_t seed, int64_t offset) {
    constexpr const char* op = "lora_dropout_accumulate_";
    check_x(op, x);
    check_p(op, p);
    check_like(out, op, "out", x);
    TORCH_CHECK(out.sizes() == x.sizes(), op, ": out is ", out.sizes(), " but x is ", x.sizes());
    TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
    if (out.numel() > 0) Kernels::accumulate(out, x, as_u64(seed), as_u64(offset), keep_threshold(p), 1.0 / (1.0 - p));
  }

  static at::Tensor backward(at::Tensor& grad_x, const at::Tensor& grad_xd, const at::Tensor& x, double p,
                             int64_t seed, int64_t offset) {
    constexpr const char* op = "lora_dropout_backward_";
    check_x(op, x);
    check_p(op, p);
    check_like(grad_xd, op, "grad_xd", x);
    TORCH_CHECK(grad_xd.sizes() == x.sizes(), op, ": grad_xd is ", grad_xd.sizes(), " but x is ", x.sizes());
    check_like(grad_x, op, "grad_x", x);
    TORCH_CHECK(grad_x.sizes() == x.sizes(), op, ": grad_x is ", grad_x.sizes(), " but x is ", x.sizes());
    TORCH_CHECK(grad_x.is_contiguous(), op, ": grad_x must be contiguous");
    for (const at::Tensor* read : {&x, &grad_xd}) {  // TooHard (a strided read) is taken as no overlap, as ATen does
      const at::MemOverlapStatus status = at::get_overlap_status(grad_x, *read);
      TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op,
                  ": grad_x must not overlap x or grad_xd");
    }
    at::Tensor xd = new_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (xd.numel() > 0) {
      Kernels::backward(grad_x, grad_xd, x, xd, as_u64(seed), as_u64(offset), keep_threshold(p), 1.0 / (1.0 - p));
    }
    return xd;
  }

  static at::Tensor mask(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
    check_p("lora_dropout_mask", p);
    at::Tensor out = new_output(x.sizes(), x.options().dtype(at::kBool).memory_format(at::MemoryFormat::Contiguous));
    if (out.numel() > 0) Kernels::mask(out, as_u64(seed), as_u64(offset), keep_threshold(p));
    return out;
  }

  static at::Tensor uniform(const at::Tensor& x, int64_t seed, int64_t offset) {
    at::Tensor out = new_output(x.sizes(), x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
    if (out.numel() > 0) Kernels::uniform(out, as_u64(seed), as_u64(offset));
    return out;
  }

  static at::Tensor words(const at::Tensor& groups, int64_t seed, int64_t offset) {
    constexpr const char* op = "philox_words";
    check_dtype(groups, op, "groups", {at::kLong});
    TORCH_CHECK(groups.dim() == 1, op, ": groups must be 1-D, got shape ", groups.sizes());
    at::Tensor g = groups.contiguous();
    at::Tensor out = new_output({g.size(0), 4}, g.options());
    if (g.numel() > 0) Kernels::words(g, out, as_u64(seed), as_u64(offset));
    return out;
  }
};

// --- Entry points for the LoRA families' host code (lora_linear.cpp, scaled_lora_host.h) ---------
// Through the dispatcher, so a CUDA tensor reaches the CUDA kernel (and, in tests, the CUDA
// emulation's override of the CPU kernel runs here too).

// The input of the A-projection: x itself without dropout, else a new xd = x ⊙ m/(1−p).
inline at::Tensor lora_input(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  if (p == 0.0) return x;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("peftkern::lora_dropout", "")
                             .typed<at::Tensor(const at::Tensor&, double, int64_t, int64_t)>();
  return op.call(x, p, seed, offset);
}

// The A-projection xa = dropout(x)·Aᵀ [M, r] (peftkern::lora_dropout_project: one pass on CPU,
// xd never written; x·Aᵀ when p = 0).
inline at::Tensor project(const at::Tensor& x, const at::Tensor& lora_a, double p, int64_t seed, int64_t offset) {
#if defined(PEFTKERN_CUDA_EMULATION)  // the emulation's library (tests) does not link csrc/rank_product/
  if (p == 0.0) return at::mm(x, lora_a.t());
#else
  if (p == 0.0) return rank::project(x, lora_a);
#endif
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("peftkern::lora_dropout_project", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t, int64_t)>();
  return op.call(x, lora_a, p, seed, offset);
}

// The backward's dropout in one draw: grad_x += dropout(grad_xd) and returns dropout(x) (x
// itself, and a plain add, without dropout). grad_x contiguous.
inline at::Tensor backward_lora_grad(at::Tensor& grad_x, const at::Tensor& grad_xd, const at::Tensor& x, double p,
                                     int64_t seed, int64_t offset) {
  if (p == 0.0) {
    grad_x.add_(grad_xd);
    return x;
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("peftkern::lora_dropout_backward_", "")
          .typed<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, int64_t)>();
  return op.call(grad_x, grad_xd, x, p, seed, offset);
}

}  // namespace dropout
}  // namespace peftkern
