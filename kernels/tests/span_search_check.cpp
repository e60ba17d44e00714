// Standalone check of the C++ decoder against a brute-force statement of the rule, written
// without the shared helpers. Built by CMake with SPANRT_BUILD_TESTS (on with SPANRT_SANITIZE,
// where ASan/UBSan watch every case): edge cases first, then seeded random cases.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "spanrt/span_search.h"

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct Case {
  std::string name;
  int64_t batch = 1, seq_len = 1, max_answer_len = 1, top_k = 1;
  bool half = false;
  std::vector<float> start, end;          // used when !half
  std::vector<uint16_t> start16, end16;   // used when half
  std::vector<uint8_t> mask;
};

float half_to_float_reference(uint16_t h) {
  const int sign = (h & 0x8000) ? -1 : 1;
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  if (exponent == 0x1f) return mantissa ? std::numeric_limits<float>::quiet_NaN() : sign * kInf;
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -24);
  return sign * std::ldexp(static_cast<float>(mantissa + 1024), exponent - 25);
}

float logit(const Case& c, bool start, int64_t index) {
  if (c.half) return half_to_float_reference(start ? c.start16[index] : c.end16[index]);
  return start ? c.start[index] : c.end[index];
}

struct Expected {
  std::vector<int64_t> spans;
  std::vector<float> scores;
  std::vector<double> start_lse, end_lse;
  std::vector<float> null_scores;
  int64_t nan_row = -1;
};

double lse_reference(const Case& c, bool start, int64_t row) {
  double maximum = -kInf;
  std::vector<double> values;
  for (int64_t i = 0; i < c.seq_len; ++i) {
    if (i != 0 && !c.mask[row * c.seq_len + i]) continue;
    const double x = logit(c, start, row * c.seq_len + i);
    if (std::isnan(x)) return std::nan("");
    values.push_back(x);
    maximum = std::max(maximum, x);
  }
  if (maximum == -kInf || std::isinf(maximum)) return maximum;
  double sum = 0.0;
  for (double x : values) sum += std::exp(x - maximum);
  return maximum + std::log(sum);
}

Expected brute_force(const Case& c) {
  Expected out;
  struct Pair {
    float score;
    int64_t start, end;
  };
  for (int64_t row = 0; row < c.batch; ++row) {
    std::vector<Pair> pairs;
    const int64_t base = row * c.seq_len;
    for (int64_t i = 0; i < c.seq_len; ++i) {
      const bool mi = c.mask[base + i] != 0;
      if (mi && (std::isnan(logit(c, true, base + i)) || std::isnan(logit(c, false, base + i)))) {
        if (out.nan_row < 0) out.nan_row = row;
      }
      for (int64_t j = i; j < c.seq_len && j - i < c.max_answer_len; ++j) {
        if (!mi || !c.mask[base + j]) continue;
        const float score = logit(c, true, base + i) + logit(c, false, base + j);
        if (score > -kInf) pairs.push_back({score, i, j});  // excludes -inf and NaN
      }
    }
    std::sort(pairs.begin(), pairs.end(), [](const Pair& a, const Pair& b) {
      if (a.score != b.score) return a.score > b.score;
      if (a.start != b.start) return a.start < b.start;
      return a.end < b.end;
    });
    for (int64_t r = 0; r < c.top_k; ++r) {
      const bool have = r < static_cast<int64_t>(pairs.size());
      out.spans.push_back(have ? pairs[r].start : -1);
      out.spans.push_back(have ? pairs[r].end : -1);
      out.scores.push_back(have ? pairs[r].score : -kInf);
    }
    out.start_lse.push_back(lse_reference(c, true, row));
    out.end_lse.push_back(lse_reference(c, false, row));
    out.null_scores.push_back(logit(c, true, base) + logit(c, false, base));
  }
  return out;
}

bool same_float(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof(float)) == 0;
}

bool close_lse(float got, double want) {
  if (std::isnan(want) || std::isinf(want)) return same_float(got, static_cast<float>(want));
  return std::fabs(got - want) <= 1e-5 * std::max(1.0, std::fabs(want));
}

