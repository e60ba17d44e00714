// SpanRT's native CPU encoder with Intel AMX (see spanrt/encoder.h for what it computes).
// This file is compiled with -mavx512* -mamx-* and linked into its own module, engine._encoder,
// which Python imports only after engine._kernels.amx_status() has confirmed the CPU.
//
// Tiles: every kernel uses the same configuration, eight tiles of 16 rows x 64 bytes:
//   int8 GEMM: A 16 tokens x 64 int8, B 16 rows of 4 k x 16 columns (VNNI), C 16 x 16 int32;
//   bf16 GEMM: A 16 tokens x 32 bf16, B 16 rows of 2 k x 16 columns, C 16 x 16 fp32.
// A GEMM block is 32 x 32 outputs: C tiles 0-3, A tiles 4-5, B tiles 6-7.
#include "spanrt/encoder.h"

#include <immintrin.h>
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

namespace spanrt {
namespace {

constexpr float kMaskedLogit = -10000.0f;

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
    if (spins < 4096) _mm_pause(); else std::this_thread::yield();
  }

  // Leave this team's threads alone: in a forked child they do not exist (not joined, not freed).
  static void abandon(std::unique_ptr<Team>& team) { (void)team.release(); }

 private:
  void work(int t) {
    uint64_t seen = 0;
    for (;;) {
      for (int spins = 0; epoch_.load(std::memory_order_acquire) == seen; ++spins) {
        if (spins < 20000) {
          _mm_pause();
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

// ---- tiles ------------------------------------------------------------------------------------
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void configure_tiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// ---- the one tile kernel -------------------------------------------------------------------------
// C[32 x 32] = sum over `steps` of A[32 x 64 bytes] . B[64 bytes x 32], C tiles 0-3, A 4-5, B 6-7:
// A rows 0-15 at a, 16-31 at a + 16 lda; B columns 0-15 at b0, 16-31 at b1 (tile rows ldb apart);
// each step moves A by a_step and B by b_step bytes. C (int32 for int8, else fp32) is stored with
// row stride ldc bytes. Used by the GEMMs and by both products of attention.
template <bool Int8>
__attribute__((always_inline)) inline void tile_block_32x32(const void* a, int64_t lda, int64_t a_step, const void* b0, const void* b1, int64_t ldb, int64_t b_step,
                             int64_t steps, void* c, int64_t ldc) {
  const char* pa = static_cast<const char*>(a);
  const char* pb0 = static_cast<const char*>(b0);
  const char* pb1 = static_cast<const char*>(b1);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < steps; ++k) {
    _tile_loadd(4, pa + k * a_step, lda);
    _tile_loadd(5, pa + 16 * lda + k * a_step, lda);
    _tile_loadd(6, pb0 + k * b_step, ldb);
    _tile_loadd(7, pb1 + k * b_step, ldb);
    if constexpr (Int8) {
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    } else {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  char* pc = static_cast<char*>(c);
  _tile_stored(0, pc, ldc);
  _tile_stored(1, pc + 64, ldc);
  _tile_stored(2, pc + 16 * ldc, ldc);
  _tile_stored(3, pc + 16 * ldc + 64, ldc);
}

// ---- vector math ------------------------------------------------------------------------------
inline __m512 exp512(__m512 x) {
  // exp(x) = 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2; degree-6 Taylor, rel. error < 2e-7
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 gelu512(__m512 x) {
  // 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7)
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  const __m512 az = _mm512_abs_ps(z);
  // t = 1 / (1 + p |z|): rcp14 and one Newton step (rel. error ~1e-8; a vdivps costs ~16 cycles)
  const __m512 den = _mm512_fmadd_ps(az, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f));
  __m512 t = _mm512_rcp14_ps(den);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.0f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(az, az)));
  __m512 erf_abs = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.0f));
  // sign of z
  const __m512 erf = _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_castps_si512(erf_abs), _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(INT32_MIN))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), erf));
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1); }

inline uint16_t to_bf16(float f) {  // round to nearest even (inputs are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// n floats -> n bf16 (n any), vectorised
inline void row_to_bf16(const float* x, int64_t n, uint16_t* out) {
  int64_t j = 0;
  for (; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + j);
    const __m256i b = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
    _mm256_mask_storeu_epi16(out + j, m, b);
  }
}

float reduce_max_row(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail_mask(n - j), x + j));
  return _mm512_reduce_max_ps(m);
}

