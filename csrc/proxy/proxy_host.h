// Host-side checks and allocation of the Proxy-tuning decode-step op, shared by the CPU and CUDA
// implementations so both accept and reject exactly the same inputs.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "../common/checks.h"
#include "../common/outputs.h"
#include "proxy_math.h"

namespace peftkern {
namespace proxy {

// A [rows, >= vocab] logits view: only the first `vocab` columns are read.
struct Rows {
  const void* data;
  int64_t stride0, stride1;
};

struct Args {
  Rows base, expert, anti;
  at::ScalarType base_dtype, expert_dtype;
  int64_t rows, vocab;
  Filter filter;
};

inline Rows rows_of(const at::Tensor& t) { return Rows{t.const_data_ptr(), t.stride(0), t.stride(1)}; }

// Checks every input; returns the kernel's arguments and the float32 [B, V] output.
inline std::pair<Args, at::Tensor> check_and_allocate(const at::Tensor& base, const at::Tensor& expert,
                                                      const at::Tensor& anti_expert, double alpha, double temperature,
                                                      int64_t top_k, double top_p, int64_t min_tokens_to_keep) {
  constexpr const char* op = "proxy_logits";
  const std::pair<const at::Tensor*, const char*> inputs[] = {
      {&base, "base"}, {&expert, "expert"}, {&anti_expert, "anti_expert"}};
  for (const auto& [t, name] : inputs) {
    check_dtype(*t, op, name, {at::kFloat, at::kHalf, at::kBFloat16});
    TORCH_CHECK(t->dim() == 2, op, ": ", name, " must be [batch, vocab], got shape ", t->sizes());
    check_device(*t, op, name, base, "base");
    TORCH_CHECK(t->size(0) == base.size(0), op, ": ", name, " has ", t->size(0), " rows but base has ",
                base.size(0));
    TORCH_CHECK(t->size(1) >= base.size(1), op, ": ", name, " has ", t->size(1),
                " vocabulary columns, fewer than base's ", base.size(1));
  }
  TORCH_CHECK(anti_expert.scalar_type() == expert.scalar_type(), op, ": anti_expert is ", anti_expert.scalar_type(),
              " but expert is ", expert.scalar_type(), " (the two small models' logits share a dtype)");
  TORCH_CHECK(std::isfinite(alpha), op, ": alpha must be finite, got ", alpha);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op,
              ": temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK(top_k >= 0, op, ": top_k must be >= 0 (0: off), got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, op, ": top_p must be in (0, 1] (1: off), got ", top_p);
  TORCH_CHECK(min_tokens_to_keep >= 1, op, ": min_tokens_to_keep must be >= 1, got ", min_tokens_to_keep);
  const int64_t rows = base.size(0), vocab = base.size(1);
  const int64_t k = top_k > 0 ? std::max(top_k, min_tokens_to_keep) : 0;
  const Filter filter{static_cast<float>(alpha), static_cast<float>(temperature), k < vocab ? k : 0, top_p,
                      top_p < 1.0, vocab - min_tokens_to_keep};
  auto out = new_output({rows, vocab}, base.options().dtype(at::kFloat));
  return {Args{rows_of(base), rows_of(expert), rows_of(anti_expert), base.scalar_type(), expert.scalar_type(), rows,
               vocab, filter},
          out};
}

}  // namespace proxy
}  // namespace peftkern
