// The C++ span search: one row at a time per thread; large batches are split over std::threads.
//
// Threads are started per call and joined (no spinning pool): a thread costs ~10-50 us, so one is
// added only per ~1M span evaluations (0.3-1 ms of work). A typical batch (64 windows
// of 384 tokens, L = 30) decodes in a few hundred microseconds on the calling thread alone, and
// never competes for cores with the model runtime. (An OpenMP version spun waiting threads and
// ran 50-800x slower on an oversubscribed machine.)
#include <algorithm>
#include <atomic>
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
  std::vector<int32_t> window;  // monotonic queue of positions for best_end
  std::vector<Span> heap;       // the k best spans so far; heap.front() is the worst of them
};

// Loads one row into `scratch`; returns true when a masked-in logit is NaN.
bool load_row(const SpanSearchParams& p, int64_t row, RowScratch& scratch) {
  const int64_t offset = row * p.seq_len;
  const uint8_t* mask = p.mask + offset;
  bool saw_nan = false;
  for (int64_t i = 0; i < p.seq_len; ++i) {
    const float s = load_logit(p.start_logits, p.logit_type, offset + i);
    const float e = load_logit(p.end_logits, p.logit_type, offset + i);
    const bool in_mask = mask[i] != 0;
    saw_nan |= is_nan_in_mask(s, e, in_mask);
    scratch.start[i] = masked_logit(s, in_mask);
    scratch.end[i] = masked_logit(e, in_mask);
  }
  return saw_nan;
}

// Fills scratch.best_end with the sliding maximum of the end logits over each start's window
// (a monotonic queue, O(seq_len)). NaN never enters the queue: it cannot make a valid span.
void sliding_best_end(const SpanSearchParams& p, RowScratch& scratch) {
  const int64_t n = p.seq_len;
  int64_t head = 0, tail = 0;  // queue = window[head, tail), end logits decreasing
  int64_t pushed = 0;          // next position to push
  for (int64_t i = 0; i < n; ++i) {
    const int64_t last = last_end(i, p.max_answer_len, n);
    for (; pushed <= last; ++pushed) {
      const float value = scratch.end[pushed];
      if (isnan(value)) continue;
      while (tail > head && scratch.end[scratch.window[tail - 1]] <= value) --tail;
      scratch.window[tail++] = static_cast<int32_t>(pushed);
    }
    while (tail > head && scratch.window[head] < i) ++head;
    scratch.best_end[i] = tail > head ? scratch.end[scratch.window[head]] : negative_infinity();
  }
}

// The best span of a row. Starts and ends are scanned in increasing order, so a span ranks
// before the best so far exactly when its score is strictly higher (span_before's tie rule).
Span best_span(const SpanSearchParams& p, const RowScratch& scratch) {
  Span best = no_span();
  for (int64_t i = 0; i < p.seq_len; ++i) {
    const float s = scratch.start[i];
    // No end in the window can reach the best score (float addition is monotonic): skip.
    if (!(span_score(s, scratch.best_end[i]) > best.score)) continue;
    const int64_t last = last_end(i, p.max_answer_len, p.seq_len);
    for (int64_t j = i; j <= last; ++j) {
      const Span candidate{span_score(s, scratch.end[j]), static_cast<int32_t>(i),
                           static_cast<int32_t>(j)};
      if (is_valid_score(candidate.score) && span_before(candidate, best)) best = candidate;
    }
  }
  return best;
}

// The `capacity` best spans of a row, best first, in scratch.heap.
void top_spans(const SpanSearchParams& p, RowScratch& scratch, int64_t capacity) {
  std::vector<Span>& heap = scratch.heap;
  heap.clear();
  for (int64_t i = 0; i < p.seq_len; ++i) {
    const float s = scratch.start[i];
    if (!is_valid_score(span_score(s, scratch.best_end[i]))) continue;
    const bool full = static_cast<int64_t>(heap.size()) == capacity;
    if (full && span_score(s, scratch.best_end[i]) < heap.front().score) continue;
    const int64_t last = last_end(i, p.max_answer_len, p.seq_len);
    for (int64_t j = i; j <= last; ++j) {
      const Span candidate{span_score(s, scratch.end[j]), static_cast<int32_t>(i),
                           static_cast<int32_t>(j)};
      if (!is_valid_score(candidate.score)) continue;
      if (static_cast<int64_t>(heap.size()) < capacity) {
        heap.push_back(candidate);
        std::push_heap(heap.begin(), heap.end(), span_before);
      } else if (span_before(candidate, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), span_before);
        heap.back() = candidate;
        std::push_heap(heap.begin(), heap.end(), span_before);
      }
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
  const bool saw_nan = load_row(p, row, scratch);
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
    scratch.window.resize(n);
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
