// Block-sparse flash-attention forward for CPUs: float32, bfloat16 and float16 in and out,
// float32 math (16-bit tiles widened, or bfloat16 on MKL's bfloat16 GEMM: see `run`).
//
// One work unit per (batch, query head, query tile), spread over threads by at::parallel_for.
// With pack_gqa (short query tiles, as in decoding, under a mask shared by every head: the
// caller decides, cpu_kernel.packs_gqa) one unit per (batch, kv head, query tile) instead
// stacks its G query heads' rows as G·tq rows (PackGQA): the kv head's keys and values are
// read once, not G times, and multiplied by G·tq rows at a time.
// With kv_splits = S > 1 (fewer units than threads, as in decoding one sequence: the caller
// decides, cpu_kernel.kv_splits) each unit's kv tiles are split into S parts run as work
// items of their own, each writing a normalised partial output and LSE, merged by their
// LSEs at the end (FlashDecoding), so idle threads share a unit's keys.
// Within a unit, maximal runs of non-empty kv tiles (at most max_chunk keys) form a chunk:
//   S = Q_tile · K_chunkᵀ · scale·log2(e)      one sgemm (MKL, as torch's own CPU kernels);
//       with tile_scores (a backward will run) one per kv tile, the backward's calls
//   (with ALiBi / softcap: S·scale, the mods, then ·log2(e); see apply_score_mods)
//   EMPTY tiles (for this b, h) are skipped, PARTIAL tiles masked, FULL tiles not (TileMask:
//   a BlockMask's kinds and bitmaps, or a band's tiles found from their bounds)
//   online softmax in log2 units: m, l per row; P = exp2(S - m) in place, fused with row sums
//   acc = acc·exp2(m_old - m_new) + P · V_chunk  one sgemm (P∘Z with dropout: see Dropout)
// Output acc / l; LSE = (m + log2 l)·ln 2, -inf for rows with no key (output row 0). NaN in q
// or k gives NaN rows, as in the reference (a fast path must not hide a diverged input).
// Every output row is written here (out and lse are allocated uninitialised).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "tile_mask.h"

using namespace attnkit_cpu;

// At most this many stacked rows per packed unit: the default query tile's height at most.
constexpr int64_t kMaxPackedRows = 64;