// Runs one case; prints and returns false on the first mismatch.
bool run_case(const Case& c) {
  const Expected want = brute_force(c);
  const int64_t rows_k = c.batch * c.top_k;
  // Exactly-sized outputs (no slack) so ASan sees any write past them.
  std::vector<int64_t> spans(2 * rows_k, 12345);
  std::vector<float> scores(rows_k, 7.0f), start_lse(c.batch), end_lse(c.batch), null_scores(c.batch);
  spanrt::SpanSearchParams p;
  p.start_logits = c.half ? static_cast<const void*>(c.start16.data()) : c.start.data();
  p.end_logits = c.half ? static_cast<const void*>(c.end16.data()) : c.end.data();
  p.mask = c.mask.data();
  p.logit_type = c.half ? spanrt::LogitType::kFloat16 : spanrt::LogitType::kFloat32;
  p.batch = c.batch;
  p.seq_len = c.seq_len;
  p.max_answer_len = c.max_answer_len;
  p.top_k = c.top_k;
  p.spans = spans.data();
  p.scores = scores.data();
  p.start_lse = start_lse.data();
  p.end_lse = end_lse.data();
  p.null_scores = null_scores.data();
  const int64_t nan_row = spanrt::span_search_cpu(p);
  auto fail = [&c](const std::string& what) {
    std::printf("FAIL %s (B=%lld S=%lld L=%lld k=%lld%s): %s\n", c.name.c_str(),
                static_cast<long long>(c.batch), static_cast<long long>(c.seq_len),
                static_cast<long long>(c.max_answer_len), static_cast<long long>(c.top_k),
                c.half ? " float16" : "", what.c_str());
    return false;
  };
  if (nan_row != want.nan_row) {
    return fail("nan row " + std::to_string(nan_row) + " != " + std::to_string(want.nan_row));
  }
  if (want.nan_row >= 0) return true;  // outputs of a NaN batch are not defined
  for (int64_t s = 0; s < rows_k; ++s) {
    if (spans[2 * s] != want.spans[2 * s] || spans[2 * s + 1] != want.spans[2 * s + 1] ||
        !same_float(scores[s], want.scores[s])) {
      return fail("slot " + std::to_string(s) + ": got (" + std::to_string(spans[2 * s]) + ", " +
                  std::to_string(spans[2 * s + 1]) + ") " + std::to_string(scores[s]) +
                  ", want (" + std::to_string(want.spans[2 * s]) + ", " +
                  std::to_string(want.spans[2 * s + 1]) + ") " + std::to_string(want.scores[s]));
    }
  }
  for (int64_t row = 0; row < c.batch; ++row) {
    if (!close_lse(start_lse[row], want.start_lse[row]) || !close_lse(end_lse[row], want.end_lse[row])) {
      return fail("lse of row " + std::to_string(row));
    }
    if (!same_float(null_scores[row], want.null_scores[row])) return fail("null score of row " + std::to_string(row));
  }
  return true;
}

// x rounded to an integer in [-15, 15] (or +-inf) as float16 bits.
uint16_t small_half(float x) {
  if (std::isinf(x)) return x > 0 ? 0x7c00 : 0xfc00;
  const long v = std::lround(std::max(-15.0f, std::min(15.0f, x)));
  if (v == 0) return 0;
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  const long a = std::labs(v);
  int exponent = 0;
  while ((a >> exponent) > 1) ++exponent;
  const long mantissa = (a << (10 - exponent)) & 0x3ff;
  return static_cast<uint16_t>(sign | ((exponent + 15) << 10) | mantissa);
}

Case random_case(std::mt19937& rng, const std::string& name) {
  auto uniform = [&rng](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  Case c;
  c.name = name;
  c.batch = uniform(1, 6);
  c.seq_len = uniform(1, 160);
  c.max_answer_len = uniform(1, c.seq_len + 5);
  c.top_k = uniform(1, 3) == 1 ? uniform(1, 3) : uniform(1, 60);
  c.half = uniform(0, 3) == 0;
  const bool ties = uniform(0, 1) == 1;  // integer logits: many equal scores
  const int64_t mask_mode = uniform(0, 4);  // 0 all false, 1 all true, else random density
  const double density = std::uniform_real_distribution<double>(0.05, 1.0)(rng);
  const int64_t n = c.batch * c.seq_len;
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int64_t i = 0; i < n; ++i) {
    float s = ties ? static_cast<float>(uniform(-3, 3)) : normal(rng);
    float e = ties ? static_cast<float>(uniform(-3, 3)) : normal(rng);
    if (uniform(0, 19) == 0) s = -kInf;
    if (uniform(0, 19) == 0) e = -kInf;
    if (c.half) {
      c.start16.push_back(0);
      c.end16.push_back(0);
    }
    c.start.push_back(s);
    c.end.push_back(e);
    c.mask.push_back(mask_mode == 0 ? 0 : mask_mode == 1 ? 1 : (std::bernoulli_distribution(density)(rng) ? 1 : 0));
  }
  if (c.half) {  // logits rounded to small integers (|x| <= 15) and +-inf: exact in float16
    for (int64_t i = 0; i < n; ++i) {
      c.start16[i] = small_half(c.start[i]);
      c.end16[i] = small_half(c.end[i]);
    }
  }
  return c;
}

