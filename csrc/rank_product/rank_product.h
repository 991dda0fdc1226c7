// The rank-r products of LoRA (csrc/rank_product/): every GEMM of a LoRA layer except the base
// one has one side of r ≤ 64 columns, and each streams one big [M, D] matrix once:
//
//   forward   xa      = x·Aᵀ                 [M, r]   x [M, K] read
//             out    += s·xa·Bᵀ              [M, N]   out read and written
//   backward  grad_xa = s·grad_out·B         [M, r]   } grad_out [M, N] read once for both
//             grad_B  = s·grad_outᵀ·xa       [N, r]   }
//             grad_x += grad_xa·A            [M, K]   } x read, grad_x read and written, once
//             grad_A  = grad_xaᵀ·x           [r, K]   } for both
//
// At r = 16 these run at 2·r/4 = 8 flop per byte of the big matrix: compute-bound in cache, and
// MKL reaches 45-100 GFLOP/s per core on them (its blocking is built for square GEMMs), a third
// to a half of an AVX-512 core's FMA peak. The kernels here (AVX-512, float32) hold the small side
// in registers, broadcast one element of the big side against a 16-lane vector of the other, and
// fuse the pairs that read the same big matrix into one pass (DESIGN.md "Rank-r products").
//
// Every function takes the AVX-512 kernel where it applies (CPU, float32, the AVX-512 path
// selected, 1 ≤ r ≤ 64, unit stride along D of the big matrices) and otherwise ATen's GEMMs (MKL
// / oneDNN on CPU, cuBLAS on CUDA), with the same results up to float rounding. The kernels sum
// in float32 in an order that does not depend on the number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>
#include <utility>

namespace peftkern {
namespace rank {

// Whether the AVX-512 kernels take a product whose big matrix is `big` and whose rank is r.
bool use_kernels(const at::Tensor& big, int64_t r);

// x·Aᵀ: x [M, K], lora_a [r, K] -> [M, r].
at::Tensor project(const at::Tensor& x, const at::Tensor& lora_a);

// out += alpha·xa·Bᵀ in place: out [M, N], xa [M, r], lora_b [N, r].
void add_expand_(at::Tensor& out, const at::Tensor& xa, const at::Tensor& lora_b, double alpha);

// grad_xa·A as a new [M, K] tensor: grad_xa [M, r], lora_a [r, K].
at::Tensor expand(const at::Tensor& grad_xa, const at::Tensor& lora_a);

// -> (grad_xa = s·grad_out·B [M, r], grad_B = s·grad_outᵀ·xa [N, r]), one pass over grad_out.
std::pair<at::Tensor, at::Tensor> out_grads(const at::Tensor& grad_out, const at::Tensor& xa,
                                            const at::Tensor& lora_b, double scaling);

// grad_x += grad_xa·A in place (skipped when grad_x is undefined), and returns grad_xaᵀ·x
// [r, K], one pass over x (and grad_x). x [M, K], grad_xa [M, r], lora_a [r, K].
at::Tensor input_grads_(at::Tensor grad_x, const at::Tensor& x, const at::Tensor& grad_xa, const at::Tensor& lora_a);

// input_grads_ with LoRA dropout (p, seed, offset) drawn again: grad_x += (grad_xa·A) ⊙ m/(1−p) and
// returns grad_xaᵀ·(x ⊙ m/(1−p)); input_grads_ itself when p = 0. grad_x contiguous when p > 0.
at::Tensor input_grads_dropout_(at::Tensor grad_x, const at::Tensor& x, const at::Tensor& grad_xa,
                                const at::Tensor& lora_a, double p, int64_t seed, int64_t offset);

// The ops `lora_out_grads` and `lora_input_grads_` (out_grads and input_grads_dropout_ above, with
// their checks) through the dispatcher, for the C++ autograd formulas (lora_linear.cpp,
// qlora_train.cpp): tracing (torch.compile, opcheck's fake tensors) sees the ops, not the kernels.
inline std::tuple<at::Tensor, at::Tensor> out_grads_op(const at::Tensor& grad_out, const at::Tensor& xa,
                                                       const at::Tensor& lora_b, double scaling) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("peftkern::lora_out_grads", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(grad_out, xa, lora_b, scaling);
}

inline at::Tensor input_grads_op_(at::Tensor& grad_x, const at::Tensor& x, const at::Tensor& grad_xa,
                                  const at::Tensor& lora_a, double p, int64_t seed, int64_t offset) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("peftkern::lora_input_grads_", "")
                             .typed<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               double, int64_t, int64_t)>();
  return op.call(grad_x, x, grad_xa, lora_a, p, seed, offset);
}

}  // namespace rank
}  // namespace peftkern
