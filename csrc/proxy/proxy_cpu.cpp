// CPU kernel of Proxy-tuning's decode-step op: per row (parallel over rows), combine the three
// logit rows into the output, then top-k and top-p by one stable ascending sort of the row's
// indices, exactly as the warpers define them (peftkern/ops/proxy.py). The per-element math is
// proxy_math.h, shared with the CUDA kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "../common/dispatch.h"
#include "proxy_host.h"

namespace peftkern {
namespace proxy {
namespace {

template <typename T, typename U>
void proxy_rows(const Args& args, float* out) {
  const Filter f = args.filter;
  const int64_t vocab = args.vocab;
  const auto* base = static_cast<const T*>(args.base.data);
  const auto* expert = static_cast<const U*>(args.expert.data);
  const auto* anti = static_cast<const U*>(args.anti.data);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1));
  at::parallel_for(0, args.rows, grain, [&](int64_t first, int64_t last) {
    std::vector<int64_t> order;
    for (int64_t r = first; r < last; ++r) {
      float* z = out + r * vocab;
      bool bad = false;
      for (int64_t v = 0; v < vocab; ++v) {
        z[v] = combine(static_cast<float>(base[r * args.base.stride0 + v * args.base.stride1]),
                       static_cast<float>(expert[r * args.expert.stride0 + v * args.expert.stride1]),
                       static_cast<float>(anti[r * args.anti.stride0 + v * args.anti.stride1]), f.alpha,
                       f.temperature);
        bad = bad || unusable(z[v]);
      }
      if (bad) {
        std::fill(z, z + vocab, std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      if (f.top_k == 0 && !f.use_top_p) continue;
      // Ascending by (z, index): ties in index order, the stable sort the warpers' order means.
      order.resize(vocab);
      std::iota(order.begin(), order.end(), int64_t{0});
      const auto less = [z](int64_t i, int64_t j) { return z[i] < z[j] || (z[i] == z[j] && i < j); };
      int64_t removed = 0;
      float kth = -std::numeric_limits<float>::infinity();
      if (!f.use_top_p) {  // top-k alone: a selection is enough
        std::nth_element(order.begin(), order.begin() + (vocab - f.top_k), order.end(), less);
        kth = z[order[vocab - f.top_k]];
        for (int64_t v = 0; v < vocab; ++v) {
          if (z[v] < kth) z[v] = -std::numeric_limits<float>::infinity();
        }
        continue;
      }
      std::sort(order.begin(), order.end(), less);
      if (f.top_k > 0) {
        kth = z[order[vocab - f.top_k]];
        while (z[order[removed]] < kth) ++removed;  // the tokens below the k-th largest value
      }
      // Top-p over the top-k survivors (the removed ones have probability 0).
      const float row_max = z[order[vocab - 1]];
      double total = 0.0;
      for (int64_t i = removed; i < vocab; ++i) total += weight(z[order[i]], row_max);
      const double threshold = (1.0 - f.top_p) * total;
      double cumulative = 0.0;
      int64_t by_p = removed;
      while (by_p < vocab) {
        cumulative += weight(z[order[by_p]], row_max);
        if (!(cumulative <= threshold)) break;
        ++by_p;
      }
      removed = std::max(removed, std::min(by_p, f.max_removed));
      for (int64_t i = 0; i < removed; ++i) z[order[i]] = -std::numeric_limits<float>::infinity();
    }
  });
}

at::Tensor proxy_logits_cpu(const at::Tensor& base, const at::Tensor& expert, const at::Tensor& anti_expert,
                            double alpha, double temperature, int64_t top_k, double top_p,
                            int64_t min_tokens_to_keep) {
  auto [args, out] = check_and_allocate(base, expert, anti_expert, alpha, temperature, top_k, top_p,
                                        min_tokens_to_keep);
  if (out.numel() == 0) return out;
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(args.base_dtype, "proxy_logits_cpu", [&] {
    using T = scalar_t;
    PK_DISPATCH_FLOAT_HALF_BFLOAT16(args.expert_dtype, "proxy_logits_cpu", [&] {
      proxy_rows<T, scalar_t>(args, out.mutable_data_ptr<float>());
    });
  });
  return out;
}

}  // namespace
}  // namespace proxy
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, CPU, m) { m.impl("proxy_logits", &peftkern::proxy::proxy_logits_cpu); }
