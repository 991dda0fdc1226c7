// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
// SC'11), the counter-based generator behind cuRAND's and PyTorch's CUDA dropout: four 32-bit
// outputs from a 128-bit counter and a 64-bit key, with no state. The same (key, counter) gives
// the same numbers on any thread, device or in any order, which is what lets a kernel redraw a
// random decision in backward instead of storing it, and the CPU and CUDA kernels draw the same
// decisions bit for bit (shared here, host and device).
//
// peftkern's stream convention (every op that draws per-element randomness uses it):
//   key = seed (64 bits), counter = (element_index / 4 as 64 bits, offset as 64 bits),
//   element e takes output word e % 4 of its counter's block;
//   uniform(word) = (word >> 8) · 2^-24, exactly representable in float32, in [0, 1).
// `offset` separates the draws of different calls under one seed (PyTorch's Philox offset).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace peftkern {
namespace philox {

struct Words {
  uint32_t w[4];
};

constexpr uint32_t kRoundMultiplier0 = 0xD2511F53u;
constexpr uint32_t kRoundMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kWeylKey0 = 0x9E3779B9u;  // the key schedule's increments (golden ratio, sqrt(3)-1)
constexpr uint32_t kWeylKey1 = 0xBB67AE85u;

PK_HOST_DEVICE Words single_round(const Words& c, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kRoundMultiplier0) * c.w[0];
  const uint64_t p1 = static_cast<uint64_t>(kRoundMultiplier1) * c.w[2];
  const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
  const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
  return Words{{hi1 ^ c.w[1] ^ k0, lo1, hi0 ^ c.w[3] ^ k1, lo0}};
}

// The ten-round bijection of one 128-bit counter under a 64-bit key.
PK_HOST_DEVICE Words philox4x32_10(Words counter, uint64_t key) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    counter = single_round(counter, k0, k1);
    k0 += kWeylKey0;
    k1 += kWeylKey1;
  }
  return counter;
}

// The four words of block `group` (elements 4·group .. 4·group + 3) of stream (seed, offset).
PK_HOST_DEVICE Words block_words(uint64_t seed, uint64_t offset, uint64_t group) {
  const Words counter{{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}};
  return philox4x32_10(counter, seed);
}

// A word as a float32 uniform in [0, 1): its top 24 bits times 2^-24 (exact).
PK_HOST_DEVICE float word_to_uniform(uint32_t word) {
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f);
}

// The uniform of element e of stream (seed, offset). Loops that visit elements in order should
// call block_words once per four elements instead.
PK_HOST_DEVICE float uniform_at(uint64_t seed, uint64_t offset, uint64_t e) {
  return word_to_uniform(block_words(seed, offset, e >> 2).w[e & 3]);
}

}  // namespace philox
}  // namespace peftkern
