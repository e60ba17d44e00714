// The C++ span search: one row at a time per thread; large batches are split over std::threads.
//
// Threads are started per call and joined (no spinning pool): a thread costs ~10-50 us, so one is
// added only per ~1M span evaluations (0.3-1 ms of work). A typical batch (64 windows
// of 384 tokens, L = 30) decodes in a few hundred microseconds on the calling thread alone, and
// never competes for cores with the model runtime. (An OpenMP version spun waiting threads and
// ran 50-800x slower on an oversubscribed machine.)
#include <algorithm>
#include <atomic>
#include <functional>
#include <thread>
#include <vector>

#include "spanrt/span_search.h"

namespace spanrt {
namespace {

// Per-thread buffers, sized once per call: nothing is allocated while spans are scanned.
struct RowScratch {
  std::vector<float> start;     // masked start logits of the row, float32
  std::vector<float> end;       // masked end logits of the row, float32
  std::vector<float> best_end;  // best_end[i]: max of end[i .. last_end(i)], to skip starts
  std::vector<float> prefix;    // sliding-maximum helpers (see sliding_best_end)
  std::vector<float> suffix;
  std::vector<float> bounds;    // best score of each start, for the top-k threshold
  std::vector<Span> heap;       // the k best spans so far; heap.front() is the worst of them
};

// Loads one row into `scratch`; returns true when a masked-in logit is NaN. The logit type is
// a template argument so the loop has no per-element branch on it.
template <LogitType kType>
bool load_row(const SpanSearchParams& p, int64_t row, RowScratch& scratch) {
  const int64_t offset = row * p.seq_len;
  const uint8_t* mask = p.mask + offset;
  float* start = scratch.start.data();
  float* end = scratch.end.data();
  bool saw_nan = false;
  for (int64_t i = 0; i < p.seq_len; ++i) {
    const float s = load_logit(p.start_logits, kType, offset + i);
    const float e = load_logit(p.end_logits, kType, offset + i);
    const bool in_mask = mask[i] != 0;
    saw_nan |= is_nan_in_mask(s, e, in_mask);
    start[i] = masked_logit(s, in_mask);
    end[i] = masked_logit(e, in_mask);
  }
  return saw_nan;
}

inline float max_ignoring_nan(float running, float x) { return x > running ? x : running; }

// Fills scratch.best_end with the maximum end logit over each start's window [i, last_end(i)]
// (van Herk / Gil-Werman: blocks of the window's width, a prefix and a suffix maximum in each,
// then one max per start; O(seq_len), no branches on the data). NaN is never the maximum.
void sliding_best_end(const SpanSearchParams& p, RowScratch& scratch) {
  const int64_t n = p.seq_len;
  const int64_t width = std::min(p.max_answer_len, n);
  const float* end = scratch.end.data();
  float* prefix = scratch.prefix.data();  // max of end[block start .. x]
  float* suffix = scratch.suffix.data();  // max of end[x .. min(block end, n - 1)]
  for (int64_t block = 0; block < n; block += width) {
    const int64_t block_last = std::min(block + width, n) - 1;
    float running = negative_infinity();
    for (int64_t x = block; x <= block_last; ++x) prefix[x] = running = max_ignoring_nan(running, end[x]);
    running = negative_infinity();
    for (int64_t x = block_last; x >= block; --x) suffix[x] = running = max_ignoring_nan(running, end[x]);
  }
  float* best_end = scratch.best_end.data();
  for (int64_t block = 0; block < n; block += width) {
    for (int64_t i = block; i < std::min(block + width, n); ++i) {
      const int64_t last = last_end(i, p.max_answer_len, n);
      // [i, last] ends in i's block (i is the block's first position, or the row ends there) or
      // in the next one, whose prefix maximum covers the rest.
      best_end[i] = last < block + width ? suffix[i] : max_ignoring_nan(suffix[i], prefix[last]);
    }
  }
}

// The best span of a row. Starts and ends are scanned in increasing order, so a candidate ranks
// before the best so far (span_before) exactly when its score is strictly higher; a score above
// best.score >= -inf is also a valid one.
Span best_span(const SpanSearchParams& p, const RowScratch& scratch) {
  const float* start = scratch.start.data();
  const float* end = scratch.end.data();
  const float* best_end = scratch.best_end.data();
  Span best = no_span();
  for (int64_t i = 0; i < p.seq_len; ++i) {
    const float s = start[i];
    // No end in the window can beat the best score (float addition is monotonic): skip.
    if (!(span_score(s, best_end[i]) > best.score)) continue;
    const int64_t last = last_end(i, p.max_answer_len, p.seq_len);
    for (int64_t j = i; j <= last; ++j) {
      const float score = span_score(s, end[j]);
      if (score > best.score) best = Span{score, static_cast<int32_t>(i), static_cast<int32_t>(j)};
    }
  }
  return best;
}

// The `capacity` best spans of a row, best first, in scratch.heap.
void top_spans(const SpanSearchParams& p, RowScratch& scratch, int64_t capacity) {
  const float* start = scratch.start.data();
  const float* end = scratch.end.data();
  const float* best_end = scratch.best_end.data();
  std::vector<Span>& heap = scratch.heap;
  heap.clear();
  // A span scoring below `threshold` cannot be among the k best. start[i] + best_end[i] is the
  // score of a real span (i, argmax), one per start, so the k-th largest of those valid scores
  // is a first threshold; then, once the heap is full, its worst entry's score.
  float threshold = negative_infinity();
  std::vector<float>& bounds = scratch.bounds;
  bounds.clear();
  for (int64_t i = 0; i < p.seq_len; ++i) {
    const float bound = span_score(start[i], best_end[i]);
    if (is_valid_score(bound)) bounds.push_back(bound);
  }
  if (static_cast<int64_t>(bounds.size()) >= capacity) {
    std::nth_element(bounds.begin(), bounds.begin() + (capacity - 1), bounds.end(), std::greater<float>());
    threshold = bounds[capacity - 1];
  }
  for (int64_t i = 0; i < p.seq_len; ++i) {
    const float s = start[i];
    const float bound = span_score(s, best_end[i]);
    if (!is_valid_score(bound) || bound < threshold) continue;
    const int64_t last = last_end(i, p.max_answer_len, p.seq_len);
    for (int64_t j = i; j <= last; ++j) {
      const Span candidate{span_score(s, end[j]), static_cast<int32_t>(i), static_cast<int32_t>(j)};
      if (!is_valid_score(candidate.score) || candidate.score < threshold) continue;
      if (static_cast<int64_t>(heap.size()) < capacity) {
        heap.push_back(candidate);
        std::push_heap(heap.begin(), heap.end(), span_before);
      } else if (span_before(candidate, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), span_before);
        heap.back() = candidate;
        std::push_heap(heap.begin(), heap.end(), span_before);
      } else {
        continue;
      }
      if (static_cast<int64_t>(heap.size()) == capacity) threshold = heap.front().score;
    }
  }
  std::sort_heap(heap.begin(), heap.end(), span_before);
}

// log-sum-exp of one row's logits over mask | {0}, in float32.
float row_lse(const SpanSearchParams& p, const void* logits, int64_t row) {
  const int64_t offset = row * p.seq_len;
  const uint8_t* mask = p.mask + offset;
  float maximum = negative_infinity();
  bool saw_nan = false;
  for (int64_t i = 0; i < p.seq_len; ++i) {
    if (!in_lse(i, mask[i] != 0)) continue;
    const float x = load_logit(logits, p.logit_type, offset + i);
    saw_nan |= static_cast<bool>(isnan(x));
    maximum = x > maximum ? x : maximum;
  }
  float sum = 0.0f;
  if (!saw_nan && maximum > negative_infinity() && !isinf(maximum)) {
    for (int64_t i = 0; i < p.seq_len; ++i) {
      if (in_lse(i, mask[i] != 0)) sum += lse_term(load_logit(logits, p.logit_type, offset + i), maximum);
    }
  }
  return lse_finish(maximum, sum, saw_nan);
}

// Decodes one row; returns true when it holds a NaN at a masked-in position.
bool search_row(const SpanSearchParams& p, int64_t row, RowScratch& scratch, int64_t capacity) {
  const bool saw_nan = p.logit_type == LogitType::kFloat16
                           ? load_row<LogitType::kFloat16>(p, row, scratch)
                           : load_row<LogitType::kFloat32>(p, row, scratch);
  sliding_best_end(p, scratch);
  if (p.top_k == 1) {
    write_span(p, row, 0, best_span(p, scratch));
  } else {
    top_spans(p, scratch, capacity);
    const int64_t found = static_cast<int64_t>(scratch.heap.size());
    for (int64_t r = 0; r < p.top_k; ++r) write_span(p, row, r, r < found ? scratch.heap[r] : no_span());
  }
  if (p.start_lse != nullptr) p.start_lse[row] = row_lse(p, p.start_logits, row);
  if (p.end_lse != nullptr) p.end_lse[row] = row_lse(p, p.end_logits, row);
  if (p.null_scores != nullptr) {
    const int64_t offset = row * p.seq_len;
    p.null_scores[row] = span_score(load_logit(p.start_logits, p.logit_type, offset),
                                    load_logit(p.end_logits, p.logit_type, offset));
  }
  return saw_nan;
}

}  // namespace

