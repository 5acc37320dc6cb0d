// Registers the CPU kernels as torch custom ops: torch.ops.attnkit.tiled_forward/backward.
// Tests build a second copy with -DATTNKIT_PORTABLE_SIMD under another op namespace.

#include <ATen/ATen.h>
#include <torch/library.h>

#ifndef ATTNKIT_OP_NAMESPACE
#define ATTNKIT_OP_NAMESPACE attnkit
#endif

std::tuple<at::Tensor, at::Tensor> tiled_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kinds,
    const at::Tensor& tile_index, const at::Tensor& bitmaps, const at::Tensor& slopes,
    int64_t block_q, int64_t block_k, int64_t max_chunk, double scale, double softcap,
    int64_t alibi_offset, int64_t dropout_seed, int64_t dropout_threshold, double dropout_p,
    bool pack_gqa, bool band, int64_t band_lo, int64_t band_hi,
    const std::optional<at::Tensor>& keys, const std::optional<at::Tensor>& ranges,
    int64_t kv_splits, bool bf16_gemm, bool tile_scores);

std::tuple<at::Tensor, at::Tensor, at::Tensor> tiled_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse2, const at::Tensor& delta, const at::Tensor& kinds,
    const at::Tensor& tile_index, const at::Tensor& bitmaps, const at::Tensor& slopes,
    int64_t block_q, int64_t block_k, int64_t max_rows, double scale, double softcap,
    int64_t alibi_offset, int64_t dropout_seed, int64_t dropout_threshold, double dropout_p,
    bool band, int64_t band_lo, int64_t band_hi, const std::optional<at::Tensor>& keys,
    const std::optional<at::Tensor>& ranges, bool deterministic);

TORCH_LIBRARY(ATTNKIT_OP_NAMESPACE, m) {
  m.def(
      "tiled_forward(Tensor q, Tensor k, Tensor v, Tensor kinds, Tensor tile_index, "
      "Tensor bitmaps, Tensor slopes, int block_q, int block_k, int max_chunk, float scale, "
      "float softcap, SymInt alibi_offset, int dropout_seed, int dropout_threshold, "
      "float dropout_p, bool pack_gqa=False, bool band=False, SymInt band_lo=0, "
      "SymInt band_hi=0, Tensor? keys=None, Tensor? ranges=None, SymInt kv_splits=1, "
      "bool bf16_gemm=False, bool tile_scores=False) -> (Tensor, Tensor)");
  m.def(
      "tiled_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse2, Tensor delta, "
      "Tensor kinds, Tensor tile_index, Tensor bitmaps, Tensor slopes, int block_q, "
      "int block_k, int max_rows, float scale, float softcap, SymInt alibi_offset, "
      "int dropout_seed, int dropout_threshold, float dropout_p, bool band=False, "
      "SymInt band_lo=0, SymInt band_hi=0, Tensor? keys=None, Tensor? ranges=None, "
      "bool deterministic=False) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ATTNKIT_OP_NAMESPACE, CPU, m) {
  m.impl("tiled_forward", &tiled_forward);
  m.impl("tiled_backward", &tiled_backward);
}
