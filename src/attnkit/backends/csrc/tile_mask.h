// The mask as the CPU kernels see it, tile by tile: which tiles to visit, which of them need
// masking, and the masking itself. One of
// - a BlockMask: its tiles' kinds and the bitmaps of its partial tiles;
// - a band lo <= j - i <= hi (causal and sliding-window masks: masks.band), whose tiles' kinds
//   and masked entries follow from their bounds;
// - per-row key ranges: query i attends keys first[i] … last[i] (packed documents, varlen
//   batches, prefix-LM: masks.key_ranges), whose tiles' kinds follow from each query tile's
//   least and greatest first and last keys, counted once per call.
// The last two need no tile map: none is built, stored or read (decoding under a window over
// a growing cache built one per step, a varlen decoding batch one per step). Either may also
// carry a key mask, one row of Lk flags per sequence (padding): its kv tiles' kinds are
// counted here, once per call, so a padded batch needs no tile map either (a model makes its
// padding mask anew at every call).
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
  // or per-row key ranges: query i of sequence b attends keys first … last, where first and
  // last are ranges[(b·2 + 0)·Lq + i] and ranges[(b·2 + 1)·Lq + i]
  const int64_t* ranges = nullptr;
  int64_t Br = 1;
  std::vector<int64_t> range_bounds;  // (Br, nQ, 4): each query tile's least and greatest first,
                                      // least and greatest last
  // and, with a band or ranges, maybe a key mask: sequence b keeps key j where keys[b·Lk + j]
  const bool* keys = nullptr;
  int64_t Bk = 1;
  std::vector<int8_t> key_kinds;  // (Bk, nK): each kv tile's kind under the key mask alone

  // Where (b, h)'s tiles start in the map, or, for a band or ranges, the sequence b: the
  // `map` argument below.
  int64_t map_of(int64_t b, int64_t h) const {
    if (computed()) return b;
    return ((Bm > 1 ? b : 0) * Hm + (Hm > 1 ? h : 0)) * nQ * nK;
  }
  bool shared_by_heads() const { return computed() || Hm == 1; }

  int8_t kind(int64_t map, int64_t qt, int64_t kt) const {
    if (!computed()) return kinds[map + qt * nK + kt];
    const int64_t j0 = kt * block_k, j1 = std::min(j0 + block_k, Lk) - 1;
    int8_t in_rows;  // the tile's kind under the band or ranges alone
    if (band) {
      const int64_t i0 = qt * block_q, i1 = std::min(i0 + block_q, Lq) - 1;
      if (j1 - i0 < lo || j0 - i1 > hi) return kEmpty;
      in_rows = (j0 - i1 >= lo && j1 - i0 <= hi) ? kFull : kPartial;
    } else {
      const int64_t* t = bounds_of(map, qt);
      if (t[3] < j0 || t[0] > j1) return kEmpty;
      in_rows = (t[1] <= j0 && t[2] >= j1) ? kFull : kPartial;
    }
    // empty < partial < full: the tile is as full as the emptier of rows and key mask
    return keys ? std::min(in_rows, key_kinds[key_row(map) * nK + kt]) : in_rows;
  }

  // The kv tiles [first, end) query tile qt of sequence `map` may visit: the band's or the
  // ranges', else all of them.
  std::pair<int64_t, int64_t> kv_tiles(int64_t map, int64_t qt) const {
    if (ranges) {
      const int64_t* t = bounds_of(map, qt);
      return tiles_holding(t[0], t[3], Lk, block_k);
    }
    if (!band) return {0, nK};
    if (lo > hi) return {0, 0};  // a band that keeps nothing
    const int64_t i0 = qt * block_q, i1 = std::min(i0 + block_q, Lq) - 1;
    return tiles_holding(i0 + lo, i1 + hi, Lk, block_k);
  }

  // The last kv tile before kt that query tile qt visits, or -1.
  int64_t visited_before(int64_t map, int64_t qt, int64_t kt) const {
    const int64_t first = kv_tiles(map, qt).first;
    for (int64_t j = kt - 1; j >= first; --j) {
      if (kind(map, qt, j) != kEmpty) return j;
    }
    return -1;
  }

  // The query tiles [first, end) that may visit kv tile kt: the band's, else all of them
  // (`kind` then says which do).
  std::pair<int64_t, int64_t> q_tiles(int64_t kt) const {
    if (!band) return {0, nQ};
    if (lo > hi) return {0, 0};
    const int64_t j0 = kt * block_k, j1 = std::min(j0 + block_k, Lk) - 1;
    return tiles_holding(j0 - hi, j1 - lo, Lq, block_q);
  }

  // Masks partial tile (qt, kt), whose first score is at s, rows ld apart: -inf where the
  // bitmap says "masked", or outside the band or the rows' ranges.
  void apply(float* s, int64_t ld, int64_t map, int64_t qt, int64_t kt) const {
    const int64_t rows = std::min(block_q, Lq - qt * block_q);
    const int64_t cols = std::min(block_k, Lk - kt * block_k);
    if (!computed()) {
      const bool* bits = bitmaps + index[map + qt * nK + kt] * block_q * block_k;
      apply_bitmap(s, ld, bits, block_k, rows, cols);
      return;
    }
    const int64_t j0 = kt * block_k;
    const int64_t* first = ranges ? ranges + range_row(map) * 2 * Lq : nullptr;
    for (int64_t r = 0; r < rows; ++r) {  // row r keeps columns [a, z)
      const int64_t i = qt * block_q + r;
      // the row's first and last key, relative to the tile's first key
      const int64_t f = (first ? first[i] : i + lo) - j0;
      const int64_t l = (first ? first[Lq + i] : i + hi) - j0;
      const int64_t a = std::clamp<int64_t>(f, 0, cols);
      const int64_t z = std::clamp<int64_t>(l + 1, a, cols);
      float* srow = s + r * ld;
      std::fill(srow, srow + a, kNegInf);
      std::fill(srow + z, srow + cols, kNegInf);
    }
    if (keys && key_kinds[key_row(map) * nK + kt] == kPartial) {  // every row: the same keys
      apply_bitmap(s, ld, keys + key_row(map) * Lk + j0, 0, rows, cols);  // (row stride 0)
    }
  }

  bool computed() const { return band || ranges; }

 private:
  int64_t key_row(int64_t b) const { return Bk > 1 ? b : 0; }
  int64_t range_row(int64_t b) const { return Br > 1 ? b : 0; }
  const int64_t* bounds_of(int64_t b, int64_t qt) const {
    return range_bounds.data() + (range_row(b) * nQ + qt) * 4;
  }

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

