// CUDA kernel of Proxy-tuning's decode-step op. Same checks (proxy_host.h) and per-element math
// (proxy_math.h) as proxy_cpu.cpp; same result, token for token (peftkern/ops/proxy.py).
//
// One block per row (grid-stride over rows). A row of a real vocabulary (32k-256k floats) does
// not fit in shared memory, so instead of sorting it the block finds each threshold the warpers
// define by bisection over the 32-bit order keys of its values (proxy_math.h order_key), each
// step one coalesced pass over the row (which stays in L1/L2) and a block reduction:
//   - top-k: the largest key t with #{key >= t} >= k (the k-th largest value; ties kept);
//   - top-p: the largest key t with Σ_{key <= t} w <= (1 − top_p)·Σ w over the top-k survivors,
//     then the next group of tied values, removed in index order while the sum stays <= it;
//   - then the cut of R removed tokens, R capped by min_tokens_to_keep, as a (key, index) pair:
//     the smallest key t with #{key <= t} > R, then the index inside that group of ties.
// About 100 passes over the row instead of a sort: no scratch memory, no atomics, and the
// reductions run in a fixed order, so the result is the same on every run. Greedy decoding
// (no filter) is the first pass alone.
#include "../common/cuda_launch.h"
#include <torch/library.h>

#include <algorithm>

#include "../common/cuda_block_reduce.h"
#include "../common/cuda_guard.h"
#include "../common/dispatch.h"
#include "proxy_host.h"

namespace peftkern {
namespace proxy {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = PK_GRID_STRIDE_CAP(65535);

using cuda::Add;

struct Min {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};
struct MaxNan {
  __device__ double operator()(double a, double b) const { return (b > a || b != b) ? b : a; }
};

// Σ over the row of pred(v, key(z[v]), z[v]) as int64, or of a double term.
template <typename Pred>
__device__ int64_t count_row(const float* z, int64_t vocab, int64_t* scratch, Pred pred) {
  int64_t n = 0;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) n += pred(v, order_key(z[v])) ? 1 : 0;
  return cuda::block_reduce<kThreads>(n, scratch, Add{});
}

template <typename Term>
__device__ double sum_row(const float* z, int64_t vocab, double* scratch, Term term) {
  double s = 0.0;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) s += term(z[v], order_key(z[v]));
  return cuda::block_reduce<kThreads>(s, scratch, Add{});
}

