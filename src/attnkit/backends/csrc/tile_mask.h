// The mask as the CPU kernels see it, tile by tile: which tiles to visit, which of them need
// masking, and the masking itself. Either a BlockMask (its tiles' kinds and the bitmaps of its
// partial tiles) or a band lo <= j - i <= hi (causal and sliding-window masks: masks.band),
// whose tiles' kinds and masked entries follow from their bounds. A band needs no tile map:
// none is built, stored or read (decoding under a window over a growing cache built one per
// step, with a bitmap per partial tile). A band may also carry a key mask, one row of Lk
// flags per sequence (padding): its kv tiles' kinds are counted here, once per call, so a
// padded batch needs no tile map either (a model makes its padding mask anew at every call).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "cpu_common.h"

namespace attnkit_cpu {

constexpr int8_t kFull = 2;

struct TileMask {
  int64_t block_q, block_k, Lq, Lk, nQ, nK;
  // a BlockMask: (Bm, Hm, nQ, nK) kinds and rows of `bitmaps` (nPartial, block_q, block_k)
  const int8_t* kinds = nullptr;
  const int64_t* index = nullptr;
  const bool* bitmaps = nullptr;
  int64_t Bm = 1, Hm = 1;
  // or a band: query i attends key j where lo <= j - i <= hi
  bool band = false;
  int64_t lo = 0, hi = 0;
  // and, with a band, maybe a key mask: sequence b keeps key j only where keys[b·Lk + j]
  const bool* keys = nullptr;
  int64_t Bk = 1;
  std::vector<int8_t> key_kinds;  // (Bk, nK): each kv tile's kind under the key mask alone

  // Where (b, h)'s tiles start in the map (for a band, the sequence's row of the key mask):
  // the `map` argument below.
  int64_t map_of(int64_t b, int64_t h) const {
    if (band) return Bk > 1 ? b : 0;
    return ((Bm > 1 ? b : 0) * Hm + (Hm > 1 ? h : 0)) * nQ * nK;
  }
  bool shared_by_heads() const { return band || Hm == 1; }

  int8_t kind(int64_t map, int64_t qt, int64_t kt) const {
    if (!band) return kinds[map + qt * nK + kt];
    const int64_t i0 = qt * block_q, i1 = std::min(i0 + block_q, Lq) - 1;
    const int64_t j0 = kt * block_k, j1 = std::min(j0 + block_k, Lk) - 1;
    if (j1 - i0 < lo || j0 - i1 > hi) return kEmpty;
    const int8_t in_band = (j0 - i1 >= lo && j1 - i0 <= hi) ? kFull : kPartial;
    // empty < partial < full: the tile is as full as the emptier of band and key mask
    return keys ? std::min(in_band, key_kinds[map * nK + kt]) : in_band;
  }

  // The kv tiles [first, end) query tile qt may visit: the band's, else all of them.
  std::pair<int64_t, int64_t> kv_tiles(int64_t qt) const {
    if (!band) return {0, nK};
    if (lo > hi) return {0, 0};  // a band that keeps nothing
    const int64_t i0 = qt * block_q, i1 = std::min(i0 + block_q, Lq) - 1;
    return tiles_holding(i0 + lo, i1 + hi, Lk, block_k);
  }

  // The last kv tile before kt that query tile qt visits, or -1.
  int64_t visited_before(int64_t map, int64_t qt, int64_t kt) const {
    const int64_t first = kv_tiles(qt).first;
    for (int64_t j = kt - 1; j >= first; --j) {
      if (kind(map, qt, j) != kEmpty) return j;
    }
    return -1;
  }

  // The query tiles [first, end) that may visit kv tile kt: the band's, else all of them.
  std::pair<int64_t, int64_t> q_tiles(int64_t kt) const {
    if (!band) return {0, nQ};
    if (lo > hi) return {0, 0};
    const int64_t j0 = kt * block_k, j1 = std::min(j0 + block_k, Lk) - 1;
    return tiles_holding(j0 - hi, j1 - lo, Lq, block_q);
  }