// ---- packed linear layers ---------------------------------------------------------------------
struct Linear {
  int64_t in = 0, out = 0;
  int64_t k_pad = 0;   // in, rounded to the K step (64 int8 / 32 bf16)
  int64_t n_pad = 0;   // out, rounded to 32
  Buffer<int8_t> w8;   // [n_pad/16][k_pad/64][16][64]
  Buffer<uint16_t> w16;  // [n_pad/16][k_pad/32][16][32]
  Buffer<float> w32;     // fp32: [n_pad/48][in][48] column panels
  Buffer<float> scale;   // [n_pad] per output channel (int8)
  Buffer<float> bias;    // [n_pad]
};

int64_t k_step(LinearPrecision p) { return p == LinearPrecision::kInt8 ? 64 : p == LinearPrecision::kBf16 ? 32 : 1; }
constexpr int64_t kPanel = 48;  // fp32 GEMM: columns per packed weight panel (3 zmm)

Linear pack_linear(const float* w, const float* b, int64_t out, int64_t in, LinearPrecision p) {
  Linear L;
  L.in = in;
  L.out = out;
  L.k_pad = round_up(in, k_step(p));
  L.n_pad = round_up(out, p == LinearPrecision::kFp32 ? kPanel : 32);
  L.bias.resize(L.n_pad);
  L.scale.resize(L.n_pad);
  for (int64_t n = 0; n < out; ++n) L.bias.data()[n] = b[n];
  if (p == LinearPrecision::kInt8) {
    const int64_t kb_count = L.k_pad / 64;
    L.w8.resize(static_cast<size_t>(L.n_pad * L.k_pad));
    for (int64_t n = 0; n < out; ++n) {
      const float* row = w + n * in;
      float amax = 0.0f;
      for (int64_t k = 0; k < in; ++k) amax = std::max(amax, std::fabs(row[k]));
      const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
      L.scale.data()[n] = s;
      const int64_t nb = n / 16, c = n % 16;
      for (int64_t k = 0; k < in; ++k) {
        const int64_t kb = k / 64, r = (k % 64) / 4, e = k % 4;
        const float q = std::nearbyint(row[k] / s);
        L.w8.data()[((nb * kb_count + kb) * 16 + r) * 64 + c * 4 + e] = static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f));
      }
    }
  } else if (p == LinearPrecision::kFp32) {
    L.w32.resize(static_cast<size_t>(L.n_pad * in));
    for (int64_t n = 0; n < out; ++n) {
      L.scale.data()[n] = 1.0f;
      for (int64_t k = 0; k < in; ++k) L.w32.data()[((n / kPanel) * in + k) * kPanel + n % kPanel] = w[n * in + k];
    }
  } else {
    const int64_t kb_count = L.k_pad / 32;
    L.w16.resize(static_cast<size_t>(L.n_pad * L.k_pad));
    for (int64_t n = 0; n < out; ++n) {
      L.scale.data()[n] = 1.0f;
      const int64_t nb = n / 16, c = n % 16;
      for (int64_t k = 0; k < in; ++k) {
        const int64_t kb = k / 32, r = (k % 32) / 2, e = k % 2;
        L.w16.data()[((nb * kb_count + kb) * 16 + r) * 32 + c * 2 + e] = to_bf16(w[n * in + k]);
      }
    }
  }
  return L;
}

// Activations of one GEMM's input: [m_pad, k_pad] int8 (+ a scale per row) or bf16.
// The row stride is the consuming layer's k_pad (GEMM inputs of different widths share the buffer).
struct Activations {
  Buffer<int8_t> a8;
  Buffer<uint16_t> a16;
  Buffer<float> scale;
};

// One row (n floats) into row r of the activations; columns n..k_pad are written as zeros, so
// the buffer needs no clearing between GEMMs of different widths.
void quantize_row(const float* xr, int64_t n, LinearPrecision p, Activations& act, int64_t r, int64_t k_pad) {
  if (p == LinearPrecision::kInt8) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(n - j), xr + j)));
    const float m = _mm512_reduce_max_ps(amax);
    const float s = m > 0.0f ? m / 127.0f : 1.0f;
    act.scale.data()[r] = s;
    const __m512 inv = _mm512_set1_ps(1.0f / s);
    int8_t* out = act.a8.data() + r * k_pad;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mk = tail_mask(n - j);
      const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xr + j), inv),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_mask_storeu_epi8(out + j, mk, _mm512_cvtsepi32_epi8(q));
    }
    if (k_pad > n) std::memset(out + n, 0, static_cast<size_t>(k_pad - n));
  } else {
    act.scale.data()[r] = 1.0f;
    uint16_t* out = act.a16.data() + r * k_pad;
    row_to_bf16(xr, n, out);
    if (k_pad > n) std::memset(out + n, 0, sizeof(uint16_t) * static_cast<size_t>(k_pad - n));
  }
}