template <typename T, typename U>
__global__ void proxy_logits_kernel(const T* __restrict__ base,    // [rows, >= vocab], strides (bs0, bs1)
                                    const U* __restrict__ expert,  // [rows, >= vocab], strides (es0, es1)
                                    const U* __restrict__ anti,    // [rows, >= vocab], strides (as0, as1)
                                    float* __restrict__ out,       // [rows, vocab]
                                    int64_t rows, int64_t vocab, int64_t bs0, int64_t bs1, int64_t es0, int64_t es1,
                                    int64_t as0, int64_t as1, Filter f) {
  __shared__ int64_t counts[kThreads];
  __shared__ double sums[kThreads];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float* z = out + r * vocab;
    bool bad = false;
    double row_max = -INFINITY;
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      const float value = combine(static_cast<float>(base[r * bs0 + v * bs1]), static_cast<float>(expert[r * es0 + v * es1]),
                                  static_cast<float>(anti[r * as0 + v * as1]), f.alpha, f.temperature);
      z[v] = value;
      bad = bad || unusable(value);
      row_max = MaxNan{}(row_max, static_cast<double>(value));
    }
    // Each thread re-reads only what it wrote until this barrier (inside the reductions).
    if (cuda::block_reduce<kThreads, int64_t>(bad ? 1 : 0, counts, Add{}) > 0) {
      for (int64_t v = threadIdx.x; v < vocab; v += kThreads) z[v] = NAN;
      continue;
    }
    if (f.top_k == 0 && !f.use_top_p) continue;
    const float max_value = static_cast<float>(cuda::block_reduce<kThreads>(row_max, sums, MaxNan{}));

    int64_t removed = 0;
    uint32_t kth_key = 0;  // tokens with a smaller key are removed by top-k
    if (f.top_k > 0) {
      int64_t lo = 0, hi = int64_t{1} << 32;  // #{key >= lo} >= k, #{key >= hi} < k
      while (hi - lo > 1) {
        const int64_t mid = lo + (hi - lo) / 2;
        const int64_t n = count_row(z, vocab, counts, [=](int64_t, uint32_t key) { return key >= mid; });
        (n >= f.top_k ? lo : hi) = mid;
      }
      kth_key = static_cast<uint32_t>(lo);
      if (!f.use_top_p) {
        for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
          if (order_key(z[v]) < kth_key) z[v] = -INFINITY;
        }
        continue;
      }
      removed = count_row(z, vocab, counts, [=](int64_t, uint32_t key) { return key < kth_key; });
    }
    // Top-p over the top-k survivors.
    const auto kept_weight = [=](float value, uint32_t key) { return key >= kth_key ? weight(value, max_value) : 0.0; };
    const double threshold = (1.0 - f.top_p) * sum_row(z, vocab, sums, kept_weight);
    int64_t lo = 0, hi = int64_t{1} << 32;  // W(lo) <= threshold < W(hi), W(t) = Σ_{key <= t} w
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      const double w = sum_row(z, vocab, sums, [=](float value, uint32_t key) {
        return key <= mid ? kept_weight(value, key) : 0.0;
      });
      (w <= threshold ? lo : hi) = mid;
    }
    const double below = sum_row(z, vocab, sums, [=](float value, uint32_t key) {
      return key <= lo ? kept_weight(value, key) : 0.0;
    });
    const int64_t at_or_below = count_row(z, vocab, counts, [=](int64_t, uint32_t key) { return key <= lo; });
    int64_t next = INT64_MAX;  // the next larger key present: the group that crosses the threshold
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      const int64_t key = order_key(z[v]);
      if (key > lo && key < next) next = key;
    }
    next = cuda::block_reduce<kThreads>(next, counts, Min{});
    int64_t by_p = at_or_below;
    if (next != INT64_MAX) {
      const int64_t ties = count_row(z, vocab, counts, [=](int64_t, uint32_t key) { return key == next; });
      float value = -INFINITY;  // the group's value, from its key
      for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
        if (order_key(z[v]) == next) value = z[v];
      }
      value = static_cast<float>(cuda::block_reduce<kThreads>(static_cast<double>(value), sums, MaxNan{}));
      by_p += removed_in_group(below, kept_weight(value, static_cast<uint32_t>(next)), ties, threshold);
    }
    by_p = by_p < f.max_removed ? by_p : f.max_removed;
    removed = removed > by_p ? removed : by_p;
    if (removed <= 0) continue;

    // The first kept token in (key, index) order: key t, then index u within t's ties.
    lo = -1, hi = (int64_t{1} << 32) - 1;  // #{key <= lo} <= removed < #{key <= hi}
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      const int64_t n = count_row(z, vocab, counts, [=](int64_t, uint32_t key) { return key <= mid; });
      (n > removed ? hi : lo) = mid;
    }
    const int64_t cut_key = hi;
    const int64_t tied_removed =
        removed - count_row(z, vocab, counts, [=](int64_t, uint32_t key) { return key < cut_key; });
    int64_t ulo = -1, uhi = vocab - 1;  // #{key == t, index <= ulo} <= tied_removed < #{... <= uhi}
    while (uhi - ulo > 1) {
      const int64_t mid = ulo + (uhi - ulo) / 2;
      const int64_t n = count_row(z, vocab, counts, [=](int64_t v, uint32_t key) { return key == cut_key && v <= mid; });
      (n > tied_removed ? uhi : ulo) = mid;
    }
    const int64_t cut_index = uhi;
    // Everyone has read the row for the last time (the reductions' barriers): overwrite it.
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      const int64_t key = order_key(z[v]);
      if (key < cut_key || (key == cut_key && v < cut_index)) z[v] = -INFINITY;
    }
  }
}

at::Tensor proxy_logits_cuda(const at::Tensor& base, const at::Tensor& expert, const at::Tensor& anti_expert,
                             double alpha, double temperature, int64_t top_k, double top_p,
                             int64_t min_tokens_to_keep) {
  const CudaDeviceGuard guard(base);
  auto [args, out] = check_and_allocate(base, expert, anti_expert, alpha, temperature, top_k, top_p,
                                        min_tokens_to_keep);
  if (out.numel() == 0) return out;
  const auto grid = static_cast<unsigned int>(std::min<int64_t>(args.rows, kMaxGrid));
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(args.base_dtype, "proxy_logits_cuda", [&] {
    using T = scalar_t;
    PK_DISPATCH_FLOAT_HALF_BFLOAT16(args.expert_dtype, "proxy_logits_cuda", [&] {
      using U = scalar_t;
      PK_LAUNCH(grid, kThreads, 0, at::cuda::getCurrentCUDAStream(), proxy_logits_kernel<T, U>)(static_cast<const T*>(args.base.data), static_cast<const U*>(args.expert.data), static_cast<const U*>(args.anti.data), out.mutable_data_ptr<float>(), args.rows, args.vocab, args.base.stride0, args.base.stride1, args.expert.stride0, args.expert.stride1, args.anti.stride0, args.anti.stride1, args.filter);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace
}  // namespace proxy
}  // namespace peftkern

PK_CUDA_LIBRARY_IMPL(m) { m.impl("proxy_logits", &peftkern::proxy::proxy_logits_cuda); }
