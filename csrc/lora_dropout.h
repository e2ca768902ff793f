// The dropout pass of the LoRA backends (lora.h): the one place each device touches dropout(x).
//
// keep[i, j] is drawn with Philox4x32-10 keyed by the seed: the counter of row i at column j is
// (offset j / 4, subsequence i), and j's draw is lane j % 4 of that block, so every backend that uses
// this scheme (cpu, cuda) draws the same mask. keep = draw >= dropout_p * 2^32.
//
// dropout_rows(src, dst, accumulate, row0, options, mask, draw):
//   dst[i, j] = (accumulate ? dst[i, j] : 0) + src[i, j] * keep[row0 + i, j] / (1 - dropout_p)
//   src, dst (rows, K) with unit stride along K, of one dtype. keep comes from the packed mask
//   (uint8 (N, ceil(K / 8)), absolute rows) when the device keeps one, else from the seed; with
//   draw=true the cpu kernel draws it and writes the mask's rows as it goes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "lora.h"

namespace mmfast {

inline uint32_t lora_keep_threshold(double dropout_p) {
  return static_cast<uint32_t>(dropout_p * 4294967296.0);  // dropout_p < 1, so below 2^32
}

namespace cpu {
void dropout_rows(const at::Tensor& src, at::Tensor& dst, bool accumulate, int64_t row0, const LoRAOptions& options,
                  at::Tensor& mask, bool draw);
}  // namespace cpu

#ifdef MMFAST_WITH_CUDA
namespace cuda {
void dropout_rows(const at::Tensor& src, at::Tensor& dst, bool accumulate, int64_t row0, const LoRAOptions& options,
                  at::Tensor& mask, bool draw);
}  // namespace cuda
#endif

}  // namespace mmfast