  // Masks partial tile (qt, kt), whose first score is at s, rows ld apart: -inf where the
  // bitmap says "masked", or outside the band.
  void apply(float* s, int64_t ld, int64_t map, int64_t qt, int64_t kt) const {
    const int64_t rows = std::min(block_q, Lq - qt * block_q);
    const int64_t cols = std::min(block_k, Lk - kt * block_k);
    if (!band) {
      const bool* bits = bitmaps + index[map + qt * nK + kt] * block_q * block_k;
      apply_bitmap(s, ld, bits, block_k, rows, cols);
      return;
    }
    for (int64_t r = 0; r < rows; ++r) {  // row r keeps columns [a, z)
      const int64_t i = qt * block_q + r - kt * block_k;  // query index relative to the tile's keys
      const int64_t a = std::clamp<int64_t>(i + lo, 0, cols);
      const int64_t z = std::clamp<int64_t>(i + hi + 1, a, cols);
      float* srow = s + r * ld;
      std::fill(srow, srow + a, kNegInf);
      std::fill(srow + z, srow + cols, kNegInf);
    }
    if (keys && key_kinds[map * nK + kt] == kPartial) {  // every row: the same keys (stride 0)
      apply_bitmap(s, ld, keys + map * Lk + kt * block_k, 0, rows, cols);
    }
  }

 private:
  // Tiles [first, end) of `block` indices that hold indices first … last of an axis of `length`.
  static std::pair<int64_t, int64_t> tiles_holding(int64_t first, int64_t last, int64_t length,
                                                   int64_t block) {
    first = std::max<int64_t>(first, 0);
    last = std::min(last, length - 1);
    if (first > last) return {0, 0};
    return {first / block, last / block + 1};
  }
};

// Points m at the key mask `keys` (B or 1, Lk) and counts its kv tiles' kinds.
inline void set_keys(TileMask& m, const at::Tensor& keys, int64_t B, const char* who) {
  TORCH_CHECK(keys.dim() == 2 && keys.scalar_type() == at::kBool && keys.is_contiguous() &&
                  (keys.size(0) == B || keys.size(0) == 1) && keys.size(1) == m.Lk,
              who, ": keys must be contiguous bool (", B, " or 1, ", m.Lk, "), got ",
              keys.sizes());
  m.keys = keys.data_ptr<bool>();
  m.Bk = keys.size(0);
  m.key_kinds.resize(m.Bk * m.nK);
  for (int64_t b = 0; b < m.Bk; ++b) {
    for (int64_t kt = 0; kt < m.nK; ++kt) {
      const int64_t j0 = kt * m.block_k, j1 = std::min(j0 + m.block_k, m.Lk);
      const int64_t kept = std::count(m.keys + b * m.Lk + j0, m.keys + b * m.Lk + j1, true);
      m.key_kinds[b * m.nK + kt] = kept == 0 ? kEmpty : kept == j1 - j0 ? kFull : kPartial;
    }
  }
}

// The TileMask of a kernel call's arguments: the band where `band` is set (kinds, tile_index
// and bitmaps are then unused) and its key mask `keys` (B or 1, Lk) if given, else the
// BlockMask's tensors, checked against the tile grid.
inline TileMask tile_mask_for(const at::Tensor& kinds, const at::Tensor& tile_index,
                              const at::Tensor& bitmaps, int64_t B, int64_t Lq, int64_t Lk,
                              int64_t block_q, int64_t block_k, bool band, int64_t lo, int64_t hi,
                              const std::optional<at::Tensor>& keys, const char* who) {
  TORCH_CHECK(block_q > 0 && block_k > 0, who, ": tile sizes must be positive");
  TileMask m{block_q, block_k, Lq, Lk, (Lq + block_q - 1) / block_q, (Lk + block_k - 1) / block_k};
  TORCH_CHECK(band || !keys.has_value(), who, ": a key mask goes with a band only");
  if (band) {
    m.band = true;
    m.lo = lo;
    m.hi = hi;
    if (keys.has_value()) set_keys(m, *keys, B, who);
    return m;
  }
  TORCH_CHECK(kinds.dim() == 4 && kinds.scalar_type() == at::kChar && kinds.is_contiguous() &&
                  kinds.size(2) == m.nQ && kinds.size(3) == m.nK,
              who, ": kinds must be contiguous int8 (Bm, Hm, ", m.nQ, ", ", m.nK,
              ") for this tile grid, got ", kinds.sizes());
  TORCH_CHECK(tile_index.sizes() == kinds.sizes() && tile_index.scalar_type() == at::kLong &&
                  tile_index.is_contiguous(),
              who, ": tile_index must be contiguous int64 shaped like kinds");
  m.kinds = kinds.data_ptr<int8_t>();
  m.index = tile_index.data_ptr<int64_t>();
  m.bitmaps = bitmaps.numel() ? bitmaps.data_ptr<bool>() : nullptr;
  m.Bm = kinds.size(0);
  m.Hm = kinds.size(1);
  return m;
}

}  // namespace attnkit_cpu
