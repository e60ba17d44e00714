// SpanRT's native CPU encoder: a BERT-family post-LayerNorm transformer with a span head, on every
// CPU. Linear layers in INT8 (per-token dynamic activation scales, per-channel weight scales, int32
// accumulation), BF16 (fp32 accumulation, where the CPU computes bf16 natively) or FP32; LayerNorm,
// GELU and the residual adds in fp32; attention in fp32 (bf16 tiles on AMX).
//
// The instruction-set path is chosen at construction (kernels/encoder/cpu_features.h): amx,
// avx512_vnni, avx2 (AVX-VNNI where present), neon (sdot) or generic C++. One build runs on every
// CPU of its architecture: each path's kernels are compiled with their own flags and called only
// where the CPU has them.
//
// Padding is never computed: the windows of a batch are packed token after token (every window's
// attention mask must be ones then zeros), so the linear layers cost the real tokens only and
// attention runs per window on its own length. A window's logits therefore do not depend on the
// other windows in its batch, on the batch's padding, or on the thread count, on every path.
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
  bool gelu_tanh = false;       // GELU's tanh approximation (gelu_new: ALBERT), else the exact (erf) GELU
};

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
  // `isa`: a path name ("amx", "avx512_vnni", "avx2", "neon", "generic") or "" for the best this
  // CPU runs. Throws std::invalid_argument for a missing or mis-shaped weight, a bad config or an
  // unknown path name, and std::runtime_error for a path this CPU cannot run or a precision the
  // path does not compute (the message says why).
  Encoder(const EncoderConfig& config, const WeightMap& weights, LinearPrecision precision, int threads, const std::string& isa = "");
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
  const char* isa() const;             // the path taken
  const char* linear_layers() const;   // how the linear layers run on it
  const char* attention() const;       // how attention runs on it

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  mutable std::mutex mutex_;
};

}  // namespace spanrt
