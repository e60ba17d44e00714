// SpanRT's native CPU encoder: a BERT-family post-LayerNorm transformer with a span head, run
// with Intel AMX tiles. Linear layers in INT8 (per-token dynamic activation scales, per-channel
// weight scales, int32 accumulation) or BF16 (fp32 accumulation); attention in BF16 with an fp32
// softmax; LayerNorm, GELU and the residual adds in fp32.
//
// Padding is never computed: the windows of a batch are packed token after token (every window's
// attention mask must be ones then zeros), so the linear layers cost the real tokens only and
// attention runs per window on its own length. A window's logits therefore do not depend on the
// other windows in its batch, or on the batch's padding, at any precision.
//
// Needs AMX-TILE, AMX-INT8, AMX-BF16 and AVX-512 (F, BW, VL, DQ, BF16): Intel Xeon Sapphire
// Rapids and newer. engine._kernels.amx_status() checks the CPU and asks Linux for the AMX tile
// state before engine._encoder (built with those instruction sets) may be imported.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace spanrt {

struct EncoderConfig {
  int64_t vocab_size = 0;
  int64_t max_positions = 0;
  int64_t type_vocab_size = 0;  // 0: the model takes no token types (DistilBERT)
  int64_t embedding_size = 0;   // != hidden: ELECTRA's embeddings with a projection to hidden
  int64_t hidden = 0;
  int64_t layers = 0;
  int64_t heads = 0;
  int64_t intermediate = 0;
  int64_t position_offset = 0;  // RoBERTa: padding_idx + 1, else 0
  float layer_norm_eps = 1e-12f;
};

// kFp32: the same model in fp32 with AVX-512 FMA (no AMX): PyTorch's numbers to float rounding.
enum class LinearPrecision { kInt8, kBf16, kFp32 };

// A float32 tensor handed over by the caller (row-major); the encoder copies what it keeps.
struct TensorView {
  const float* data = nullptr;
  std::vector<int64_t> shape;
};

// Weight names (PyTorch Linear layout [out, in]):
//   embeddings.word [V, E], embeddings.position [P, E], embeddings.token_type [T, E] (if T > 0),
//   embeddings.norm.weight/.bias [E], embeddings.project.weight [H, E] / .bias [H] (if E != H),
//   layers.{i}.qkv.weight [3H, H] (query, key, value rows) / .bias [3H],
//   layers.{i}.attn_out.weight [H, H] / .bias, layers.{i}.attn_norm.weight/.bias [H],
//   layers.{i}.ffn_in.weight [I, H] / .bias [I], layers.{i}.ffn_out.weight [H, I] / .bias [H],
//   layers.{i}.ffn_norm.weight/.bias [H], qa.weight [2, H], qa.bias [2].
using WeightMap = std::map<std::string, TensorView>;

class Encoder {
 public:
  // Throws std::invalid_argument for a missing or mis-shaped weight or a bad config.
  Encoder(const EncoderConfig& config, const WeightMap& weights, LinearPrecision precision, int threads);
  ~Encoder();
  Encoder(const Encoder&) = delete;
  Encoder& operator=(const Encoder&) = delete;

  // ids, mask, types (nullable): [batch, seq] int64. start/end: [batch, seq] float32; positions
  // past a window's length get -10000. Throws std::invalid_argument for a mask that is not ones
  // then zeros, an id outside the vocabulary, or a window longer than max_positions. Calls are
  // serialised (one at a time uses every thread).
  void forward(const int64_t* ids, const int64_t* mask, const int64_t* types, int64_t batch, int64_t seq,
               float* start, float* end) const;

  const EncoderConfig& config() const;
  LinearPrecision precision() const;
  int threads() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  mutable std::mutex mutex_;
};

}  // namespace spanrt