// Rows of x [rows, L.in] as the input of layer L (this thread's share of the rows, then a barrier).
void quantize_rows(const Par& par, const float* x, int64_t rows, const Linear& L, LinearPrecision p, Activations& act) {
  const auto [lo, hi] = par.range(rows);
  for (int64_t r = lo; r < hi; ++r) quantize_row(x + r * L.in, L.in, p, act, r, L.k_pad);
  par.barrier();
}

enum class Epilogue { kBias, kBiasGelu };

// out[m, n] = epilogue(sum_k A[m, k] W[n, k] * scales + bias[n]) for m < rows, n < L.out.
// Called by every thread of the team: thread t owns a fixed slice of the 32-column
// blocks (its weights stay in its L2 cache) and walks the rows in chunks of 128 (the chunk's
// activations stay in cache while all of the thread's columns pass over them); a barrier ends it.
constexpr int64_t kRowChunk = 128;

void gemm(const Par& par, const Linear& L, const Activations& act, int64_t rows, LinearPrecision p, Epilogue ep, float* out,
          int64_t ldo) {
  const auto [nb_lo, nb_hi] = par.range(L.n_pad / 32);
  alignas(64) int32_t c[32 * 32];
  for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
    const int64_t r1 = std::min(rows, r0 + kRowChunk);
    for (int64_t nb = nb_lo; nb < nb_hi; ++nb) {
      for (int64_t m0 = r0; m0 < r1; m0 += 32) {
        const int64_t n0 = nb * 32;
        if (p == LinearPrecision::kInt8) {
          const int8_t* b0 = L.w8.data() + (2 * nb) * (L.k_pad / 64) * 1024;
          tile_block_32x32<true>(act.a8.data() + m0 * L.k_pad, L.k_pad, 64, b0, b0 + (L.k_pad / 64) * 1024, 64, 1024, L.k_pad / 64, c, 128);
        } else {
          const uint16_t* b0 = L.w16.data() + (2 * nb) * (L.k_pad / 32) * 512;
          tile_block_32x32<false>(act.a16.data() + m0 * L.k_pad, L.k_pad * 2, 64, b0, b0 + (L.k_pad / 32) * 512, 64, 1024, L.k_pad / 32, c,
                                  128);
        }
        const int64_t m_end = std::min<int64_t>(32, rows - m0);
        for (int64_t half = 0; half < 2; ++half) {
          const int64_t n = n0 + half * 16;
          if (n >= L.out) break;
          const __mmask16 mk = tail_mask(L.out - n);
          const __m512 ws = _mm512_loadu_ps(L.scale.data() + n);
          const __m512 bias = _mm512_loadu_ps(L.bias.data() + n);
          for (int64_t i = 0; i < m_end; ++i) {
            const __m512i raw = _mm512_load_si512(c + i * 32 + half * 16);
            __m512 v = p == LinearPrecision::kInt8 ? _mm512_cvtepi32_ps(raw) : _mm512_castsi512_ps(raw);
            v = _mm512_fmadd_ps(v, _mm512_mul_ps(ws, _mm512_set1_ps(act.scale.data()[m0 + i])), bias);
            if (ep == Epilogue::kBiasGelu) v = gelu512(v);
            _mm512_mask_storeu_ps(out + (m0 + i) * ldo + n, mk, v);
          }
        }
      }
    }
  }
  par.barrier();
}

