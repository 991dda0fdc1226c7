// Host-side checks and allocation of the fused cross-entropy ops, shared by the CPU and CUDA
// implementations so both accept and reject exactly the same inputs.
#pragma once

#include <ATen/ATen.h>

#include "../common/checks.h"
#include "../common/outputs.h"
#include "cross_entropy_math.h"

namespace peftkern {
namespace cross_entropy {

struct Args {
  const void* logits;     // [rows, vocab], row stride `stride`, unit column stride
  const int64_t* labels;  // [rows]
  int64_t rows, vocab, stride, ignore_index;
  at::ScalarType dtype;
};

// The checked inputs; `logits` / `labels` hold the contiguous copies Args points into, if any.
struct Inputs {
  Args args;
  at::Tensor logits, labels;
};

// logits [rows, vocab] float32 / bfloat16 / float16 with unit column stride (another layout is
// copied first); labels int64 [rows] on the same device. Labels in host memory are range-checked
// here; on a GPU an out-of-range label makes its row NaN instead (no host sync; see
// cross_entropy_math.h).
inline Inputs check_inputs(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                           const char* op) {
  check_dtype(logits, op, "logits", {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [tokens, vocab], got shape ", logits.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op, ": labels must be [", logits.size(0),
              "] (one per row of logits), got shape ", labels.sizes());
  check_device(labels, op, "labels", logits, "logits");
  at::Tensor rows = logits.stride(1) == 1 || logits.size(1) <= 1 ? logits : logits.contiguous();
  at::Tensor targets = labels.contiguous();
  const int64_t vocab = rows.size(1);
  if (targets.is_cpu()) {
    const int64_t* y = targets.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < targets.numel(); ++r) {
      TORCH_CHECK(is_ignored(y[r], ignore_index) || label_in_range(y[r], vocab), op, ": label ", y[r], " of row ", r,
                  " is outside the vocabulary [0, ", vocab, ") and is not ignore_index (", ignore_index, ")");
    }
  }
  const Args args{rows.const_data_ptr(), targets.const_data_ptr<int64_t>(), rows.size(0), vocab,
                  rows.size(0) > 1 ? rows.stride(0) : vocab, ignore_index, rows.scalar_type()};
  return {args, std::move(rows), std::move(targets)};
}

// cross_entropy_bwd's per-row inputs: float32 [rows] each, on the logits' device.
inline void check_row_values(const at::Tensor& t, const char* op, const char* name, const Args& args,
                             const at::Tensor& logits) {
  check_dtype(t, op, name, {at::kFloat});
  TORCH_CHECK(t.dim() == 1 && t.size(0) == args.rows, op, ": ", name, " must be [", args.rows, "], got shape ",
              t.sizes());
  check_device(t, op, name, logits, "logits");
}

}  // namespace cross_entropy
}  // namespace peftkern
