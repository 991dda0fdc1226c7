// LoRA dropout kernels on CPU (host code and checks: dropout_host.h; math: dropout_math.h).
//
// Every kernel walks the flat element range [0, n) of its tensor in tasks of whole Philox
// blocks (at::parallel_for over blocks of 4 elements), and each task in chunks of kChunkBlocks
// blocks: first the chunk's words (kLanes Philox evaluations side by side, vectorised:
// fill_words), then the chunk's elements (a second branch-free loop,
// vectorised where the input is contiguous). Which thread draws a block never changes the word:
// the result is the same for any thread count, and the same as the CUDA kernels'.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../common/accumulate.h"
#include "../common/cpu_isa.h"
#include "dropout_host.h"
#include "dropout_math.h"

namespace peftkern {
namespace dropout {
namespace {

constexpr int64_t kChunkBlocks = 256;            // 1,024 elements: 4 KiB of words, in L1
constexpr int64_t kGrainBlocks = 16 * kChunkBlocks;  // ~16K elements per parallel task

constexpr int kLanes = 8;  // Philox blocks evaluated side by side

// words[4·b + l] = word l of block first_block + b, for b in [0, blocks).
// Philox's rounds are a chain of dependent 32×32→64-bit products per block: one block at a time
// the CPU waits on each product. Here kLanes blocks run lane-parallel (structure of arrays), the
// same rounds as philox::single_round, so the compiler turns each round into vector multiplies
// (pmuludq; vpmuludq in the AVX2 instance, which the CPU ISA dispatch of common/cpu_isa.h picks
// — PEFTKERN_CPU_ISA forces either, so the tests run both). Integer arithmetic only: the words are
// those of philox::block_words on every path (the tests hold the masks to the plain-PyTorch
// Philox bit for bit, this path and the scalar tail alike).
__attribute__((always_inline)) inline void fill_words_body(uint64_t seed, uint64_t offset, int64_t first_block,
                                                           int64_t blocks, uint32_t* words) {
  int64_t b = 0;
  for (; b + kLanes <= blocks; b += kLanes) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t g = static_cast<uint64_t>(first_block + b + l);
      c0[l] = static_cast<uint32_t>(g);
      c1[l] = static_cast<uint32_t>(g >> 32);
      c2[l] = static_cast<uint32_t>(offset);
      c3[l] = static_cast<uint32_t>(offset >> 32);
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      for (int l = 0; l < kLanes; ++l) {
        const uint64_t p0 = static_cast<uint64_t>(philox::kRoundMultiplier0) * c0[l];
        const uint64_t p1 = static_cast<uint64_t>(philox::kRoundMultiplier1) * c2[l];
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
        c1[l] = static_cast<uint32_t>(p1);
        c3[l] = static_cast<uint32_t>(p0);
        c0[l] = n0;
        c2[l] = n2;
      }
      k0 += philox::kWeylKey0;
      k1 += philox::kWeylKey1;
    }
    for (int l = 0; l < kLanes; ++l) {
      uint32_t* w = words + 4 * (b + l);
      w[0] = c0[l];
      w[1] = c1[l];
      w[2] = c2[l];
      w[3] = c3[l];
    }
  }
  for (; b < blocks; ++b) {  // the chunk's last blocks, fewer than kLanes
    const philox::Words w = philox::block_words(seed, offset, static_cast<uint64_t>(first_block + b));
    for (int l = 0; l < 4; ++l) words[4 * b + l] = w.w[l];
  }
}

void fill_words_portable(uint64_t seed, uint64_t offset, int64_t first_block, int64_t blocks, uint32_t* words) {
  fill_words_body(seed, offset, first_block, blocks, words);
}

#if defined(PK_X86)
PK_TARGET_AVX2 void fill_words_avx2(uint64_t seed, uint64_t offset, int64_t first_block, int64_t blocks,
                                    uint32_t* words) {
  fill_words_body(seed, offset, first_block, blocks, words);
}
#endif

void fill_words(uint64_t seed, uint64_t offset, int64_t first_block, int64_t blocks, uint32_t* words) {
#if defined(PK_X86)
  if (cpu::active_isa() != cpu::Isa::kScalar) return fill_words_avx2(seed, offset, first_block, blocks, words);
#endif
  fill_words_portable(seed, offset, first_block, blocks, words);
}

// Calls body(e0, count, words) over [0, n) in chunks, in parallel; words[t] is element e0 + t's.
template <class Body>
void for_each_chunk(int64_t n, uint64_t seed, uint64_t offset, const Body& body) {
  const int64_t blocks = ceil_div(n, 4);
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t first, int64_t last) {
    alignas(64) uint32_t words[4 * kChunkBlocks];
    for (int64_t b = first; b < last; b += kChunkBlocks) {
      const int64_t nb = std::min(kChunkBlocks, last - b);
      fill_words(seed, offset, b, nb, words);
      const int64_t e0 = 4 * b;
      body(e0, std::min(4 * nb, n - e0), words);
    }
  });
}

