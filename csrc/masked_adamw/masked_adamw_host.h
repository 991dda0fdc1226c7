// Host-side checks of the fused masked AdamW ops, shared by the CPU and CUDA implementations so
// both accept and reject exactly the same inputs, and the float32 constants both kernels use.
#pragma once

#include <ATen/ATen.h>

#include "../common/checks.h"
#include "../common/outputs.h"
#include "masked_adamw_math.h"

namespace peftkern {
namespace masked_adamw {

struct StepArgs {
  Constants constants;
  Mask mask;
  int64_t numel;
};

inline void check_reserve_p(double reserve_p, const char* op) {
  TORCH_CHECK(reserve_p > 0.0 && reserve_p <= 1.0, op, ": reserve_p must be in (0, 1], got ", reserve_p);
}

inline Mask make_mask(const uint8_t* bits, double reserve_p, int64_t seed, int64_t offset) {
  // keep_scale as the reference's `keep / reserve_p` (float32 1 / float32 p); D has factor 1.
  const float p = static_cast<float>(reserve_p);
  return Mask{bits, p, bits != nullptr ? 1.0f : 1.0f / p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
}

// Checks every input of masked_adamw_; returns the kernels' arguments.
inline StepArgs check_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                           const at::Tensor& exp_avg_sq, const c10::optional<at::Tensor>& mask_bits,
                           double reserve_p, int64_t seed, int64_t offset, double lr, double beta1, double beta2,
                           double eps, double weight_decay, double step_size) {
  constexpr const char* op = "masked_adamw_";
  // A uint8 "parameter" is an NF4 (4-bit) weight's packed codes: full-weight training needs floats.
  TORCH_CHECK(param.scalar_type() != at::kByte, op, ": param is uint8 (NF4 / 4-bit packed codes?); "
              "Child-Tuning trains full weights, which a 4-bit base cannot hold");
  check_dtype(param, op, "param", {at::kFloat, at::kBFloat16, at::kHalf});
  check_like(grad, op, "grad", param, "param");
  check_dtype(exp_avg, op, "exp_avg", {at::kFloat});
  check_dtype(exp_avg_sq, op, "exp_avg_sq", {at::kFloat});
  const int64_t n = param.numel();
  for (const auto& [t, name] : {std::pair{&grad, "grad"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}}) {
    TORCH_CHECK(t->sizes() == param.sizes(), op, ": ", name, " must have param's shape ", param.sizes(), ", got ",
                t->sizes());
    check_device(*t, op, name, param, "param");
  }
  for (const auto* t : {&param, &grad, &exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->is_contiguous(), op, ": param, grad, exp_avg and exp_avg_sq must be contiguous");
  }
  check_reserve_p(reserve_p, op);
  TORCH_CHECK(lr >= 0.0 && beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0 && eps >= 0.0, op,
              ": invalid lr=", lr, ", betas=(", beta1, ", ", beta2, ") or eps=", eps);
  const uint8_t* bits = nullptr;
  if (mask_bits.has_value()) {
    const at::Tensor& m = *mask_bits;
    check_dtype(m, op, "mask_bits", {at::kByte});
    check_numel(m, op, "mask_bits (1 bit per element of param, packed 8 per byte)", ceil_div(n, 8));
    check_device(m, op, "mask_bits", param, "param");
    TORCH_CHECK(m.is_contiguous(), op, ": mask_bits must be contiguous");
    TORCH_CHECK(reserve_p == 1.0, op, ": mask_bits (mode D) takes no rescale; reserve_p must be 1, got ", reserve_p);
    bits = m.const_data_ptr<uint8_t>();
  }
  const Constants c{static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                    static_cast<float>(1.0 - beta2), static_cast<float>(eps), static_cast<float>(-step_size),
                    static_cast<float>(-lr * weight_decay)};
  return StepArgs{c, make_mask(bits, reserve_p, seed, offset), n};
}

// Checks masked_adamw_keep_mask's inputs and allocates its bool output shaped like `like`.
inline std::pair<Mask, at::Tensor> check_keep_mask(const at::Tensor& like, double reserve_p, int64_t seed,
                                                   int64_t offset) {
  check_reserve_p(reserve_p, "masked_adamw_keep_mask");
  auto out = new_output(like.sizes(), like.options().dtype(at::kBool));
  return {make_mask(nullptr, reserve_p, seed, offset), out};
}

}  // namespace masked_adamw
}  // namespace peftkern