int64_t span_search_cpu(const SpanSearchParams& p) {
  const int64_t n = p.seq_len;
  const int64_t window = std::min(p.max_answer_len, n);
  // A row has at most n * window spans: the heap never needs more room than that.
  const int64_t capacity = std::min(p.top_k, n * window);
  std::atomic<int64_t> first_nan_row{-1};

  // Decodes rows [begin, end) and records the first row holding NaN.
  auto decode_rows = [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    scratch.start.resize(n);
    scratch.end.resize(n);
    scratch.best_end.resize(n);
    scratch.prefix.resize(n);
    scratch.suffix.resize(n);
    scratch.bounds.reserve(n);
    if (p.top_k > 1) scratch.heap.reserve(capacity);
    for (int64_t row = begin; row < end; ++row) {
      if (!search_row(p, row, scratch, capacity)) continue;
      int64_t seen = first_nan_row.load();
      while ((seen < 0 || row < seen) && !first_nan_row.compare_exchange_weak(seen, row)) {
      }
    }
  };

  constexpr int64_t kSpansPerThread = int64_t{1} << 20;
  const int64_t work = p.batch * n * window;
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t threads = std::max<int64_t>(1, std::min({cores, p.batch, work / kSpansPerThread}));
  if (threads == 1) {
    decode_rows(0, p.batch);
    return first_nan_row.load();
  }
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  const int64_t chunk = (p.batch + threads - 1) / threads;
  auto join_all = [&workers] {
    for (std::thread& worker : workers) worker.join();
  };
  try {
    for (int64_t t = 1; t < threads; ++t) {
      const int64_t begin = std::min(p.batch, t * chunk);
      workers.emplace_back(decode_rows, begin, std::min(p.batch, begin + chunk));
    }
  } catch (...) {  // a thread could not start: finish the started ones, then report
    join_all();
    throw;
  }
  decode_rows(0, std::min(p.batch, chunk));
  join_all();
  return first_nan_row.load();
}

}  // namespace spanrt
