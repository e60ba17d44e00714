// Span search: the rule that turns start/end logits into the top-k answer spans, written once.
//
// A span (i, j) of a row is valid when mask[i] and mask[j] are set, i <= j <= i + L - 1 and its
// score start[i] + end[j] (a float32 sum) is greater than -inf (so -inf logits, and the NaN of
// +inf + -inf, never make a valid span). Spans are ranked by higher score, then smaller start,
// then smaller end: a total order, so every implementation (the C++ loop, the CUDA kernel, the
// NumPy oracle) returns the same spans, bit for bit. The CPU loop (span_search_cpu.cpp) and the
// CUDA kernel (span_search_cuda.cu) both call the __host__ __device__ helpers below.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define SPANRT_HD __host__ __device__ __forceinline__
#else
#define SPANRT_HD inline
#endif

namespace spanrt {

enum class LogitType : int32_t { kFloat32 = 0, kFloat16 = 1 };

// Everything one call needs; all arrays are C-contiguous. Inputs and outputs live on the same
// device as the implementation that receives the struct (host for the CPU loop, GPU for CUDA).
struct SpanSearchParams {
  const void* start_logits = nullptr;  // [batch, seq_len] of `logit_type`
  const void* end_logits = nullptr;    // [batch, seq_len] of `logit_type`
  const uint8_t* mask = nullptr;       // [batch, seq_len], nonzero where a span may start/end
  LogitType logit_type = LogitType::kFloat32;
  int64_t batch = 0;
  int64_t seq_len = 0;         // >= 1
  int64_t max_answer_len = 0;  // >= 1
  int64_t top_k = 0;           // >= 1
  int64_t* spans = nullptr;    // out [batch, top_k, 2]: (start, end), (-1, -1) when not filled
  float* scores = nullptr;     // out [batch, top_k]: best first, -inf when not filled
  float* start_lse = nullptr;  // optional out [batch]: log-sum-exp of start over mask | {0}
  float* end_lse = nullptr;    // optional out [batch]: log-sum-exp of end over mask | {0}
  float* null_scores = nullptr;  // optional out [batch]: start[0] + end[0]
};

// One candidate span. Positions fit in int32: the bindings reject seq_len >= 2^31.
struct Span {
  float score;
  int32_t start;
  int32_t end;
};

SPANRT_HD float negative_infinity() { return -INFINITY; }

// The span that loses to every valid span (and is written out as (-1, -1), -inf).
SPANRT_HD Span no_span() { return Span{negative_infinity(), INT32_MAX, INT32_MAX}; }

// A float16 bit pattern as float32 (exact; the same on host and device, no intrinsics needed).
SPANRT_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {  // inf / NaN
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // +-0
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float out;
  memcpy(&out, &bits, sizeof(out));
  return out;
}

// Logit `index` of a flat array of `type`, as float32.
SPANRT_HD float load_logit(const void* data, LogitType type, int64_t index) {
  if (type == LogitType::kFloat16) {
    return half_bits_to_float(static_cast<const uint16_t*>(data)[index]);
  }
  return static_cast<const float*>(data)[index];
}

// The logit a masked-out position contributes to span scores: -inf, so it makes no valid span.
SPANRT_HD float masked_logit(float logit, bool in_mask) {
  return in_mask ? logit : negative_infinity();
}

// A NaN at a masked-in position is a caller error (the row is reported, never decoded silently).
SPANRT_HD bool is_nan_in_mask(float start, float end, bool in_mask) {
  return in_mask && (isnan(start) || isnan(end));
}

// Last end position a span starting at `start` may have.
SPANRT_HD int64_t last_end(int64_t start, int64_t max_answer_len, int64_t seq_len) {
  const int64_t last = start + max_answer_len - 1;
  return last < seq_len ? last : seq_len - 1;
}

// The score of span (start, end): a float32 sum of the (masked) logits.
SPANRT_HD float span_score(float start_logit, float end_logit) { return start_logit + end_logit; }

// A span with this score may be returned: greater than -inf (false for -inf and NaN).
SPANRT_HD bool is_valid_score(float score) { return score > negative_infinity(); }

// The ranking: true when `a` comes before `b` (higher score, then smaller start, then smaller end).
SPANRT_HD bool span_before(const Span& a, const Span& b) {
  if (a.score != b.score) return a.score > b.score;
  if (a.start != b.start) return a.start < b.start;
  return a.end < b.end;
}

// Writes rank `rank` of row `row`: the span when valid, else the (-1, -1), -inf fill.
SPANRT_HD void write_span(const SpanSearchParams& p, int64_t row, int64_t rank, const Span& span) {
  const int64_t slot = row * p.top_k + rank;
  const bool valid = is_valid_score(span.score);
  p.spans[2 * slot] = valid ? span.start : -1;
  p.spans[2 * slot + 1] = valid ? span.end : -1;
  p.scores[slot] = valid ? span.score : negative_infinity();
}

// Positions that enter the log-sum-exp: the masked-in ones plus position 0 ([CLS], the null
// answer), as the Hugging Face QA pipeline keeps CLS in its softmax.
SPANRT_HD bool in_lse(int64_t position, bool in_mask) { return in_mask || position == 0; }

// log(sum(exp(x))) from the running maximum and sum(exp(x - maximum)): -inf when all x are
// -inf, +inf when one is +inf, NaN when one is NaN.
SPANRT_HD float lse_finish(float maximum, float sum_exp, bool saw_nan) {
  if (saw_nan) return NAN;
  if (!(maximum > negative_infinity())) return negative_infinity();
  if (isinf(maximum)) return maximum;
  return maximum + logf(sum_exp);
}

// One term of that sum; 0 for -inf (also when the maximum is -inf).
SPANRT_HD float lse_term(float x, float maximum) {
  return x > negative_infinity() ? expf(x - maximum) : 0.0f;
}

// ---- Entry points -------------------------------------------------------------------------

// The C++ decoder: rows in parallel, O(batch * seq_len * max_answer_len), no allocation per span.
// Returns the first row holding a NaN logit at a masked-in position, or -1.
int64_t span_search_cpu(const SpanSearchParams& params);

// The CUDA decoder is reachable when the extension was built with it (SPANRT_WITH_CUDA).
// Streams are integers with the __cuda_array_interface__ convention: 0 the default stream,
// 1 the legacy default stream, 2 the per-thread default stream, any other a cudaStream_t.
struct CudaLaunch {
  int device = 0;                    // the CUDA device holding every array (made current)
  intptr_t stream = 0;               // where the kernel runs
  const intptr_t* wait_for = nullptr;  // streams the inputs/outputs were produced on: waited for
  int num_wait_for = 0;
  bool outputs_on_host = true;  // params' outputs are host memory: copied back, stream synced
};

// Thrown when no CUDA device or driver is usable (mapped to BackendUnavailableError).
class CudaUnavailableError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Runs the search on the GPU; params' inputs are device pointers. Waits for the stream to
// finish (a 4-byte NaN flag is read back) and returns the first row holding a NaN at a
// masked-in position, or -1. Throws std::runtime_error on CUDA errors.
int64_t span_search_cuda(const SpanSearchParams& params, const CudaLaunch& launch);

// The CUDA device ordinal holding `pointer` (device or managed memory), or -1 when it is not
// device memory; throws CudaUnavailableError when no device/driver is usable.
int cuda_pointer_device(const void* pointer);

}  // namespace spanrt
