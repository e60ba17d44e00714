// The native encoder's layer code, written once over the per-ISA micro-kernels (microkernels.h):
// weight packing, the thread team, embeddings, the layer loop, attention scheduling and the span
// head. Compiled with the baseline flags of the target; every ISA-specific instruction is behind
// the chosen IsaKernels table (see spanrt/encoder.h for what is computed).
#include "spanrt/encoder.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPANRT_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define SPANRT_PAUSE() __asm__ __volatile__("yield")
#else
#define SPANRT_PAUSE() ((void)0)
#endif

#include "cpu_features.h"
#include "microkernels.h"

namespace spanrt {
namespace {

using encoder::Epilogue;
using encoder::GemmKernel;
using encoder::IsaKernels;
using encoder::LinearView;
using encoder::Precision;
using encoder::kMaskedLogit;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 64-byte aligned, zero-initialised storage.
template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t count) { resize(count); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~Buffer() { std::free(p_); }
  void resize(size_t count) {
    std::free(p_);
    p_ = nullptr;
    n_ = 0;
    const size_t bytes = static_cast<size_t>(round_up(static_cast<int64_t>(std::max<size_t>(count, 1) * sizeof(T)), 64));
    p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (p_ == nullptr) throw std::bad_alloc();
    std::memset(static_cast<void*>(p_), 0, bytes);
    n_ = count;
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

template <class T>
T* ensure(Buffer<T>& b, int64_t count) {
  if (b.size() < static_cast<size_t>(count)) b.resize(static_cast<size_t>(count));
  return b.data();
}

// ---- threads -----------------------------------------------------------------------------------
// A fixed team of threads for one encoder (the caller is thread 0). Not OpenMP: GCC's libgomp
// hangs in a child process that uses a team its parent had started (fork after a call, e.g.
// gunicorn --preload or multiprocessing); this team is rebuilt when the process id changes.
class Team {
 public:
  explicit Team(int n) : n_(n) {
    for (int t = 1; t < n_; ++t) workers_.emplace_back([this, t] { work(t); });
  }
  Team(const Team&) = delete;
  Team& operator=(const Team&) = delete;
  ~Team() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_.store(true, std::memory_order_relaxed);
      epoch_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return n_; }

  // body(thread) on every thread of the team; returns when all have finished.
  void run(const std::function<void(int)>& body) {
    body_ = &body;
    done_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(m_);
      epoch_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    body(0);
    for (int spins = 0; done_.load(std::memory_order_acquire) != n_ - 1; ++spins) relax(spins);
    body_ = nullptr;
  }

  // Every thread of the team calls it; none returns before all have arrived.
  void barrier() {
    if (n_ == 1) return;
    const uint64_t gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    } else {
      for (int spins = 0; generation_.load(std::memory_order_acquire) == gen; ++spins) relax(spins);
    }
  }

  // Threads leave the parked state within ~a millisecond of spinning; longer waits yield the core.
  static void relax(int spins) {
    if (spins < 4096) SPANRT_PAUSE(); else std::this_thread::yield();
  }

  // Leave this team's threads alone: in a forked child they do not exist (not joined, not freed).
  static void abandon(std::unique_ptr<Team>& team) { (void)team.release(); }

 private:
  void work(int t) {
    uint64_t seen = 0;
    for (;;) {
      for (int spins = 0; epoch_.load(std::memory_order_acquire) == seen; ++spins) {
        if (spins < 20000) {
          SPANRT_PAUSE();
        } else {
          std::unique_lock<std::mutex> lock(m_);
          cv_.wait(lock, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = epoch_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_relaxed)) return;
      (*body_)(t);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> done_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int)>* body_ = nullptr;
  std::atomic<int> arrived_{0};
  std::atomic<uint64_t> generation_{0};
};

// One thread's view of the team inside Team::run: its share of a loop, and the barrier.
struct Par {
  int t;
  int n;
  Team* team;
  std::pair<int64_t, int64_t> range(int64_t count) const { return {count * t / n, count * (t + 1) / n}; }
  void barrier() const { team->barrier(); }
};

// ---- packed linear layers ---------------------------------------------------------------------
struct Linear {
  LinearView view{};
  Buffer<uint8_t> w;
  Buffer<int32_t> comp;
  Buffer<float> scale, bias;
};

// Packs W [out, in] and b [out] for the chosen kernel. int8: one symmetric scale per output
// channel (amax / 127), weights rounded half to even; the same on every path.
Linear pack_linear(const GemmKernel& g, Precision p, const float* w, const float* b, int64_t out, int64_t in) {
  Linear L;
  LinearView& v = L.view;
  v.in = in;
  v.out = out;
  v.k_pad = round_up(in, g.k_step);
  v.n_pad = round_up(out, g.n_block);
  L.bias.resize(v.n_pad);
  L.scale.resize(v.n_pad);
  for (int64_t n = 0; n < out; ++n) L.bias.data()[n] = b[n];
  for (int64_t n = 0; n < v.n_pad; ++n) L.scale.data()[n] = 1.0f;
  L.w.resize(g.packed_bytes(v.n_pad, v.k_pad));
  if (p == Precision::kInt8) {
    std::vector<int8_t> q(static_cast<size_t>(out * in));
    for (int64_t n = 0; n < out; ++n) {
      const float* row = w + n * in;
      float amax = 0.0f;
      for (int64_t k = 0; k < in; ++k) amax = std::max(amax, std::fabs(row[k]));
      const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
      L.scale.data()[n] = s;
      for (int64_t k = 0; k < in; ++k) q[n * in + k] = static_cast<int8_t>(std::clamp(std::nearbyint(row[k] / s), -127.0f, 127.0f));
    }
    if (g.act_u8) L.comp.resize(v.n_pad);
    g.pack(q.data(), out, in, v.k_pad, v.n_pad, L.w.data(), g.act_u8 ? L.comp.data() : nullptr);
  } else {
    g.pack(w, out, in, v.k_pad, v.n_pad, L.w.data(), nullptr);
  }
  v.w = L.w.data();
  v.comp = g.act_u8 ? L.comp.data() : nullptr;
  v.scale = L.scale.data();
  v.bias = L.bias.data();
  return L;
}

Precision to_precision(LinearPrecision p) {
  return p == LinearPrecision::kInt8 ? Precision::kInt8 : p == LinearPrecision::kBf16 ? Precision::kBf16 : Precision::kFp32;
}

const char* precision_name(LinearPrecision p) { return p == LinearPrecision::kInt8 ? "int8" : p == LinearPrecision::kBf16 ? "bf16" : "fp32"; }

const IsaKernels& choose_kernels(const std::string& name) {
  encoder::Isa isa;
  if (name.empty()) {
    isa = encoder::runnable_isas().front();
  } else {
    if (!encoder::parse_isa(name, &isa)) {
      std::string known;
      for (auto i : encoder::known_isas()) known += std::string(known.empty() ? "" : ", ") + encoder::isa_name(i);
      throw std::invalid_argument("native encoder: unknown instruction-set path '" + name + "' (this build knows: " + known + ")");
    }
    const std::string why = encoder::isa_unavailable_reason(isa);
    if (!why.empty()) throw std::runtime_error("native encoder: the " + name + " path cannot run here: " + why);
  }
  return encoder::kernels_for(isa);
}

const TensorView& need(const WeightMap& w, const std::string& name, std::vector<int64_t> shape) {
  auto it = w.find(name);
  if (it == w.end()) throw std::invalid_argument("native encoder: weight '" + name + "' is missing");
  if (it->second.shape != shape) {
    std::string got, want;
    for (auto s : it->second.shape) got += std::to_string(s) + ",";
    for (auto s : shape) want += std::to_string(s) + ",";
    throw std::invalid_argument("native encoder: weight '" + name + "' has shape (" + got + ") but the config says (" + want + ")");
  }
  if (it->second.data == nullptr) throw std::invalid_argument("native encoder: weight '" + name + "' has no data");
  return it->second;
}

std::vector<float> copy_of(const TensorView& t) {
  size_t n = 1;
  for (auto s : t.shape) n *= static_cast<size_t>(s);
  return std::vector<float>(t.data, t.data + n);
}

}  // namespace

// ---- the encoder ------------------------------------------------------------------------------
struct Encoder::Impl {
  EncoderConfig cfg;
  LinearPrecision precision = LinearPrecision::kInt8;
  Precision p = Precision::kInt8;
  const IsaKernels* k = nullptr;
  const GemmKernel* g = nullptr;
  int threads = 1;
  std::vector<float> word, position, token_type, emb_gamma, emb_beta;
  bool project = false;
  Linear emb_project;
  struct Layer {
    Linear qkv, attn_out, ffn_in, ffn_out;
    std::vector<float> attn_gamma, attn_beta, ffn_gamma, ffn_beta;
  };
  std::vector<Layer> layers;
  std::vector<float> qa_w, qa_b;
  // Buffers of the last call, grown when a call needs more (calls are serialised by the mutex).
  struct Workspace {
    Buffer<uint8_t> act;  // the GEMM inputs in the kernel's format (int8 / int16 / bf16)
    Buffer<float> act_scale;
    Buffer<float> hidden, emb, qkv, ctx, tmp, inter;
    Buffer<uint16_t> qkv_bf16;  // the QKV matrix where the path's attention reads bf16
    std::vector<Buffer<uint8_t>> scratch;  // attention, per thread
  };
  mutable Workspace ws;
  mutable std::unique_ptr<Team> team;  // started on the first call, in the calling process
  mutable pid_t team_pid = 0;

  Linear linear_of(const WeightMap& w, const std::string& name, int64_t out, int64_t in) const {
    const TensorView& weight = need(w, name + ".weight", {out, in});
    const TensorView& bias = need(w, name + ".bias", {out});
    return pack_linear(*g, p, weight.data, bias.data, out, in);
  }
};

Encoder::Encoder(const EncoderConfig& c, const WeightMap& w, LinearPrecision precision, int threads, const std::string& isa)
    : impl_(std::make_unique<Impl>()) {
  if (c.hidden <= 0 || c.layers <= 0 || c.heads <= 0 || c.intermediate <= 0 || c.vocab_size <= 0 || c.max_positions <= 0 ||
      c.embedding_size <= 0 || c.type_vocab_size < 0 || c.position_offset < 0 || c.hidden % c.heads != 0 || !(c.layer_norm_eps > 0.0f)) {
    throw std::invalid_argument("native encoder: invalid config (sizes must be positive and hidden a multiple of heads)");
  }
  if (threads < 1) throw std::invalid_argument("native encoder: threads must be >= 1");
  Impl& m = *impl_;
  m.k = &choose_kernels(isa);
  m.cfg = c;
  m.precision = precision;
  m.p = to_precision(precision);
  m.g = &m.k->gemm[static_cast<int>(m.p)];
  if (m.g->gemm == nullptr) {
    throw std::runtime_error(std::string("native encoder: the ") + m.k->name + " path does not compute " + precision_name(precision) +
                             (m.p == Precision::kBf16 ? " (no native bf16 arithmetic on this CPU: AVX-512 BF16 or AMX computes it)" : ""));
  }
  m.threads = threads;
  const int64_t E = c.embedding_size, H = c.hidden, I = c.intermediate;
  m.word = copy_of(need(w, "embeddings.word", {c.vocab_size, E}));
  m.position = copy_of(need(w, "embeddings.position", {c.max_positions, E}));
  if (c.type_vocab_size > 0) m.token_type = copy_of(need(w, "embeddings.token_type", {c.type_vocab_size, E}));
  m.emb_gamma = copy_of(need(w, "embeddings.norm.weight", {E}));
  m.emb_beta = copy_of(need(w, "embeddings.norm.bias", {E}));
  m.project = E != H;
  if (m.project) m.emb_project = m.linear_of(w, "embeddings.project", H, E);
  for (int64_t i = 0; i < c.layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    Impl::Layer layer;
    layer.qkv = m.linear_of(w, p + "qkv", 3 * H, H);
    layer.attn_out = m.linear_of(w, p + "attn_out", H, H);
    layer.ffn_in = m.linear_of(w, p + "ffn_in", I, H);
    layer.ffn_out = m.linear_of(w, p + "ffn_out", H, I);
    layer.attn_gamma = copy_of(need(w, p + "attn_norm.weight", {H}));
    layer.attn_beta = copy_of(need(w, p + "attn_norm.bias", {H}));
    layer.ffn_gamma = copy_of(need(w, p + "ffn_norm.weight", {H}));
    layer.ffn_beta = copy_of(need(w, p + "ffn_norm.bias", {H}));
    m.layers.push_back(std::move(layer));
  }
  m.qa_w = copy_of(need(w, "qa.weight", {2, H}));
  m.qa_b = copy_of(need(w, "qa.bias", {2}));
}

Encoder::~Encoder() {
  if (impl_->team && impl_->team_pid != getpid()) Team::abandon(impl_->team);  // a forked child: not its threads
}
const EncoderConfig& Encoder::config() const { return impl_->cfg; }
LinearPrecision Encoder::precision() const { return impl_->precision; }
int Encoder::threads() const { return impl_->threads; }
const char* Encoder::isa() const { return impl_->k->name; }
const char* Encoder::linear_layers() const { return impl_->k->linear_desc[static_cast<int>(impl_->p)]; }
const char* Encoder::attention() const { return impl_->k->attention_desc[static_cast<int>(impl_->p)]; }

void Encoder::forward(const int64_t* ids, const int64_t* mask, const int64_t* types, int64_t batch, int64_t seq, float* start,
                      float* end) const {
  const Impl& m = *impl_;
  const EncoderConfig& c = m.cfg;
  // Windows packed token after token: lengths from the masks (ones, then zeros).
  std::vector<int64_t> length(batch), offset(batch + 1, 0);
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t L = 0;
    while (L < seq && mask[b * seq + L] != 0) ++L;
    for (int64_t t = L; t < seq; ++t) {
      if (mask[b * seq + t] != 0) {
        throw std::invalid_argument("native encoder: attention_mask row " + std::to_string(b) +
                                    " is not ones followed by zeros (padding must be on the right)");
      }
    }
    if (L + c.position_offset > c.max_positions) {
      throw std::invalid_argument("native encoder: window " + std::to_string(b) + " has " + std::to_string(L) +
                                  " tokens, more than the model's " + std::to_string(c.max_positions - c.position_offset) + " positions");
    }
    for (int64_t t = 0; t < L; ++t) {
      const int64_t id = ids[b * seq + t];
      if (id < 0 || id >= c.vocab_size) {
        throw std::invalid_argument("native encoder: token id " + std::to_string(id) + " is outside the vocabulary (size " +
                                    std::to_string(c.vocab_size) + ")");
      }
      if (c.type_vocab_size > 0 && types != nullptr && (types[b * seq + t] < 0 || types[b * seq + t] >= c.type_vocab_size)) {
        throw std::invalid_argument("native encoder: token type " + std::to_string(types[b * seq + t]) + " is outside [0, " +
                                    std::to_string(c.type_vocab_size) + ")");
      }
    }
    length[b] = L;
    offset[b + 1] = offset[b] + L;
    longest = std::max(longest, L);
  }
  for (int64_t i = 0; i < batch * seq; ++i) start[i] = end[i] = kMaskedLogit;
  const int64_t M = offset[batch];
  if (M == 0) return;

  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t E = c.embedding_size, H = c.hidden, I = c.intermediate, d = H / c.heads;
  const IsaKernels& K = *m.k;
  const GemmKernel& G = *m.g;
  const Precision p = m.p;
  Impl::Workspace& w = m.ws;
  const bool fp32 = p == Precision::kFp32;  // no converted copy: the fp32 GEMM reads the activations
  uint8_t* act = nullptr;
  float* act_scale = nullptr;
  if (!fp32) {  // rows padded to the kernel's row step, columns to the widest GEMM input's K step
    const int64_t m_pad = round_up(M, G.m_step), k_max = round_up(std::max({E, H, I}), G.k_step);
    act = ensure(w.act, m_pad * k_max * static_cast<int64_t>(G.act_bytes));
    act_scale = ensure(w.act_scale, m_pad);
  }
  float* hidden = ensure(w.hidden, M * H);
  float* emb = m.project ? ensure(w.emb, M * E) : nullptr;
  const bool qkv_in_bf16 = K.attention_bf16_input[static_cast<int>(p)];
  float* qkv = qkv_in_bf16 ? nullptr : ensure(w.qkv, M * 3 * H);
  uint16_t* qkv_bf16 = qkv_in_bf16 ? ensure(w.qkv_bf16, M * 3 * H) : nullptr;
  float* ctx = ensure(w.ctx, M * H);
  float* tmp = ensure(w.tmp, M * H);
  float* inter = ensure(w.inter, M * I);
  std::vector<int64_t> row_window(M), row_pos(M);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < length[b]; ++t) {
      row_window[offset[b] + t] = b;
      row_pos[offset[b] + t] = t;
    }
  std::vector<std::pair<int64_t, int64_t>> heads;  // (window, head), longest windows first
  for (int64_t b = 0; b < batch; ++b)
    if (length[b] > 0)
      for (int64_t h = 0; h < c.heads; ++h) heads.emplace_back(b, h);
  std::stable_sort(heads.begin(), heads.end(), [&](auto& x, auto& y) { return length[x.first] > length[y.first]; });
  const int nthreads = m.threads;
  const size_t scratch_bytes = K.attention_scratch_bytes(p, longest, d);
  if (w.scratch.size() < static_cast<size_t>(nthreads)) w.scratch.resize(nthreads);
  for (int t = 0; t < nthreads; ++t) ensure(w.scratch[t], static_cast<int64_t>(scratch_bytes));
  const Linear& first = m.layers.front().qkv;  // the layer every LayerNorm output feeds (width H)
  if (m.team && m.team_pid != getpid()) Team::abandon(m.team);  // forked since the last call
  if (!m.team) {
    m.team = std::make_unique<Team>(nthreads);
    m.team_pid = getpid();
  }
  std::vector<std::atomic<int64_t>> next_head(m.layers.size());  // the attention loops' shared counters
  for (auto& a : next_head) a.store(0, std::memory_order_relaxed);