std::tuple<at::Tensor, at::Tensor> tiled_forward(
    const at::Tensor& q,            // (B, Hq, Lq, D) float32, bfloat16 or float16 (see below)
    const at::Tensor& k,            // (B, Hkv, Lk, D)
    const at::Tensor& v,            // (B, Hkv, Lk, Dv)
    const at::Tensor& kinds,        // (Bm, Hm, nQ, nK) int8: 0 empty, 1 partial, 2 full
    const at::Tensor& tile_index,   // (Bm, Hm, nQ, nK) int64: row of `bitmaps` or -1
    const at::Tensor& bitmaps,      // (nPartial, block_q, block_k) bool
    const at::Tensor& slopes,       // (Hq,) float32 ALiBi slopes, or empty: no ALiBi
    int64_t block_q, int64_t block_k, int64_t max_chunk, double scale, double softcap,
    int64_t alibi_offset,  // query i sits at key i + alibi_offset (ALiBi's distance)
    int64_t dropout_seed, int64_t dropout_threshold, double dropout_p,  // seed < 0: none
    bool pack_gqa,
    bool band, int64_t band_lo, int64_t band_hi,  // band: lo <= j - i <= hi, no kinds/bitmaps
    const std::optional<at::Tensor>& keys,        // with a band or ranges: (B or 1, Lk) bool
    const std::optional<at::Tensor>& ranges,      // per-row first, last keys: (B or 1, 2, Lq)
    int64_t kv_splits, bool bf16_gemm,
    bool tile_scores) {  // S one kv tile per GEMM, as the backward recomputes it (no packing)
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) &&
                  k.scalar_type() == dtype && v.scalar_type() == dtype,
              "tiled_forward: float32, bfloat16 or float16 inputs of one dtype expected");
  // q, k, v are read through their strides (only the last dim must be contiguous), so slices
  // of a KV cache and (B, L, H, D) transposes need no copy: decoding reads each key once.
  const int64_t ldq = row_stride(q, "tiled_forward", "q");
  const int64_t ldk = row_stride(k, "tiled_forward", "k");
  const int64_t ldv = row_stride(v, "tiled_forward", "v");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const int64_t G = Hq / Hkv;
  const TileMask mask = tile_mask_for(kinds, tile_index, bitmaps, B, Lq, Lk, block_q, block_k,
                                      band, band_lo, band_hi, keys, ranges, "tiled_forward");
  const int64_t nQ = mask.nQ;
  const int64_t tiles_per_chunk = std::max<int64_t>(1, max_chunk / block_k);
  // packed: query tiles whose tile map serves every head
  const bool packed = pack_gqa && G > 1;
  TORCH_CHECK(!(packed && tile_scores), "tiled_forward: tile_scores makes S per head's query "
              "tile, as the backward does: no pack_gqa with it");
  const int64_t tile_rows = std::min(block_q, Lq);  // a query tile's rows at most
  TORCH_CHECK(!packed || (mask.shared_by_heads() && G * tile_rows <= kMaxPackedRows),
              "tiled_forward: pack_gqa needs a tile map shared by the heads and at most ",
              kMaxPackedRows, " stacked rows; got ", mask.Hm, " head maps, ", G * tile_rows,
              " rows");
  const int64_t groups = packed ? G : 1;  // query heads per unit
  const int64_t max_rows = groups * tile_rows;
  const int64_t heads_per_unit = packed ? Hkv : Hq;
  const int64_t units = B * heads_per_unit * nQ;
  TORCH_CHECK(kv_splits >= 1, "tiled_forward: kv_splits must be >= 1, got ", kv_splits);
  const int64_t splits = kv_splits;
  struct Unit {
    int64_t b, h0, hk, qt, q0, tq, rows;  // first query head; rows = heads × queries
  };
  auto unit_at = [&](int64_t unit) {
    const int64_t qt = unit % nQ, hu = (unit / nQ) % heads_per_unit;
    const int64_t h0 = packed ? hu * G : hu;
    const int64_t q0 = qt * block_q, tq = std::min(block_q, Lq - q0);
    // row R of a unit: head h0 + R / tq, query q0 + R % tq
    return Unit{unit / (nQ * heads_per_unit), h0, h0 / G, qt, q0, tq, groups * tq};
  };
  // the row of out and lse, (b, head, query), that row r of unit u writes
  auto out_row = [&](const Unit& u, int64_t r) {
    return (u.b * Hq + u.h0 + r / u.tq) * Lq + u.q0 + r % u.tq;
  };
  // with splits: each part's normalised output rows and LSE (log2 units), merged at the end
  std::vector<float> part_out(splits > 1 ? splits * units * max_rows * Dv : 0);
  std::vector<float> part_lse(splits > 1 ? splits * units * max_rows : 0);

  // Uninitialised: every row is written by its unit, so first touches happen in parallel.
  auto out = at::empty({B, Hq, Lq, Dv}, q.options());
  auto lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  float* lp = lse.data_ptr<float>();
  const ScoreMods mods = score_mods_for(slopes, Hq, softcap, alibi_offset, "tiled_forward");
  const Dropout dropout = dropout_for(dropout_seed, dropout_threshold, dropout_p, "tiled_forward");
  // without mods, log2(e) folds into the GEMM; with them, the mods see natural units first
  const float alpha_qk = static_cast<float>(mods.any() ? scale : scale * 1.4426950408889634);

  // T: the input/output dtype. 16-bit inputs are widened tile by tile into float32 scratch
  // (the GEMMs are sgemm), so no float32 copy of q, k, v or out is ever made. bfloat16 with
  // bf16_gemm: q, k and v tiles go to MKL's bfloat16 GEMM as they are, and P as its hi and
  // lo bfloat16 parts (split_bf16: two GEMMs, float32-like accuracy).
  auto run = [&](auto dtype_tag) {
    using T = decltype(dtype_tag);
    constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;
    const bool native = kBf16 && bf16_gemm && has_gemm_bf16();
    const bool widen = !std::is_same_v<T, float> && !native;  // tiles widened to float32
    const T* qp = q.data_ptr<T>();
    const T* kp = k.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, units * splits, 1, [&](int64_t begin, int64_t end) {
      const OneBlasThread one_blas_thread;
      const int64_t chunk_keys = tiles_per_chunk * block_k;
      std::vector<float> S(max_rows * chunk_keys);
      std::vector<float> Qf(widen || (packed && !native) ? max_rows * D : 0),
          Kf(widen ? chunk_keys * D : 0), Vf(widen ? chunk_keys * Dv : 0);
      std::vector<T> Qn(native && packed ? max_rows * D : 0);  // packed rows, as they are
      std::vector<at::BFloat16> Ph(native ? max_rows * chunk_keys : 0), Pl(Ph.size());
      std::vector<float> acc(max_rows * Dv), m(max_rows), l(max_rows);
      std::vector<float> Z(dropout.on() ? chunk_keys : 0);  // dropout scales
      for (int64_t work = begin; work < end; ++work) {
        const int64_t unit = work / splits, split = work % splits;
        const Unit u = unit_at(unit);
        const auto& [b, h0, hk, qt, q0, tq, rows] = u;
        const int64_t map = mask.map_of(b, h0);
        const T* qsrc = qp + b * q.stride(0) + h0 * q.stride(1) + q0 * ldq;
        const T* kbase = kp + b * k.stride(0) + hk * k.stride(1);
        const T* vbase = vp + b * v.stride(0) + hk * v.stride(1);
        int64_t ldqt = ldq, ldkc, ldvc;  // leading dims of the tiles the GEMMs read
        const float* qtile = Qf.data();
        const T* qtile_n = qsrc;  // native: the rows as they are
        if (packed) {  // gather the G heads' rows into one tile
          for (int64_t g = 0; g < G; ++g) {
            if (native) {
              copy_rows(qsrc + g * q.stride(1), tq, D, ldq, Qn.data() + g * tq * D);
            } else {
              copy_rows(qsrc + g * q.stride(1), tq, D, ldq, Qf.data() + g * tq * D);
            }
          }
          ldqt = D;
          qtile_n = Qn.data();
        } else if (!native) {
          qtile = widen_rows(qsrc, tq, D, ldq, Qf.data(), ldqt);
        }
        std::fill(acc.begin(), acc.begin() + rows * Dv, 0.0f);
        std::fill(m.begin(), m.begin() + rows, kNegInf);
        std::fill(l.begin(), l.begin() + rows, 0.0f);
        bool any = false;
        auto [kt, kt_end] = mask.kv_tiles(map, qt);
        if (splits > 1) {  // this part's share of the unit's tiles
          const int64_t per_split = (kt_end - kt + splits - 1) / splits;
          kt = std::min(kt + split * per_split, kt_end);
          kt_end = std::min(kt + per_split, kt_end);
        }
        while (kt < kt_end) {
          if (mask.kind(map, qt, kt) == kEmpty) { ++kt; continue; }
          const int64_t kt0 = kt;
          while (kt < kt_end && mask.kind(map, qt, kt) != kEmpty && kt - kt0 < tiles_per_chunk) {
            ++kt;
          }
          const int64_t k0 = kt0 * block_k, k1 = std::min(kt * block_k, Lk), n = k1 - k0;
          any = true;
          float* s = S.data();
          // S = alpha·Q·Kᵀ over the chunk's keys in one GEMM; with tile_scores one GEMM per kv
          // tile: MKL's rounding depends on the call's shape, and the backward's P = 2^(S - LSE)
          // sums to 1 only where it recomputes S with the very calls that made the LSE.
          const int64_t keys_per_gemm = tile_scores ? block_k : n;
          if constexpr (kBf16) {
            if (native) {
              for (int64_t c0 = 0; c0 < n; c0 += keys_per_gemm) {
                gemm_bf16_rowmajor(false, true, rows, std::min(keys_per_gemm, n - c0), D, alpha_qk,
                                   qtile_n, ldqt, kbase + (k0 + c0) * ldk, ldk, 0.0f, s + c0, n);
              }
            }
          }
          if (!native) {
            const float* kchunk = widen_rows(kbase + k0 * ldk, n, D, ldk, Kf.data(), ldkc);
            for (int64_t c0 = 0; c0 < n; c0 += keys_per_gemm) {
              gemm_rowmajor(false, true, rows, std::min(keys_per_gemm, n - c0), D, alpha_qk, qtile,
                            ldqt, kchunk + c0 * ldkc, ldkc, 0.0f, s + c0, n);
            }
          }
          if (mods.any()) {
            for (int64_t r = 0; r < rows; ++r) {
              apply_score_mods(s + r * n, n, h0 + r / tq, q0 + r % tq, k0, mods, nullptr);
            }
          }
          for (int64_t t = kt0; t < kt; ++t) {  // partial tiles: mask them
            if (mask.kind(map, qt, t) != kPartial) continue;
            for (int64_t g = 0; g < groups; ++g) {  // every head's rows: the same mask
              mask.apply(s + g * tq * n + t * block_k - k0, n, map, qt, t);
            }
          }
          for (int64_t r = 0; r < rows; ++r) {
            float* srow = s + r * n;
            float m_new = std::max(m[r], row_max(srow, n));
            if (m_new == kNegInf) {  // nothing attended yet in this row: P = 0
              if (!any_nan(srow, n)) {
                std::fill(srow, srow + n, 0.0f);
                continue;
              }
              // NaN scores (NaN in q or k): the max skips them, the reference does not; a NaN
              // m makes P, l and the output row NaN, and stays (std::max keeps a NaN first arg)
              m_new = std::numeric_limits<float>::quiet_NaN();
            }
            const float sum = exp2_shifted_row(srow, n, m_new);
            const float rescale = std::exp2(m[r] - m_new);  // once per row: libm is fine
            l[r] = l[r] * rescale + sum;  // the normaliser counts dropped entries too
            m[r] = m_new;
            if (dropout.on()) {  // P·V uses the dropped, rescaled probabilities
              dropout.row_scales(Z.data(), n, dropout.row_state(b, h0 + r / tq, q0 + r % tq), k0);
  #pragma omp simd
              for (int64_t c = 0; c < n; ++c) srow[c] *= Z[c];
            }
            if (rescale != 1.0f) {
              float* arow = acc.data() + r * Dv;
              for (int64_t c = 0; c < Dv; ++c) arow[c] *= rescale;
            }
          }
          if constexpr (kBf16) {
            if (native) {
              split_bf16(s, rows * n, Ph.data(), Pl.data());
              for (const at::BFloat16* part : {Ph.data(), Pl.data()}) {
                gemm_bf16_rowmajor(false, false, rows, Dv, n, 1.0f, part, n, vbase + k0 * ldv, ldv,
                                   1.0f, acc.data(), Dv);
              }
            }
          }
          if (!native) {
            const float* vchunk = widen_rows(vbase + k0 * ldv, n, Dv, ldv, Vf.data(), ldvc);
            gemm_rowmajor(false, false, rows, Dv, n, 1.0f, s, n, vchunk, ldvc, 1.0f, acc.data(),
                          Dv);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const bool attended = any && l[r] != 0.0f;  // l >= 1 once a key is attended, or NaN
          const float inv = attended ? 1.0f / l[r] : 0.0f;
          const float row_lse2 = attended ? m[r] + std::log2(l[r]) : kNegInf;
          if (splits > 1) {  // a part: merged below
            const int64_t part_row = (split * units + unit) * max_rows + r;
            float* prow = part_out.data() + part_row * Dv;
            for (int64_t c = 0; c < Dv; ++c) prow[c] = attended ? acc[r * Dv + c] * inv : 0.0f;
            part_lse[part_row] = row_lse2;
            continue;
          }
          const int64_t at = out_row(u, r);
          T* orow = op + at * Dv;
          for (int64_t c = 0; c < Dv; ++c) {  // no key attended: 0 (not 0·acc: V may be inf)
            orow[c] = static_cast<T>(attended ? acc[r * Dv + c] * inv : 0.0f);
          }
          lp[at] = row_lse2 * 0.6931471805599453f;
        }
      }
    });
    if (splits == 1) return;
    // merge the parts: out = Σ 2^(lse_s - M)·out_s / Σ 2^(lse_s - M), M the largest lse_s
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> sum(Dv);
      for (int64_t unit = begin; unit < end; ++unit) {
        const Unit u = unit_at(unit);
        for (int64_t r = 0; r < u.rows; ++r) {
          const int64_t first = unit * max_rows + r, stride = units * max_rows;  // part 0, next
          float M = kNegInf;
          bool nan = false;
          for (int64_t p = 0; p < splits; ++p) {
            const float x = part_lse[first + p * stride];
            nan |= x != x;
            M = x > M ? x : M;
          }
          const int64_t at = out_row(u, r);
          T* orow = op + at * Dv;
          if (nan || M == kNegInf) {  // a NaN score in some part, or no key in any
            const float fill = nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
            std::fill(orow, orow + Dv, static_cast<T>(fill));
            lp[at] = nan ? fill : kNegInf;
            continue;
          }
          std::fill(sum.begin(), sum.end(), 0.0f);
          float weights = 0.0f;
          for (int64_t p = 0; p < splits; ++p) {
            const float x = part_lse[first + p * stride];
            if (x == kNegInf) continue;  // a part with no key of this row
            const float w = std::exp2(x - M);
            const float* prow = part_out.data() + (first + p * stride) * Dv;
            for (int64_t c = 0; c < Dv; ++c) sum[c] += w * prow[c];
            weights += w;
          }
          for (int64_t c = 0; c < Dv; ++c) orow[c] = static_cast<T>(sum[c] / weights);
          lp[at] = (M + std::log2(weights)) * 0.6931471805599453f;
        }
      }
    });
  };
  if (dtype == at::kFloat) {
    run(float{});
  } else if (dtype == at::kBFloat16) {
    run(at::BFloat16{});
  } else {
    run(at::Half{});
  }
  return {out, lse};
}

