// The device kernels behind the LoRA backends (lora.h): the rank-r products with dropout fused in.
//
// The dropout mask. keep[i, j] is drawn with Philox4x32-10 keyed by the seed, counter (group, i): the
// columns go in tiles of 32, tile t drawn by groups 8t .. 8t + 7, and column 32t + 8w + l is word w of
// group 8t + l (so one word of eight groups is one byte of mask). The cpu and cuda backends both draw
// this way, so they draw the same masks. keep = draw >= dropout_p * 2^32; kept values are scaled by
// 1 / (1 - dropout_p).
//
// Every rank-r term of the forward and backward is one of three products; lora.cpp runs them with
// ATen's GEMMs when there is no dropout, and each device implements them with dropout fused in
// (d.dropout_p > 0), in x's dtype:
//   project(src (n, K), mat (r, K), scale, d)         -> scale * drop(src) @ mat.T             (n, r)
//   expand_add(dst (n, K), coeff (n, r), mat (r, K), scale, d):  dst += drop(scale * coeff @ mat)
//   outer_sum(coeff (n, r), src (n, K), scale, d)     -> scale * coeff.T @ drop(src)           (r, K)
// where drop keeps keep[i, j] of the rows and columns of src or dst, scaled. mat may be any (r, K) view.
// The cpu kernels keep the mask packed in d.mask (uint8 (n, ceil(K / 8)), bit j % 8 of byte j / 8),
// drawing it when d.draw; the cuda ones redraw it from the seed and leave d.mask alone.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "lora.h"

namespace mmfast {

struct Dropout {
  double dropout_p;
  int64_t seed;
  at::Tensor mask;
  bool draw;
};

inline uint32_t lora_keep_threshold(double dropout_p) {
  return static_cast<uint32_t>(dropout_p * 4294967296.0);  // dropout_p < 1, so below 2^32
}

#define MMFAST_LORA_KERNELS                                                                                   \
  at::Tensor project(const at::Tensor& src, const at::Tensor& mat, double scale, Dropout& dropout);          \
  void expand_add(at::Tensor& dst, const at::Tensor& coeff, const at::Tensor& mat, double scale,             \
                  Dropout& dropout);                                                                          \
  at::Tensor outer_sum(const at::Tensor& coeff, const at::Tensor& src, double scale, Dropout& dropout);

namespace cpu {
MMFAST_LORA_KERNELS
}  // namespace cpu

#ifdef MMFAST_WITH_CUDA
namespace cuda {
MMFAST_LORA_KERNELS
}  // namespace cuda
#endif

#undef MMFAST_LORA_KERNELS

}  // namespace mmfast
