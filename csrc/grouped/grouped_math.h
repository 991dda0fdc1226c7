// Per-element math of the grouped (mixed-adapter) kernels, shared by grouped_cpu.cpp and
// grouped_cuda.cu so that the CPU tests check the arithmetic the GPU runs. Values are widened to
// the accumulation type Acc (float for float/half/bfloat16, double for double), combined there
// and rounded once to the storage type T when written.
#pragma once

#include <cstdint>

#include "../common/accumulate.h"
#include "../common/host_device.h"
#include "../ia3/ia3_math.h"

namespace peftkern {
namespace grouped {

// True when row adapter index g selects an adapter. -1 means "no adapter" (the base alone). The
// CPU ops refuse any other value outside [0, adapters) before computing; the CUDA kernels assert
// on it and, should device asserts be compiled out, treat it as -1: never a read out of bounds.
PK_HOST_DEVICE bool has_adapter(int32_t g, int64_t adapters) { return g >= 0 && g < adapters; }

// What a LoRA kernel call over the adapter chunk [first, first + count) of `total` adapters does
// with a row of adapter g (see grouped_host.h): computes it when g is in the chunk; copies
// base_out when the row has no adapter (-1, or out of range) and this is the first chunk (first
// == 0); otherwise leaves it to another chunk. So each row is written by exactly one call.
enum class RowAction : int { kSkip, kCopyBase, kAdapter };

PK_HOST_DEVICE RowAction row_action(int32_t g, int64_t first, int64_t count, int64_t total) {
  if (!has_adapter(g, total)) return first == 0 ? RowAction::kCopyBase : RowAction::kSkip;
  return g >= first && g - first < count ? RowAction::kAdapter : RowAction::kSkip;
}

// IA³ scaling of one element: t·s computed in Acc by the IA³ family's own math, rounded once to T
// (PEFT's `(t.to(float32) * l).to(t.dtype)`).
template <typename T, typename Acc>
PK_HOST_DEVICE T ia3_scaled(T v, Acc s) {
  return static_cast<T>(ia3::scaled<Acc>(static_cast<Acc>(v), s));
}

// One output element of the LoRA expand step: base + Σ_j xa[j]·B[o, j], with the sum `lora`
// already accumulated in Acc; the base is added last (as a GEMM's beta=1 epilogue does) and the
// result rounded once.
template <typename T, typename Acc>
PK_HOST_DEVICE T lora_output(T base, Acc lora) {
  return static_cast<T>(static_cast<Acc>(base) + lora);
}

}  // namespace grouped
}  // namespace peftkern