// Points m at the per-row key ranges `ranges` (B or 1, 2, Lq) and finds each query tile's
// least and greatest first and last key.
inline void set_ranges(TileMask& m, const at::Tensor& ranges, int64_t B, const char* who) {
  TORCH_CHECK(ranges.dim() == 3 && ranges.scalar_type() == at::kLong && ranges.is_contiguous() &&
                  (ranges.size(0) == B || ranges.size(0) == 1) && ranges.size(1) == 2 &&
                  ranges.size(2) == m.Lq,
              who, ": ranges must be contiguous int64 (", B, " or 1, 2, ", m.Lq, "), got ",
              ranges.sizes());
  m.ranges = ranges.data_ptr<int64_t>();
  m.Br = ranges.size(0);
  m.range_bounds.resize(m.Br * m.nQ * 4);
  for (int64_t b = 0; b < m.Br; ++b) {
    const int64_t* first = m.ranges + b * 2 * m.Lq;
    const int64_t* last = first + m.Lq;
    for (int64_t qt = 0; qt < m.nQ; ++qt) {
      const int64_t i0 = qt * m.block_q, i1 = std::min(i0 + m.block_q, m.Lq);
      const auto [f_min, f_max] = std::minmax_element(first + i0, first + i1);
      const auto [l_min, l_max] = std::minmax_element(last + i0, last + i1);
      int64_t* t = m.range_bounds.data() + (b * m.nQ + qt) * 4;
      t[0] = *f_min, t[1] = *f_max, t[2] = *l_min, t[3] = *l_max;
    }
  }
}

// The TileMask of a kernel call's arguments: the band where `band` is set, or the per-row
// key `ranges` (B or 1, 2, Lq) where given (kinds, tile_index and bitmaps are then unused),
// either with its key mask `keys` (B or 1, Lk) if given; else the BlockMask's tensors,
// checked against the tile grid.
inline TileMask tile_mask_for(const at::Tensor& kinds, const at::Tensor& tile_index,
                              const at::Tensor& bitmaps, int64_t B, int64_t Lq, int64_t Lk,
                              int64_t block_q, int64_t block_k, bool band, int64_t lo, int64_t hi,
                              const std::optional<at::Tensor>& keys,
                              const std::optional<at::Tensor>& ranges, const char* who) {
  TORCH_CHECK(block_q > 0 && block_k > 0, who, ": tile sizes must be positive");
  TileMask m{block_q, block_k, Lq, Lk, (Lq + block_q - 1) / block_q, (Lk + block_k - 1) / block_k};
  TORCH_CHECK(!(band && ranges.has_value()), who, ": a band or ranges, not both");
  TORCH_CHECK(band || ranges.has_value() || !keys.has_value(), who,
              ": a key mask goes with a band or ranges only");
  if (band || ranges.has_value()) {
    m.band = band;
    m.lo = lo;
    m.hi = hi;
    if (ranges.has_value()) set_ranges(m, *ranges, B, who);
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
