// Host-side checks and allocation of the ReLoRA NF4 merge, shared by the CPU and CUDA
// implementations so both accept and reject exactly the same inputs.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "../common/checks.h"
#include "../common/outputs.h"
#include "relora_math.h"

namespace peftkern {
namespace relora {

struct MergeArgs {
  LowRank low_rank;
  int64_t numel;
  int64_t blocksize;
  int64_t blocks;
};

// Checks every input; returns the kernel's arguments and the (new packed, new absmax) outputs.
inline std::tuple<MergeArgs, at::Tensor, at::Tensor> check_and_allocate_merge(
    const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double scaling, int64_t blocksize, at::IntArrayRef shape) {
  constexpr const char* op = "nf4_merge_lowrank";
  check_blocksize(blocksize, op);
  TORCH_CHECK(shape.size() == 2, op, ": shape must be [out_features, in_features], got ", shape);
  const int64_t n = shape_numel(shape, op);
  const int64_t blocks = ceil_div(n, blocksize);
  check_dtype(packed, op, "packed", {at::kByte});
  check_numel(packed, op, "packed", ceil_div(n, 2));
  check_dtype(absmax, op, "absmax", {at::kFloat});
  check_numel(absmax, op, "absmax", blocks);
  check_dtype(lora_a, op, "lora_a", {at::kFloat});
  check_dtype(lora_b, op, "lora_b", {at::kFloat});
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == shape[1], op, ": lora_a must be [r, ", shape[1],
              "], got ", lora_a.sizes());
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(0) == shape[0] && lora_b.size(1) == lora_a.size(0), op,
              ": lora_b must be [", shape[0], ", ", lora_a.size(0), "], got ", lora_b.sizes());
  for (const auto* t : {&absmax, &lora_a, &lora_b}) {
    check_device(*t, op, "every input", packed, "packed");
  }
  for (const auto* t : {&packed, &absmax, &lora_a, &lora_b}) {
    TORCH_CHECK(t->is_contiguous(), op, ": every input must be contiguous");
  }
  auto new_packed = new_output(packed.sizes(), packed.options());
  auto new_absmax = new_output(absmax.sizes(), absmax.options());
  const LowRank low_rank{lora_a.const_data_ptr<float>(), lora_b.const_data_ptr<float>(), lora_a.size(0),
                         shape[1], scaling};
  return {MergeArgs{low_rank, n, blocksize, blocks}, new_packed, new_absmax};
}

}  // namespace relora
}  // namespace peftkern