// ---- fp32 GEMM (AVX-512 FMA, MR x 16*NV register block) --------------------------------------------
// out[i, n0 + c] = epilogue(sum_k a[i, k] b[k, c] + bias[n0 + c]) for i < MR, n0 + c < N.
template <int MR, int NV>
void f32_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, const float* bias, int64_t n0, int64_t N,
               Epilogue ep, float* out, int64_t ldo) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + k * ldb + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t n = n0 + 16 * v;
    if (n >= N) break;
    const __mmask16 mk = tail_mask(N - n);
    const __m512 bias_v = bias != nullptr ? _mm512_maskz_loadu_ps(mk, bias + n) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) {
      __m512 x = _mm512_add_ps(acc[i][v], bias_v);
      if (ep == Epilogue::kBiasGelu) x = gelu512(x);
      _mm512_mask_storeu_ps(out + i * ldo + 16 * v, mk, x);
    }
  }
}

// f32_block for a runtime row count mr in [1, 8].
template <int NV>
void f32_rows(int64_t mr, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, const float* bias, int64_t n0, int64_t N,
              Epilogue ep, float* out, int64_t ldo) {
  switch (mr) {
    case 8: f32_block<8, NV>(a, lda, b, ldb, K, bias, n0, N, ep, out, ldo); break;
    case 7: f32_block<7, NV>(a, lda, b, ldb, K, bias, n0, N, ep, out, ldo); break;
    case 6: f32_block<6, NV>(a, lda, b, ldb, K, bias, n0, N, ep, out, ldo); break;
    case 5: f32_block<5, NV>(a, lda, b, ldb, K, bias, n0, N, ep, out, ldo); break;
    case 4: f32_block<4, NV>(a, lda, b, ldb, K, bias, n0, N, ep, out, ldo); break;
    case 3: f32_block<3, NV>(a, lda, b, ldb, K, bias, n0, N, ep, out, ldo); break;
    case 2: f32_block<2, NV>(a, lda, b, ldb, K, bias, n0, N, ep, out, ldo); break;
    default: f32_block<1, NV>(a, lda, b, ldb, K, bias, n0, N, ep, out, ldo); break;
  }
}

// out = epilogue(x W^T + bias), x [rows, L.in] fp32: thread t owns a slice of the 48-column panels
// (its weights stay in its L2) and walks the rows in chunks of 64; a barrier ends it. (Measured on
// the 2-core test machine: 32-256-row chunks, K blocks for L1 and 14 x 32 register blocks change
// nothing beyond noise.)
constexpr int64_t kF32RowChunk = 64;

void gemm_f32(const Par& par, const Linear& L, const float* x, int64_t rows, Epilogue ep, float* out, int64_t ldo) {
  const auto [lo, hi] = par.range(L.n_pad / kPanel);
  for (int64_t r0 = 0; r0 < rows; r0 += kF32RowChunk) {
    const int64_t r1 = std::min(rows, r0 + kF32RowChunk);
    for (int64_t panel = lo; panel < hi; ++panel) {
      const float* b = L.w32.data() + panel * L.in * kPanel;
      for (int64_t m0 = r0; m0 < r1; m0 += 8) {
        f32_rows<3>(std::min<int64_t>(8, r1 - m0), x + m0 * L.in, L.in, b, kPanel, L.in, L.bias.data(), panel * kPanel, L.out, ep,
                    out + m0 * ldo + panel * kPanel, ldo);
      }
    }
  }
  par.barrier();
}

// x[r] = LayerNorm(x[r] + add[r]) * gamma + beta, rows in parallel (add may be null); with `act`,
// each row is also quantized for the next GEMM while it is in cache.
void add_layer_norm(const Par& par, float* x, const float* add, int64_t rows, int64_t n, const float* gamma, const float* beta,
                    float eps, LinearPrecision p, Activations* act, int64_t k_pad) {
  const auto [lo, hi] = par.range(rows);
  for (int64_t r = lo; r < hi; ++r) {
    float* xr = x + r * n;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mk = tail_mask(n - j);
      __m512 v = _mm512_maskz_loadu_ps(mk, xr + j);
      if (add != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, add + r * n + j));
      _mm512_mask_storeu_ps(xr + j, mk, v);
      sum = _mm512_add_ps(sum, v);
    }
    const float mean = _mm512_reduce_add_ps(sum) / static_cast<float>(n);
    const __m512 vm = _mm512_set1_ps(mean);
    __m512 sq = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mk = tail_mask(n - j);
      const __m512 d = _mm512_maskz_sub_ps(mk, _mm512_maskz_loadu_ps(mk, xr + j), vm);
      sq = _mm512_fmadd_ps(d, d, sq);
    }
    const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(sq) / static_cast<float>(n) + eps);
    const __m512 vi = _mm512_set1_ps(inv);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mk = tail_mask(n - j);
      const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, xr + j), vm), vi);
      _mm512_mask_storeu_ps(xr + j, mk, _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(mk, gamma + j), _mm512_maskz_loadu_ps(mk, beta + j)));
    }
    if (act != nullptr) quantize_row(xr, n, p, *act, r, k_pad);
  }
  par.barrier();
}

