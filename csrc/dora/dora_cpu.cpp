// DoRA's weight norm on CPU: norms[i] = || W[i, :] + scaling * (B[i, :] @ A) ||_2 for every
// output row i, without materialising W + scaling * B @ A ([N, K]): each row is built in a
// K-float scratch buffer by r axpy passes (vectorised), then reduced. Accumulates in float32
// (double for double inputs). Parallel over rows with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common/dispatch.h"
#include "dora_host.h"

namespace peftkern {
namespace dora {
namespace {

template <typename T, typename Acc>
void weight_norm_rows(const T* w, const T* a, const T* b, Acc scaling, int64_t n, int64_t k,
                      int64_t r, T* out) {
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)),
                   [&](int64_t first, int64_t last) {
                     std::vector<Acc> row(k);
                     for (int64_t i = first; i < last; ++i) {
                       for (int64_t j = 0; j < k; ++j) row[j] = static_cast<Acc>(w[i * k + j]);
                       for (int64_t q = 0; q < r; ++q) {
                         const Acc coef = scaling * static_cast<Acc>(b[i * r + q]);
                         const T* a_row = a + q * k;
                         for (int64_t j = 0; j < k; ++j) row[j] += coef * static_cast<Acc>(a_row[j]);
                       }
                       Acc sum = 0;
                       for (int64_t j = 0; j < k; ++j) sum += row[j] * row[j];
                       out[i] = static_cast<T>(std::sqrt(sum));
                     }
                   });
}

at::Tensor dora_weight_norm_cpu(const at::Tensor& weight, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, double scaling) {
  at::Tensor out = check_and_allocate_weight_norm(weight, lora_a, lora_b);
  const at::Tensor w = weight.contiguous(), a = lora_a.contiguous(), b = lora_b.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dora_weight_norm", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    weight_norm_rows<scalar_t, acc_t>(w.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                                      b.const_data_ptr<scalar_t>(), static_cast<acc_t>(scaling),
                                      w.size(0), w.size(1), a.size(0),
                                      out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace dora
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("dora_weight_norm", &peftkern::dora::dora_weight_norm_cpu);
}
