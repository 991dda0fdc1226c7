// CPU kernel of Proxy-tuning's decode-step op: per row (parallel over rows), combine the three
// logit rows into the output, then top-k by a selection and top-p by a stable ascending sort of
// the top-k survivors (of the whole row without top-k), exactly as the warpers define them
// (peftkern/ops/proxy.py). The per-element math is
// proxy_math.h, shared with the CUDA kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../common/dispatch.h"
#include "proxy_host.h"

namespace peftkern {
namespace proxy {
namespace {

struct Entry {
  float z;
  int64_t index;
  bool operator<(const Entry& o) const { return z < o.z || (z == o.z && index < o.index); }
};

template <typename T, typename U>
void proxy_rows(const Args& args, float* out) {
  const Filter f = args.filter;
  const int64_t vocab = args.vocab;
  const auto* base = static_cast<const T*>(args.base.data);
  const auto* expert = static_cast<const U*>(args.expert.data);
  const auto* anti = static_cast<const U*>(args.anti.data);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1));
  at::parallel_for(0, args.rows, grain, [&](int64_t first, int64_t last) {
    std::vector<Entry> entries;
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
      // (value, index) pairs in a contiguous buffer: the sorts compare in cache, not through
      // indices into the row. Ascending by (z, index) is the stable order the warpers mean.
      entries.resize(vocab);
      for (int64_t v = 0; v < vocab; ++v) entries[v] = Entry{z[v], v};
      int64_t candidates = vocab, below_kth = 0;
      float kth = -std::numeric_limits<float>::infinity();
      if (f.top_k > 0) {
        // Top-k: a selection of the k-th largest; only the survivors (z >= kth, about k of them)
        // go on to top-p, whose removed tokens are a prefix of the same order.
        std::nth_element(entries.begin(), entries.begin() + (vocab - f.top_k), entries.end());
        kth = entries[vocab - f.top_k].z;
        candidates = 0;
        for (int64_t v = 0; v < vocab; ++v) {
          if (z[v] < kth) {
            z[v] = -std::numeric_limits<float>::infinity();
            ++below_kth;
          } else {
            entries[candidates++] = Entry{z[v], v};
          }
        }
        if (!f.use_top_p) continue;
      }
      std::sort(entries.begin(), entries.begin() + candidates);
      // Top-p over the top-k survivors (the tokens below kth have probability 0).
      const float row_max = entries[candidates - 1].z;
      double total = 0.0;
      for (int64_t i = 0; i < candidates; ++i) total += weight(entries[i].z, row_max);
      const double threshold = (1.0 - f.top_p) * total;
      double cumulative = 0.0;
      int64_t by_p = 0;
      while (by_p < candidates) {
        cumulative += weight(entries[by_p].z, row_max);
        if (!(cumulative <= threshold)) break;
        ++by_p;
      }
      // min_tokens_to_keep caps the tokens removed in all (V − keep), top-k's included.
      const int64_t removed = std::max<int64_t>(0, std::min(by_p, f.max_removed - below_kth));
      for (int64_t i = 0; i < removed; ++i) z[entries[i].index] = -std::numeric_limits<float>::infinity();
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
