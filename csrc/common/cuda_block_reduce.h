// A block-wide reduction for CUDA kernels (and their CPU emulation): a shared-memory tree in a
// fixed order, so the result is the same on every run (no atomics). Include from .cu files only.
#pragma once

namespace peftkern {
namespace cuda {

// Reduces one value per thread of a kThreads-thread block (kThreads a power of two, every thread
// calling); every thread gets the result. `scratch` is kThreads values of block-shared memory,
// free again when this returns.
template <int kThreads, typename V, typename Op>
__device__ V block_reduce(V v, V* scratch, Op op) {
  static_assert((kThreads & (kThreads - 1)) == 0, "block_reduce: kThreads must be a power of two");
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) scratch[threadIdx.x] = op(scratch[threadIdx.x], scratch[threadIdx.x + s]);
    __syncthreads();
  }
  const V result = scratch[0];
  __syncthreads();  // scratch is reused by the next reduction
  return result;
}

struct Add {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a + b; }
};

}  // namespace cuda
}  // namespace peftkern
