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

// cross_entropy_fwd's checked inputs and its outputs (float32 [rows] each).
struct Forward {
  Inputs in;
  at::Tensor loss, lse;
};

inline Forward check_and_allocate_fwd(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  Inputs in = check_inputs(logits, labels, ignore_index, "cross_entropy_fwd");
  const int64_t rows = in.args.rows;
  return {std::move(in), new_output({rows}, logits.options().dtype(at::kFloat)),
          new_output({rows}, logits.options().dtype(at::kFloat))};
}

// cross_entropy_bwd's checked inputs (grad_loss and lse float32 [rows] on the logits' device, made
// contiguous) and its output, contiguous [rows, vocab] in the logits' dtype.
struct Backward {
  Inputs in;
  at::Tensor grad_loss, lse, out;
};

inline Backward check_and_allocate_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                       const at::Tensor& lse, int64_t ignore_index) {
  constexpr const char* op = "cross_entropy_bwd";
  Inputs in = check_inputs(logits, labels, ignore_index, op);
  const std::pair<const at::Tensor*, const char*> rows[] = {{&grad_loss, "grad_loss"}, {&lse, "lse"}};
  for (const auto& [t, name] : rows) {
    check_dtype(*t, op, name, {at::kFloat});
    TORCH_CHECK(t->dim() == 1 && t->size(0) == in.args.rows, op, ": ", name, " must be [", in.args.rows,
                "], got shape ", t->sizes());
    check_device(*t, op, name, logits, "logits");
  }
  at::Tensor out = new_output({in.args.rows, in.args.vocab}, logits.options());
  return {std::move(in), grad_loss.contiguous(), lse.contiguous(), std::move(out)};
}

}  // namespace cross_entropy
}  // namespace peftkern
