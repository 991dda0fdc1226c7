// Host-side checks and allocation for the DoRA weight-norm op, shared by CPU and CUDA.
#pragma once

#include <ATen/ATen.h>

#include "../common/checks.h"
#include "../common/outputs.h"

namespace peftkern {
namespace dora {

// Validates weight [N, K], lora_a [r, K], lora_b [N, r] (same dtype and device) and returns the
// output: norms [N] in the weight's dtype.
inline at::Tensor check_and_allocate_weight_norm(const at::Tensor& weight, const at::Tensor& lora_a,
                                                 const at::Tensor& lora_b) {
  constexpr const char* op = "dora_weight_norm";
  check_dtype(weight, op, "weight", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(weight.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2, op,
              ": weight, lora_a and lora_b must be 2-D");
  const int64_t n = weight.size(0), k = weight.size(1), r = lora_a.size(0);
  TORCH_CHECK(lora_a.size(1) == k, op, ": lora_a is ", lora_a.sizes(), ", expected [r, ", k, "]");
  TORCH_CHECK(lora_b.size(0) == n && lora_b.size(1) == r, op, ": lora_b is ", lora_b.sizes(),
              ", expected [", n, ", ", r, "]");
  for (const auto* t : {&lora_a, &lora_b}) {
    TORCH_CHECK(t->scalar_type() == weight.scalar_type(), op, ": lora_a and lora_b must be ",
                weight.scalar_type(), " like weight, got ", t->scalar_type());
    check_device(*t, op, "lora_a/lora_b", weight, "weight");
  }
  return new_output({n}, weight.options());
}

}  // namespace dora
}  // namespace peftkern