// Calls row_body(i, j0, t0, len) for the row segments of the flat range [e0, e0 + count) of an
// [M, K] tensor: elements (i, j0 .. j0+len) are flat e0 + t0 .. e0 + t0 + len.
template <class RowBody>
void for_each_row_segment(int64_t e0, int64_t count, int64_t k, const RowBody& row_body) {
  int64_t i = e0 / k, j = e0 % k, t = 0;
  while (t < count) {
    const int64_t len = std::min(k - j, count - t);
    row_body(i, j, t, len);
    t += len;
    ++i;
    j = 0;
  }
}

struct CpuKernels {
  static void dropout(const at::Tensor& x, at::Tensor& out, uint64_t seed, uint64_t offset, uint32_t threshold,
                      double scale) {
    const int64_t k = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout", [&] {
      using Acc = acc_type<scalar_t>;
      const Acc sc = static_cast<Acc>(scale);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      for_each_chunk(out.numel(), seed, offset, [&](int64_t e0, int64_t count, const uint32_t* words) {
        for_each_row_segment(e0, count, k, [&](int64_t i, int64_t j0, int64_t t0, int64_t len) {
          const scalar_t* xr = xp + i * s0 + j0 * s1;
          scalar_t* orow = op + e0 + t0;
          const uint32_t* wr = words + t0;
          if (s1 == 1) {
            for (int64_t t = 0; t < len; ++t) orow[t] = dropped<scalar_t, Acc>(xr[t], wr[t], threshold, sc);
          } else {
            for (int64_t t = 0; t < len; ++t) orow[t] = dropped<scalar_t, Acc>(xr[t * s1], wr[t], threshold, sc);
          }
        });
      });
    });
  }

  static void accumulate(at::Tensor& out, const at::Tensor& x, uint64_t seed, uint64_t offset, uint32_t threshold,
                         double scale) {
    const int64_t k = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_accumulate_", [&] {
      using Acc = acc_type<scalar_t>;
      const Acc sc = static_cast<Acc>(scale);
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      for_each_chunk(out.numel(), seed, offset, [&](int64_t e0, int64_t count, const uint32_t* words) {
        for_each_row_segment(e0, count, k, [&](int64_t i, int64_t j0, int64_t t0, int64_t len) {
          const scalar_t* xr = xp + i * s0 + j0 * s1;
          scalar_t* orow = op + e0 + t0;
          const uint32_t* wr = words + t0;
          if (s1 == 1) {
            for (int64_t t = 0; t < len; ++t) orow[t] = accumulated<scalar_t, Acc>(orow[t], xr[t], wr[t], threshold, sc);
          } else {
            for (int64_t t = 0; t < len; ++t) {
              orow[t] = accumulated<scalar_t, Acc>(orow[t], xr[t * s1], wr[t], threshold, sc);
            }
          }
        });
      });
    });
  }

  static void mask(at::Tensor& out, uint64_t seed, uint64_t offset, uint32_t threshold) {
    bool* op = out.mutable_data_ptr<bool>();
    for_each_chunk(out.numel(), seed, offset, [&](int64_t e0, int64_t count, const uint32_t* words) {
      for (int64_t t = 0; t < count; ++t) op[e0 + t] = keep(words[t], threshold);
    });
  }

  static void uniform(at::Tensor& out, uint64_t seed, uint64_t offset) {
    float* op = out.mutable_data_ptr<float>();
    for_each_chunk(out.numel(), seed, offset, [&](int64_t e0, int64_t count, const uint32_t* words) {
      for (int64_t t = 0; t < count; ++t) op[e0 + t] = philox::word_to_uniform(words[t]);
    });
  }

  static void words(const at::Tensor& groups, at::Tensor& out, uint64_t seed, uint64_t offset) {
    const int64_t* gp = groups.const_data_ptr<int64_t>();
    int64_t* op = out.mutable_data_ptr<int64_t>();
    for (int64_t b = 0; b < groups.numel(); ++b) {
      const philox::Words w = philox::block_words(seed, offset, static_cast<uint64_t>(gp[b]));
      for (int l = 0; l < 4; ++l) op[4 * b + l] = static_cast<int64_t>(w.w[l]);
    }
  }
};

using CpuOps = Ops<CpuKernels>;

at::Tensor lora_dropout(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  return CpuOps::dropout(x, p, seed, offset);
}
void lora_dropout_accumulate(at::Tensor& out, const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  CpuOps::accumulate(out, x, p, seed, offset);
}
at::Tensor lora_dropout_mask(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  return CpuOps::mask(x, p, seed, offset);
}
at::Tensor philox_uniform(const at::Tensor& x, int64_t seed, int64_t offset) { return CpuOps::uniform(x, seed, offset); }
at::Tensor philox_words(const at::Tensor& groups, int64_t seed, int64_t offset) {
  return CpuOps::words(groups, seed, offset);
}

}  // namespace
}  // namespace dropout
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("lora_dropout", &peftkern::dropout::lora_dropout);
  m.impl("lora_dropout_accumulate_", &peftkern::dropout::lora_dropout_accumulate);
  m.impl("lora_dropout_mask", &peftkern::dropout::lora_dropout_mask);
  m.impl("philox_uniform", &peftkern::dropout::philox_uniform);
  m.impl("philox_words", &peftkern::dropout::philox_words);
}