// ---- attention (BF16 tiles, fp32 softmax) -----------------------------------------------------
// One window and one head at a time, 32 queries x 32 keys per tile step (C tiles 0-3, A 4-5,
// B 6-7, as the GEMM). Probabilities are left unnormalised in bf16 (exp(s - max) <= 1) and each
// output row is divided by its fp32 sum at the end.
struct HeadScratch {
  Buffer<uint16_t> q;   // [L32][dq] queries, bf16
  Buffer<uint32_t> kt;  // [L32][dq/2] keys as bf16 pairs (before the transpose)
  Buffer<uint32_t> kp;  // [dq/2][L32] the B operand of Q K^T
  Buffer<uint32_t> vp;  // [L32/2][dv] the B operand of P V: pairs of keys
  Buffer<float> s;      // [32][L32] scores
  Buffer<uint16_t> pr;  // [32][L32] exp(score - max), bf16
  Buffer<float> o;      // [32][dv]
  // fp32 attention
  Buffer<float> k32;    // [L48/48][d][48] keys as column panels
  Buffer<float> v32;    // [L][dv32] values, columns padded to 32
  Buffer<float> s32;    // [8][L48] one block of score rows
};

void size_scratch(HeadScratch& h, int64_t max_len, int64_t d, LinearPrecision p) {
  const int64_t L32 = round_up(max_len, 32), dq = round_up(d, 32);
  if (p == LinearPrecision::kFp32) {
    const int64_t L48 = round_up(max_len, kPanel);
    if (h.s32.size() < static_cast<size_t>(8 * L48) || h.v32.size() < static_cast<size_t>(max_len * dq)) {
      h.k32.resize(L48 * d);
      h.v32.resize(max_len * dq);
      h.s32.resize(8 * L48);
    }
    return;
  }
  if (h.s.size() >= static_cast<size_t>(32 * L32) && h.o.size() >= static_cast<size_t>(32 * dq)) return;
  h.q.resize(L32 * dq);
  h.kt.resize(L32 * dq / 2);
  h.kp.resize(dq / 2 * L32);
  h.vp.resize(L32 / 2 * dq);
  h.s.resize(32 * L32);
  h.pr.resize(32 * L32);
  h.o.resize(32 * dq);
}

// One head's query, key and value columns of one window in the QKV GEMM's output [.., 3H]
// (Q | K | V, each H wide, heads d wide): pointers at the window's first token, row stride 3H.
struct HeadColumns {
  const float* q;
  const float* k;
  const float* v;
  int64_t ld;
};

HeadColumns head_columns(const float* qkv, int64_t H, int64_t row0, int64_t head, int64_t d) {
  const float* first = qkv + row0 * 3 * H + head * d;
  return {first, first + H, first + 2 * H, 3 * H};
}