  m.team->run([&](int thread) {
    const Par par{thread, nthreads, m.team.get()};
    if (K.thread_begin != nullptr) K.thread_begin();
    // row r of x (width L.in) as the input of layer L
    auto convert_row = [&](const float* x, int64_t r, const Linear& L) {
      G.quantize_row(x + r * L.view.in, L.view.in, L.view.k_pad, act + r * L.view.k_pad * static_cast<int64_t>(G.act_bytes), act_scale + r);
    };
    auto convert = [&](const float* x, const Linear& L) {
      if (fp32) return;
      const auto [lo, hi] = par.range(M);
      for (int64_t r = lo; r < hi; ++r) convert_row(x, r, L);
      par.barrier();
    };
    // y = epilogue(x W^T + b) for all M rows: this thread's share of the column blocks
    auto linear = [&](const Linear& L, const float* x, Epilogue ep, float* out, int64_t ldo) {
      const auto [nb_lo, nb_hi] = par.range(L.view.n_pad / G.n_block);
      if (fp32) {
        G.gemm(L.view, x, L.view.in, nullptr, 0, M, nb_lo, nb_hi, ep, out, ldo);
      } else {
        G.gemm(L.view, act, L.view.k_pad, act_scale, 0, M, nb_lo, nb_hi, ep, out, ldo);
      }
      par.barrier();
    };
    // x[r] = LayerNorm(x[r] + add[r]); with `next`, each row is also converted for it while in cache
    auto add_layer_norm = [&](float* x, const float* add, int64_t n, const float* gamma, const float* beta, const Linear* next) {
      const auto [lo, hi] = par.range(M);
      for (int64_t r = lo; r < hi; ++r) {
        K.add_layer_norm(x + r * n, add != nullptr ? add + r * n : nullptr, n, gamma, beta, c.layer_norm_eps);
        if (next != nullptr && !fp32) convert_row(x, r, *next);
      }
      par.barrier();
    };
    float* x = m.project ? emb : hidden;
    // embeddings: word + position + token type, LayerNorm (over E)
    {
      const auto [lo, hi] = par.range(M);
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t b = row_window[r], t = row_pos[r];
        const float* wv = m.word.data() + ids[b * seq + t] * E;
        const float* pv = m.position.data() + (t + c.position_offset) * E;
        const float* tv = c.type_vocab_size > 0 ? m.token_type.data() + (types != nullptr ? types[b * seq + t] : 0) * E : nullptr;
        float* xr = x + r * E;
        for (int64_t j = 0; j < E; ++j) xr[j] = wv[j] + pv[j] + (tv ? tv[j] : 0.0f);
      }
    }  // each thread normalises the rows it wrote: no barrier needed before the LayerNorm
    if (m.project) {
      add_layer_norm(emb, nullptr, E, m.emb_gamma.data(), m.emb_beta.data(), &m.emb_project);
      linear(m.emb_project, emb, Epilogue::kBias, hidden, H);
      convert(hidden, first);
    } else {
      add_layer_norm(hidden, nullptr, E, m.emb_gamma.data(), m.emb_beta.data(), &first);
    }
    for (size_t li = 0; li < m.layers.size(); ++li) {
      const Impl::Layer& layer = m.layers[li];
      const bool last = li + 1 == m.layers.size();
      // hidden = LayerNorm output (and act its converted copy)
      if (qkv_in_bf16) {
        linear(layer.qkv, hidden, Epilogue::kBiasBf16, reinterpret_cast<float*>(qkv_bf16), 3 * H);  // bf16 rows (see Epilogue)
      } else {
        linear(layer.qkv, hidden, Epilogue::kBias, qkv, 3 * H);
      }
      for (int64_t hw; (hw = next_head[li].fetch_add(1, std::memory_order_relaxed)) < static_cast<int64_t>(heads.size());) {
        const int64_t b = heads[hw].first;
        const encoder::AttentionArgs args{qkv, H, offset[b], length[b], heads[hw].second, d, ctx, w.scratch[thread].data(), qkv_bf16};
        K.attention(p, args);
      }
      par.barrier();
      convert(ctx, layer.attn_out);
      linear(layer.attn_out, ctx, Epilogue::kBias, tmp, H);
      add_layer_norm(hidden, tmp, H, layer.attn_gamma.data(), layer.attn_beta.data(), &layer.ffn_in);
      linear(layer.ffn_in, hidden, c.gelu_tanh ? Epilogue::kBiasGeluTanh : Epilogue::kBiasGelu, inter, I);
      convert(inter, layer.ffn_out);
      linear(layer.ffn_out, inter, Epilogue::kBias, tmp, H);
      add_layer_norm(hidden, tmp, H, layer.ffn_gamma.data(), layer.ffn_beta.data(), last ? nullptr : &first);
    }
    // span head: start/end logits
    const auto [lo, hi] = par.range(M);
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = hidden + r * H;
      float s0 = 0.0f, s1 = 0.0f;
      for (int64_t j = 0; j < H; ++j) {
        s0 += xr[j] * m.qa_w[j];
        s1 += xr[j] * m.qa_w[H + j];
      }
      const int64_t at = row_window[r] * seq + row_pos[r];
      start[at] = s0 + m.qa_b[0];
      end[at] = s1 + m.qa_b[1];
    }
    if (K.thread_end != nullptr) K.thread_end();
  });
}

}  // namespace spanrt