Case filled(const std::string& name, int64_t batch, int64_t seq_len, int64_t max_answer_len,
            int64_t top_k, float value, uint8_t mask_value) {
  Case c;
  c.name = name;
  c.batch = batch;
  c.seq_len = seq_len;
  c.max_answer_len = max_answer_len;
  c.top_k = top_k;
  c.start.assign(batch * seq_len, value);
  c.end.assign(batch * seq_len, value);
  c.mask.assign(batch * seq_len, mask_value);
  return c;
}

Case half_extremes(int64_t top_k) {
  // float16 max, -max, smallest subnormals, +-0, +-inf, a NaN outside the mask.
  const uint16_t values[] = {0x7bff, 0xfbff, 0x0001, 0x8001, 0x0000, 0x8000, 0x7c00, 0xfc00, 0x3c00, 0x7e00};
  Case c;
  c.name = "float16 extremes";
  c.half = true;
  c.batch = 2;
  c.seq_len = 10;
  c.max_answer_len = 4;
  c.top_k = top_k;
  for (int64_t row = 0; row < c.batch; ++row) {
    for (int64_t i = 0; i < c.seq_len; ++i) {
      c.start16.push_back(values[i]);
      c.end16.push_back(values[(i + 3 * row + 1) % 10]);
      const bool nan_here = values[i] == 0x7e00 || values[(i + 3 * row + 1) % 10] == 0x7e00;
      c.mask.push_back(nan_here ? 0 : 1);
    }
  }
  return c;
}

}  // namespace

int main() {
  std::vector<Case> cases;
  cases.push_back(filled("S=1", 1, 1, 1, 1, 0.5f, 1));
  cases.push_back(filled("S=1, k > valid", 2, 1, 3, 4, 0.5f, 1));
  cases.push_back(filled("L > S", 3, 5, 50, 20, 1.0f, 1));
  cases.push_back(filled("k > number of valid spans", 2, 4, 2, 100, 0.0f, 1));
  cases.push_back(filled("all-false mask", 3, 17, 5, 3, 1.0f, 0));
  cases.push_back(filled("all-false mask, k=1", 3, 17, 5, 1, 1.0f, 0));
  cases.push_back(filled("all -inf", 2, 9, 3, 2, -kInf, 1));
  cases.push_back(filled("batch 0", 0, 8, 3, 2, 0.0f, 1));
  cases.push_back(half_extremes(1));
  cases.push_back(half_extremes(40));
  Case nan_case = filled("NaN in row 1", 3, 6, 3, 2, 0.0f, 1);
  nan_case.start[1 * 6 + 4] = std::nanf("");
  nan_case.start[2 * 6 + 1] = std::nanf("");
  cases.push_back(nan_case);
  Case nan_outside = filled("NaN outside the mask", 2, 6, 3, 2, 1.0f, 1);
  nan_outside.end[3] = std::nanf("");
  nan_outside.mask[3] = 0;
  cases.push_back(nan_outside);
  Case infinities = filled("+inf and -inf", 1, 6, 3, 5, 0.0f, 1);
  infinities.start[1] = kInf;
  infinities.end[2] = -kInf;
  infinities.end[3] = kInf;
  cases.push_back(infinities);
  std::mt19937 rng(20241127);
  {  // enough work for several threads (4M span evaluations), NaN rows in two chunks
    Case big = filled("threads", 64, 512, 128, 3, 0.0f, 1);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    for (float& x : big.start) x = normal(rng);
    for (float& x : big.end) x = normal(rng);
    cases.push_back(big);
    big.name = "threads, NaN rows 40 and 9";
    big.end[40 * 512 + 7] = std::nanf("");
    big.start[9 * 512 + 500] = std::nanf("");
    cases.push_back(big);
  }
  for (int i = 0; i < 400; ++i) cases.push_back(random_case(rng, "random " + std::to_string(i)));

  int64_t passed = 0, failed = 0;
  for (const Case& c : cases) (run_case(c) ? passed : failed) += 1;
  std::printf("span_search_check: %lld passed, %lld failed\n", static_cast<long long>(passed),
              static_cast<long long>(failed));
  return failed == 0 ? 0 : 1;
}