// ctx[t, head*d : head*d + d] for the L tokens from row0 of qkv [.., 3H] (Q | K | V columns).
void attention_head(const float* qkv, int64_t H, int64_t row0, int64_t L, int64_t head, int64_t d, float* ctx, HeadScratch& hs) {
  const int64_t L32 = round_up(L, 32), dq = round_up(d, 32), dv = dq;
  const HeadColumns col = head_columns(qkv, H, row0, head, d);
  uint16_t* q = hs.q.data();
  uint32_t* kt = hs.kt.data();
  uint32_t* kp = hs.kp.data();
  uint32_t* vp = hs.vp.data();
  std::memset(q, 0, sizeof(uint16_t) * L32 * dq);
  std::memset(kt, 0, sizeof(uint32_t) * L32 * dq / 2);
  std::memset(vp, 0, sizeof(uint32_t) * L32 / 2 * dv);
  for (int64_t t = 0; t < L; ++t) {
    row_to_bf16(col.q + t * col.ld, d, q + t * dq);
    row_to_bf16(col.k + t * col.ld, d, reinterpret_cast<uint16_t*>(kt + t * (dq / 2)));
  }
  // kp[p][t] = kt[t][p] (rows: pairs of head dims, columns: keys)
  for (int64_t t = 0; t < L32; ++t)
    for (int64_t p = 0; p < dq / 2; ++p) kp[p * L32 + t] = kt[t * (dq / 2) + p];
  // vp[r][j] = (V[2r][j], V[2r+1][j])
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t r = 0; r < (L + 1) / 2; ++r) {
    const float* v0 = col.v + 2 * r * col.ld;
    const float* v1 = 2 * r + 1 < L ? col.v + (2 * r + 1) * col.ld : nullptr;
    for (int64_t j = 0; j < d; j += 16) {
      const __mmask16 mk = tail_mask(d - j);
      const __m256i a = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, v0 + j)));
      const __m256i b = v1 ? reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, v1 + j))) : _mm256_setzero_si256();
      const __m512i ab = _mm512_permutexvar_epi16(interleave, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
      _mm512_mask_storeu_epi32(vp + r * dv + j, mk, ab);
    }
  }
  const __m512 sc = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(d)));
  float* s = hs.s.data();
  uint16_t* pr = hs.pr.data();
  float* o = hs.o.data();
  float inv_sum[32];
  for (int64_t q0 = 0; q0 < L; q0 += 32) {
    for (int64_t k0 = 0; k0 < L32; k0 += 32) {
      tile_block_32x32<false>(q + q0 * dq, dq * 2, 64, kp + k0, kp + k0 + 16, L32 * 4, 16 * L32 * 4, dq / 32, s + k0, L32 * 4);
    }
    const int64_t rows = std::min<int64_t>(32, L - q0);
    for (int64_t i = 0; i < rows; ++i) {
      const float* si = s + i * L32;
      uint16_t* pi = pr + i * L32;
      const __m512 mx = _mm512_set1_ps(reduce_max_row(si, L));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < L32; j += 16) {
        const __mmask16 mk = j < L ? tail_mask(L - j) : static_cast<__mmask16>(0);
        const __m512 e = _mm512_maskz_mov_ps(mk, exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, si + j), mx), sc)));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pi + j), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
      }
      inv_sum[i] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    // rows past the window keep the previous block's (finite) probabilities: their outputs are not used
    for (int64_t j0 = 0; j0 < dv; j0 += 32) {
      tile_block_32x32<false>(pr, L32 * 2, 64, vp + j0, vp + j0 + 16, dv * 4, 16 * dv * 4, L32 / 32, o + j0, dv * 4);
    }
    for (int64_t i = 0; i < rows; ++i) {
      const __m512 inv = _mm512_set1_ps(inv_sum[i]);
      float* out = ctx + (row0 + q0 + i) * H + head * d;
      for (int64_t j = 0; j < d; j += 16) {
        const __mmask16 mk = tail_mask(d - j);
        _mm512_mask_storeu_ps(out + j, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, o + i * dv + j), inv));
      }
    }
  }
}


// The same attention in fp32 (AVX-512 FMA): 8 query rows at a time, an exact softmax.
void attention_head_f32(const float* qkv, int64_t H, int64_t row0, int64_t L, int64_t head, int64_t d, float* ctx, HeadScratch& hs) {
  const int64_t L48 = round_up(L, kPanel), dv = round_up(d, 32);
  const HeadColumns col = head_columns(qkv, H, row0, head, d);
  float* k32 = hs.k32.data();
  float* v32 = hs.v32.data();
  float* s = hs.s32.data();
  std::memset(k32, 0, sizeof(float) * L48 * d);
  for (int64_t t = 0; t < L; ++t) {
    const float* kr = col.k + t * col.ld;
    float* panel = k32 + (t / kPanel) * d * kPanel + t % kPanel;
    for (int64_t k = 0; k < d; ++k) panel[k * kPanel] = kr[k];
    std::memcpy(v32 + t * dv, col.v + t * col.ld, sizeof(float) * d);
    if (dv > d) std::memset(v32 + t * dv + d, 0, sizeof(float) * (dv - d));
  }
  const __m512 sc = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(d)));
  for (int64_t q0 = 0; q0 < L; q0 += 8) {
    const int64_t mr = std::min<int64_t>(8, L - q0);
    for (int64_t panel = 0; panel < L48 / kPanel; ++panel) {
      f32_rows<3>(mr, col.q + q0 * col.ld, col.ld, k32 + panel * d * kPanel, kPanel, d, nullptr, panel * kPanel, L, Epilogue::kBias,
                  s + panel * kPanel, L48);
    }
    for (int64_t i = 0; i < mr; ++i) {
      float* si = s + i * L48;
      const __m512 mx = _mm512_set1_ps(reduce_max_row(si, L));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < L; j += 16) {
        const __mmask16 mk = tail_mask(L - j);
        const __m512 e = _mm512_maskz_mov_ps(mk, exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, si + j), mx), sc)));
        _mm512_mask_storeu_ps(si + j, mk, e);
        sum = _mm512_add_ps(sum, e);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
      for (int64_t j = 0; j < L; j += 16) {
        const __mmask16 mk = tail_mask(L - j);
        _mm512_mask_storeu_ps(si + j, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, si + j), inv));
      }
    }
    for (int64_t j0 = 0; j0 < dv; j0 += 32) {
      f32_rows<2>(mr, s, L48, v32 + j0, dv, L, nullptr, j0, d, Epilogue::kBias, ctx + (row0 + q0) * H + head * d + j0, H);
    }
  }
}
}  // namespace

