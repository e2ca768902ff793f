// The LoRA dropout pass on CPU (lora_dropout.h): the mask is kept packed, 8 keeps per byte, so the
// backward reads one bit per element instead of redrawing Philox, and dropout(x) only ever exists
// one chunk of rows at a time.
#include "../lora_dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>

namespace mmfast::cpu {
namespace {

using ByteKeeps = std::array<std::array<float, 8>, 256>;

// The eight keeps of each mask byte as 0/1 floats: a row is then a plain multiply the compiler vectorises.
const ByteKeeps& byte_keeps() {
  static const ByteKeeps table = [] {
    ByteKeeps t{};
    for (int byte = 0; byte < 256; ++byte)
      for (int bit = 0; bit < 8; ++bit) t[byte][bit] = static_cast<float>((byte >> bit) & 1);
    return t;
  }();
  return table;
}

// Eight Philox4x32-10 blocks at once, lanes in separate arrays so the rounds vectorise (one scalar
// block at a time is several times slower). Bit-identical to at::Philox4_32(seed, row, group) for the
// groups first_group .. first_group + 7: word w of lane l is the draw of column 4 * (first_group + l) + w.
constexpr int kLanes = 8;

void philox_blocks(uint64_t seed, uint64_t row, uint64_t first_group, uint32_t (&words)[4][kLanes]) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    c0[l] = static_cast<uint32_t>(first_group + l);
    c1[l] = static_cast<uint32_t>((first_group + l) >> 32);
    c2[l] = static_cast<uint32_t>(row);
    c3[l] = static_cast<uint32_t>(row >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[l];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c0[l] = n0;
      c1[l] = static_cast<uint32_t>(p1);
      c2[l] = n2;
      c3[l] = static_cast<uint32_t>(p0);
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int l = 0; l < kLanes; ++l) {
    words[0][l] = c0[l];
    words[1][l] = c1[l];
    words[2][l] = c2[l];
    words[3][l] = c3[l];
  }
}

void draw_row(int64_t seed, int64_t row, int64_t cols, uint32_t threshold, uint8_t* bits) {
  constexpr int64_t kColumns = 4 * kLanes;
  uint32_t words[4][kLanes];
  for (int64_t j0 = 0; j0 < cols; j0 += kColumns) {
    philox_blocks(static_cast<uint64_t>(seed), static_cast<uint64_t>(row), static_cast<uint64_t>(j0 / 4), words);
    // Byte b holds the columns of lanes 2b (bits 0-3) and 2b + 1 (bits 4-7).
    const int64_t bytes = std::min<int64_t>(kLanes / 2, (cols - j0 + 7) / 8);
    for (int64_t b = 0; b < bytes; ++b) {
      uint8_t byte = 0;
      for (int w = 0; w < 4; ++w) {
        byte |= static_cast<uint8_t>(words[w][2 * b] >= threshold) << w;
        byte |= static_cast<uint8_t>(words[w][2 * b + 1] >= threshold) << (4 + w);
      }
      bits[j0 / 8 + b] = byte;
    }
  }
  if (cols % 8 != 0) bits[cols / 8] &= static_cast<uint8_t>((1u << (cols % 8)) - 1);  // no keeps past the row
}

template <typename scalar_t, bool kAccumulate>
void apply_row(const scalar_t* src, scalar_t* dst, const uint8_t* bits, int64_t cols, float scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const ByteKeeps& keeps = byte_keeps();
  const auto apply = [&](int64_t j, float keep) {
    const acc_t value = static_cast<acc_t>(src[j]) * static_cast<acc_t>(keep * scale);
    dst[j] = static_cast<scalar_t>(kAccumulate ? static_cast<acc_t>(dst[j]) + value : value);
  };
  const int64_t whole = cols / 8 * 8;
  for (int64_t j0 = 0; j0 < whole; j0 += 8) {
    const float* keep = keeps[bits[j0 / 8]].data();
    for (int t = 0; t < 8; ++t) apply(j0 + t, keep[t]);
  }
  for (int64_t j = whole; j < cols; ++j) apply(j, keeps[bits[j / 8]][j % 8]);
}

template <typename scalar_t>
void apply_rows(const at::Tensor& src, at::Tensor& dst, bool accumulate, int64_t row0, const LoRAOptions& options,
                at::Tensor& mask, bool draw) {
  const int64_t rows = src.size(0), cols = src.size(1), row_bytes = (cols + 7) / 8;
  const auto scale = static_cast<float>(1.0 / (1.0 - options.dropout_p));
  const uint32_t threshold = lora_keep_threshold(options.dropout_p);
  const scalar_t* src_data = src.const_data_ptr<scalar_t>();
  scalar_t* dst_data = dst.mutable_data_ptr<scalar_t>();
  uint8_t* bits = mask.mutable_data_ptr<uint8_t>() + row0 * row_bytes;
  const int64_t src_stride = src.stride(0), dst_stride = dst.stride(0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint8_t* row_bits = bits + i * row_bytes;
      if (draw) draw_row(options.seed, row0 + i, cols, threshold, row_bits);
      const scalar_t* s = src_data + i * src_stride;
      scalar_t* d = dst_data + i * dst_stride;
      if (accumulate) {
        apply_row<scalar_t, true>(s, d, row_bits, cols, scale);
      } else {
        apply_row<scalar_t, false>(s, d, row_bits, cols, scale);
      }
    }
  });
}

}  // namespace

void dropout_rows(const at::Tensor& src, at::Tensor& dst, bool accumulate, int64_t row0, const LoRAOptions& options,
                  at::Tensor& mask, bool draw) {
  TORCH_CHECK(src.dim() == 2 && src.stride(1) == 1 && dst.sizes() == src.sizes() && dst.stride(1) == 1 &&
                  dst.scalar_type() == src.scalar_type(),
              "dropout_rows: src and dst must be (rows, K) of one dtype with unit stride along K");
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.size(1) == (src.size(1) + 7) / 8 &&
                  row0 + src.size(0) <= mask.size(0),
              "dropout_rows: mask must be uint8 (N, ceil(K / 8)) covering the rows");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "lora_dropout_rows", [&] {
    apply_rows<scalar_t>(src, dst, accumulate, row0, options, mask, draw);
  });
}

}  // namespace mmfast::cpu