// ---- the encoder ------------------------------------------------------------------------------
struct Encoder::Impl {
  EncoderConfig cfg;
  LinearPrecision precision = LinearPrecision::kInt8;
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
    Activations act;
    Buffer<float> hidden, emb, qkv, ctx, tmp, inter;
    std::vector<HeadScratch> heads;
  };
  mutable Workspace ws;
  mutable std::unique_ptr<Team> team;  // started on the first call, in the calling process
  mutable pid_t team_pid = 0;
};

namespace {
template <class T>
T* ensure(Buffer<T>& b, int64_t count) {
  if (b.size() < static_cast<size_t>(count)) b.resize(static_cast<size_t>(count));
  return b.data();
}
}  // namespace

namespace {

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

Linear linear_of(const WeightMap& w, const std::string& name, int64_t out, int64_t in, LinearPrecision p) {
  const TensorView& weight = need(w, name + ".weight", {out, in});
  const TensorView& bias = need(w, name + ".bias", {out});
  return pack_linear(weight.data, bias.data, out, in, p);
}

}  // namespace

Encoder::Encoder(const EncoderConfig& c, const WeightMap& w, LinearPrecision precision, int threads)
    : impl_(std::make_unique<Impl>()) {
  if (c.hidden <= 0 || c.layers <= 0 || c.heads <= 0 || c.intermediate <= 0 || c.vocab_size <= 0 || c.max_positions <= 0 ||
      c.embedding_size <= 0 || c.type_vocab_size < 0 || c.position_offset < 0 || c.hidden % c.heads != 0 || !(c.layer_norm_eps > 0.0f)) {
    throw std::invalid_argument("native encoder: invalid config (sizes must be positive and hidden a multiple of heads)");
  }
  if (threads < 1) throw std::invalid_argument("native encoder: threads must be >= 1");
  Impl& m = *impl_;
  m.cfg = c;
  m.precision = precision;
  m.threads = threads;
  const int64_t E = c.embedding_size, H = c.hidden, I = c.intermediate;
  m.word = copy_of(need(w, "embeddings.word", {c.vocab_size, E}));
  m.position = copy_of(need(w, "embeddings.position", {c.max_positions, E}));
  if (c.type_vocab_size > 0) m.token_type = copy_of(need(w, "embeddings.token_type", {c.type_vocab_size, E}));
  m.emb_gamma = copy_of(need(w, "embeddings.norm.weight", {E}));
  m.emb_beta = copy_of(need(w, "embeddings.norm.bias", {E}));
  m.project = E != H;
  if (m.project) m.emb_project = linear_of(w, "embeddings.project", H, E, precision);
  for (int64_t i = 0; i < c.layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    Impl::Layer layer;
    layer.qkv = linear_of(w, p + "qkv", 3 * H, H, precision);
    layer.attn_out = linear_of(w, p + "attn_out", H, H, precision);
    layer.ffn_in = linear_of(w, p + "ffn_in", I, H, precision);
    layer.ffn_out = linear_of(w, p + "ffn_out", H, I, precision);
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
  const LinearPrecision p = m.precision;
  Impl::Workspace& w = m.ws;
  Activations& act = w.act;
  const bool fp32 = p == LinearPrecision::kFp32;  // no quantized copy: the fp32 GEMM reads the activations
  if (!fp32) {  // rows padded to the 32-row tile blocks, columns to the widest GEMM input's K step
    const int64_t m_pad = round_up(M, 32), k_max = round_up(std::max({E, H, I}), k_step(p));
    if (p == LinearPrecision::kInt8) ensure(act.a8, m_pad * k_max); else ensure(act.a16, m_pad * k_max);
    ensure(act.scale, m_pad);
  }
  float* hidden = ensure(w.hidden, M * H);
  float* emb = m.project ? ensure(w.emb, M * E) : nullptr;
  float* qkv = ensure(w.qkv, M * 3 * H);
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
  if (w.heads.size() < static_cast<size_t>(nthreads)) w.heads.resize(nthreads);
  for (auto& s : w.heads) size_scratch(s, longest, d, p);
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
    Activations* q = fp32 ? nullptr : &act;  // where LayerNorm also writes the next GEMM's input
    // y = epilogue(x W^T + b) for all M rows (x: the fp32 rows; int8/bf16 read act, already filled from x)
    auto linear = [&](const Linear& L, const float* x, Epilogue ep, float* out, int64_t ldo) {
      if (fp32) gemm_f32(par, L, x, M, ep, out, ldo); else gemm(par, L, act, M, p, ep, out, ldo);
    };
    auto quantize = [&](const float* x, const Linear& L) {
      if (!fp32) quantize_rows(par, x, M, L, p, act);
    };
    configure_tiles();
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
      add_layer_norm(par, emb, nullptr, M, E, m.emb_gamma.data(), m.emb_beta.data(), c.layer_norm_eps, p, q, m.emb_project.k_pad);
      linear(m.emb_project, emb, Epilogue::kBias, hidden, H);
      quantize(hidden, first);
    } else {
      add_layer_norm(par, hidden, nullptr, M, E, m.emb_gamma.data(), m.emb_beta.data(), c.layer_norm_eps, p, q, first.k_pad);
    }
    for (size_t li = 0; li < m.layers.size(); ++li) {
      const Impl::Layer& layer = m.layers[li];
      const bool last = li + 1 == m.layers.size();
      // hidden = LayerNorm output (and act its quantized copy)
      linear(layer.qkv, hidden, Epilogue::kBias, qkv, 3 * H);
      for (int64_t hw; (hw = next_head[li].fetch_add(1, std::memory_order_relaxed)) < static_cast<int64_t>(heads.size());) {
        const int64_t b = heads[hw].first;
        if (fp32) {
          attention_head_f32(qkv, H, offset[b], length[b], heads[hw].second, d, ctx, w.heads[thread]);
        } else {
          attention_head(qkv, H, offset[b], length[b], heads[hw].second, d, ctx, w.heads[thread]);
        }
      }
      par.barrier();
      quantize(ctx, layer.attn_out);
      linear(layer.attn_out, ctx, Epilogue::kBias, tmp, H);
      add_layer_norm(par, hidden, tmp, M, H, layer.attn_gamma.data(), layer.attn_beta.data(), c.layer_norm_eps, p, q, layer.ffn_in.k_pad);
      linear(layer.ffn_in, hidden, Epilogue::kBiasGelu, inter, I);
      quantize(inter, layer.ffn_out);
      linear(layer.ffn_out, inter, Epilogue::kBias, tmp, H);
      add_layer_norm(par, hidden, tmp, M, H, layer.ffn_gamma.data(), layer.ffn_beta.data(), c.layer_norm_eps, p, last ? nullptr : q,
                     first.k_pad);
    }
    // span head: start/end logits
    const auto [lo, hi] = par.range(M);
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = hidden + r * H;
      __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
      for (int64_t j = 0; j < H; j += 16) {
        const __mmask16 mk = tail_mask(H - j);
        const __m512 v = _mm512_maskz_loadu_ps(mk, xr + j);
        s0 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(mk, m.qa_w.data() + j), s0);
        s1 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(mk, m.qa_w.data() + H + j), s1);
      }
      const int64_t at = row_window[r] * seq + row_pos[r];
      start[at] = _mm512_reduce_add_ps(s0) + m.qa_b[0];
      end[at] = _mm512_reduce_add_ps(s1) + m.qa_b[1];
    }
    _tile_release();
  });
}

}  // namespace spanrt
