// bf16 on AVX-512 BF16 (vdpbf16ps: pairs of bf16, fp32 sums): AMD Zen 4/5, Intel Cooper Lake and
// Sapphire Rapids. Compiled with the AVX-512 flags plus -mavx512bf16; added to the AVX-512 table
// only where the CPU reports AVX512_BF16:
//   - bf16 linear layers: register block 6 rows x 64 columns, weights in panels of 64 columns x 2
//     consecutive k per 32-bit lane;
//   - attention of the int8 and bf16 models, as on AMX: Q K^T and P V on bf16 operands with fp32
//     sums, an exact fp32 softmax (the same block kernel, with K and V packed as its weights).
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "microkernels.h"

namespace spanrt {
namespace encoder {
namespace avx512_bf16 {
namespace {

#include "rowops.inc"

constexpr int64_t kNb = 64;
constexpr int64_t kMr = 6;
constexpr int64_t kG = 2;

#include "avx512_math.inc"

size_t packed_bytes(int64_t n_pad, int64_t k_pad) { return sizeof(uint16_t) * static_cast<size_t>(n_pad * k_pad); }

void pack(const void* src, int64_t out, int64_t in, int64_t k_pad, int64_t, void* dst, int32_t*) {
  const float* w = static_cast<const float*>(src);
  uint16_t* d = static_cast<uint16_t*>(dst);
  for (int64_t n = 0; n < out; ++n)
    for (int64_t k = 0; k < in; ++k) d[(((n / kNb) * (k_pad / kG) + k / kG) * kNb + n % kNb) * kG + k % kG] = ro_to_bf16(w[n * in + k]);
}

// vdpbf16ps through inline asm (see isa_avx512.cpp: GCC copies the intrinsic's accumulator).
inline void dpbf16(__m512& acc, __m512i a, __m512i b) { __asm__("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b)); }

// 6 rows x 64 columns in 24 named accumulators (see isa_avx512.cpp); fewer rows repeat the last.
#define SPANRT_ROW(i)                      \
  {                                        \
    int32_t pair;                          \
    std::memcpy(&pair, a##i + o, 4);       \
    const __m512i av = _mm512_set1_epi32(pair); \
    dpbf16(c##i##0, av, b0);               \
    dpbf16(c##i##1, av, b1);               \
    dpbf16(c##i##2, av, b2);               \
    dpbf16(c##i##3, av, b3);               \
  }
#define SPANRT_ZERO4(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
#define SPANRT_SAVE(i)  \
  acc[i][0] = c##i##0;  \
  acc[i][1] = c##i##1;  \
  acc[i][2] = c##i##2;  \
  acc[i][3] = c##i##3;

void block(int64_t mr, const LinearView& L, const uint16_t* a, int64_t lda, const uint16_t* panel, int64_t n0, Epilogue ep, float* out,
           int64_t ldo) {
  const uint16_t* a0 = a;
  const uint16_t* a1 = a + ro_min(1, mr - 1) * lda;
  const uint16_t* a2 = a + ro_min(2, mr - 1) * lda;
  const uint16_t* a3 = a + ro_min(3, mr - 1) * lda;
  const uint16_t* a4 = a + ro_min(4, mr - 1) * lda;
  const uint16_t* a5 = a + ro_min(5, mr - 1) * lda;
  SPANRT_ZERO4(0) SPANRT_ZERO4(1) SPANRT_ZERO4(2) SPANRT_ZERO4(3) SPANRT_ZERO4(4) SPANRT_ZERO4(5)
  const int64_t groups = L.k_pad / kG;
  for (int64_t g = 0; g < groups; ++g) {
    const uint16_t* bp = panel + g * kNb * kG;
    const __m512i b0 = _mm512_load_si512(bp), b1 = _mm512_load_si512(bp + 32), b2 = _mm512_load_si512(bp + 64),
                  b3 = _mm512_load_si512(bp + 96);
    const int64_t o = g * kG;
    SPANRT_ROW(0) SPANRT_ROW(1) SPANRT_ROW(2) SPANRT_ROW(3) SPANRT_ROW(4) SPANRT_ROW(5)
  }
  __m512 acc[6][4];
  SPANRT_SAVE(0) SPANRT_SAVE(1) SPANRT_SAVE(2) SPANRT_SAVE(3) SPANRT_SAVE(4) SPANRT_SAVE(5)
  const int64_t ncols = ro_min(kNb, L.out - n0);
  for (int v = 0; v < 4; ++v) {
    if (16 * v >= ncols) break;
    const int64_t n = n0 + 16 * v;
    const __mmask16 mk = tail_mask(ncols - 16 * v);
    const __m512 bias = _mm512_loadu_ps(L.bias + n);
    for (int64_t i = 0; i < mr; ++i) {
      const __m512 y = _mm512_add_ps(acc[i][v], bias);
      if (ep == Epilogue::kBiasBf16) {
        _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(out) + i * ldo + n, mk, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(y)));
      } else {
        _mm512_mask_storeu_ps(out + i * ldo + n, mk, ep == Epilogue::kBias ? y : activate512(ep, y));  // in registers (isa_avx512.cpp)
      }
    }
  }
}
#undef SPANRT_ROW
#undef SPANRT_ZERO4
#undef SPANRT_SAVE

void gemm(const LinearView& L, const void* a, int64_t lda, const float*, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1, Epilogue ep,
          float* out, int64_t ldo) {
  const uint16_t* x = static_cast<const uint16_t*>(a);
  const uint16_t* w = static_cast<const uint16_t*>(L.w);
  ro_drive_gemm(L, m0, m1, nb0, nb1, kNb, kMr, [&](int64_t rows, int64_t m, int64_t nb, int64_t n0) {
    block(rows, L, x + m * lda, lda, w + nb * L.k_pad * kNb, n0, ep, ro_out_row(out, m, ldo, ep), ldo);
  });
}

// ---- attention: bf16 products, fp32 softmax -------------------------------------------------------
// Query rows in tiles of kQt: scores S = Q K^T by the block kernel above (K packed as its weights),
// an exact fp32 softmax whose last pass writes the bf16 probabilities, then P V by a kernel of
// kQt rows x 32 head dimensions (head_dim 32, MiniLM's, fills it; 64 takes two panels).
constexpr int64_t kQt = 12;  // two 6-row score blocks; P V: 12 rows x 2 zmm = 24 accumulators
constexpr int64_t kVw = 32;  // P V panel width (head dimensions)

struct AttnScratch {
  uint16_t* q;   // [L][dp] queries, when d is odd (else read in place)
  uint16_t* k;   // keys as block-kernel weights: [L64/64][dp/2][64][2]
  uint16_t* v;   // values: [d32/32][Lp/2][32][2] (pairs of consecutive keys per head dimension)
  float* s;      // [kQt][L64] scores of one query tile
  uint16_t* p;   // [kQt][Lp] probabilities, bf16
  float* zeros;  // [L64] the block kernel's bias
};

size_t attn_carve(void* base, int64_t L, int64_t d, AttnScratch* out) {
  const int64_t L64 = ro_round_up(L, 64), dp = ro_round_up(d, 2), Lp = ro_round_up(L, 2), d32 = ro_round_up(d, kVw);
  const size_t sizes[6] = {sizeof(uint16_t) * L * dp, sizeof(uint16_t) * L64 * dp, sizeof(uint16_t) * d32 * Lp, sizeof(float) * kQt * L64,
                           sizeof(uint16_t) * kQt * Lp, sizeof(float) * L64};
  char* p = static_cast<char*>(base);
  size_t used = 0;
  void* parts[6];
  for (int i = 0; i < 6; ++i) {
    parts[i] = p + used;
    used += (sizes[i] + 63) / 64 * 64;
  }
  if (out != nullptr) {
    out->q = static_cast<uint16_t*>(parts[0]);
    out->k = static_cast<uint16_t*>(parts[1]);
    out->v = static_cast<uint16_t*>(parts[2]);
    out->s = static_cast<float*>(parts[3]);
    out->p = static_cast<uint16_t*>(parts[4]);
    out->zeros = static_cast<float*>(parts[5]);
  }
  return used;
}

// Rows of one head are 3H values apart in the QKV matrix (2.3 KB for H = 384 in bf16), too far apart for the
// hardware prefetcher: the row kAhead rows on is fetched by hand (measured: the loads of these rows
// stalled ~7 % of a forward pass on Zen 5).
constexpr int64_t kAhead = 32;
inline void prefetch_row(const uint16_t* x, int64_t n) {
  for (int64_t j = 0; j < n; j += 32) _mm_prefetch(reinterpret_cast<const char*>(x + j), _MM_HINT_T0);
}

// The last pass of the softmax: p = bf16(e * inv), zero-padded to n_pad.
inline void scale_to_bf16(const float* e, int64_t n, float inv, uint16_t* o, int64_t n_pad) {
  const __m512 iv = _mm512_set1_ps(inv);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mk = tail_mask(n - j);
    const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, e + j), iv)));
    _mm256_mask_storeu_epi16(o + j, mk, h);
  }
  for (int64_t j = n; j < n_pad; ++j) o[j] = 0;
}

// e = exp((s - max) * scale) in place over n; returns 1 / sum e. Exact softmax up to fp32 rounding.
// (Leaving P unnormalised and scaling P V's sums instead was no faster here, and not the same bits.)
inline float exp_row(float* s, int64_t n, float scale) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail_mask(n - j), s + j));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m)), sc = _mm512_set1_ps(scale);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mk = tail_mask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(mk, exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + j), mx), sc)));
    _mm512_mask_storeu_ps(s + j, mk, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// P V for rows [0, mr) (mr <= 12) x one 32-column panel: 24 named accumulators.
#define SPANRT_PV_ROW(i)                                    \
  {                                                         \
    int32_t pair;                                           \
    std::memcpy(&pair, p##i + 2 * g, 4);                    \
    const __m512i av = _mm512_set1_epi32(pair);             \
    dpbf16(c##i##0, av, b0);                                \
    dpbf16(c##i##1, av, b1);                                \
  }
#define SPANRT_PV_ZERO(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0;
#define SPANRT_PV_SAVE(i) acc[i][0] = c##i##0, acc[i][1] = c##i##1;

void pv_block(int64_t mr, const uint16_t* p, int64_t ldp, const uint16_t* panel, int64_t pairs, int64_t ncols, float* out, int64_t ldo) {
  const uint16_t *p0 = p, *p1 = p + ro_min(1, mr - 1) * ldp, *p2 = p + ro_min(2, mr - 1) * ldp, *p3 = p + ro_min(3, mr - 1) * ldp,
                 *p4 = p + ro_min(4, mr - 1) * ldp, *p5 = p + ro_min(5, mr - 1) * ldp, *p6 = p + ro_min(6, mr - 1) * ldp,
                 *p7 = p + ro_min(7, mr - 1) * ldp, *p8 = p + ro_min(8, mr - 1) * ldp, *p9 = p + ro_min(9, mr - 1) * ldp,
                 *p10 = p + ro_min(10, mr - 1) * ldp, *p11 = p + ro_min(11, mr - 1) * ldp;
  SPANRT_PV_ZERO(0) SPANRT_PV_ZERO(1) SPANRT_PV_ZERO(2) SPANRT_PV_ZERO(3) SPANRT_PV_ZERO(4) SPANRT_PV_ZERO(5)
  SPANRT_PV_ZERO(6) SPANRT_PV_ZERO(7) SPANRT_PV_ZERO(8) SPANRT_PV_ZERO(9) SPANRT_PV_ZERO(10) SPANRT_PV_ZERO(11)
  for (int64_t g = 0; g < pairs; ++g) {
    const __m512i b0 = _mm512_load_si512(panel + g * 2 * kVw), b1 = _mm512_load_si512(panel + g * 2 * kVw + 32);
    SPANRT_PV_ROW(0) SPANRT_PV_ROW(1) SPANRT_PV_ROW(2) SPANRT_PV_ROW(3) SPANRT_PV_ROW(4) SPANRT_PV_ROW(5)
    SPANRT_PV_ROW(6) SPANRT_PV_ROW(7) SPANRT_PV_ROW(8) SPANRT_PV_ROW(9) SPANRT_PV_ROW(10) SPANRT_PV_ROW(11)
  }
  __m512 acc[12][2];
  SPANRT_PV_SAVE(0) SPANRT_PV_SAVE(1) SPANRT_PV_SAVE(2) SPANRT_PV_SAVE(3) SPANRT_PV_SAVE(4) SPANRT_PV_SAVE(5)
  SPANRT_PV_SAVE(6) SPANRT_PV_SAVE(7) SPANRT_PV_SAVE(8) SPANRT_PV_SAVE(9) SPANRT_PV_SAVE(10) SPANRT_PV_SAVE(11)
  const __mmask16 m0 = tail_mask(ncols), m1 = tail_mask(ncols > 16 ? ncols - 16 : 0);
  for (int64_t i = 0; i < mr; ++i) {
    _mm512_mask_storeu_ps(out + i * ldo, m0, acc[i][0]);
    if (ncols > 16) _mm512_mask_storeu_ps(out + i * ldo + 16, m1, acc[i][1]);
  }
}
#undef SPANRT_PV_ROW
#undef SPANRT_PV_ZERO
#undef SPANRT_PV_SAVE

void attention_bf16(const AttentionArgs& g) {
  const int64_t L = g.length, d = g.head_dim, H = g.hidden, ld = 3 * H;
  const int64_t L64 = ro_round_up(L, 64), dp = ro_round_up(d, 2), Lp = ro_round_up(L, 2), d32 = ro_round_up(d, kVw);
  AttnScratch a;
  attn_carve(g.scratch, L, d, &a);
  // the QKV matrix arrives in bf16 (the QKV GEMM wrote it: attention_bf16_input)
  const uint16_t* q = g.qkv_bf16 + g.row0 * ld + g.head * d;
  const uint16_t* kk = q + H;
  const uint16_t* vv = q + 2 * H;
  std::memset(a.k, 0, sizeof(uint16_t) * L64 * dp);
  std::memset(a.v, 0, sizeof(uint16_t) * d32 * Lp);
  std::memset(a.zeros, 0, sizeof(float) * L64);
  // queries: read in place (rows 3H apart) when d is even; an odd d is copied and zero-padded
  const uint16_t* qa = q;
  int64_t lq = ld;
  if (dp != d) {
    for (int64_t t = 0; t < L; ++t) {
      std::memcpy(a.q + t * dp, q + t * ld, sizeof(uint16_t) * d);
      a.q[t * dp + d] = 0;
    }
    qa = a.q;
    lq = dp;
  }
  // keys into the kernel's panels as 32-bit pairs of head dims (an odd d's last pair padded)
  for (int64_t t = 0; t < L; ++t) {
    if (t + kAhead < L) prefetch_row(kk + (t + kAhead) * ld, d);
    const uint16_t* kr = kk + t * ld;
    uint32_t* panel = reinterpret_cast<uint32_t*>(a.k + (t / 64) * 64 * dp) + t % 64;
    for (int64_t pr = 0; pr < d / 2; ++pr) {
      uint32_t pair;
      std::memcpy(&pair, kr + 2 * pr, 4);
      panel[pr * 64] = pair;
    }
    if (dp != d) panel[(d / 2) * 64] = kr[d - 1];
  }
  // values: lane c of a panel row holds (v[2r][c], v[2r+1][c]) as a bf16 pair
  for (int64_t r = 0; r < Lp / 2; ++r) {
    const uint16_t* v0 = vv + 2 * r * ld;
    const bool two = 2 * r + 1 < L;
    if (2 * r + kAhead + 1 < L) {
      prefetch_row(v0 + kAhead * ld, d);
      prefetch_row(v0 + (kAhead + 1) * ld, d);
    }
    for (int64_t c0 = 0; c0 < d; c0 += 16) {
      const __mmask16 mk = tail_mask(d - c0);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, v0 + c0));
      const __m512i hi = two ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, v0 + ld + c0)) : _mm512_setzero_si512();
      uint32_t* out = reinterpret_cast<uint32_t*>(a.v) + ((c0 / kVw) * (Lp / 2) + r) * kVw + c0 % kVw;
      _mm512_mask_storeu_epi32(out, mk, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
  LinearView scores{};
  scores.in = d;
  scores.out = L;
  scores.k_pad = dp;
  scores.n_pad = L64;
  scores.bias = a.zeros;
  const float scale = 1.0f / __builtin_sqrtf(static_cast<float>(d));
  for (int64_t q0 = 0; q0 < L; q0 += kQt) {
    const int64_t mt = ro_min(kQt, L - q0);
    for (int64_t r = 0; r < mt; r += kMr)
      for (int64_t kb = 0; kb < L64 / 64; ++kb)
        block(ro_min(kMr, mt - r), scores, qa + (q0 + r) * lq, lq, a.k + kb * 64 * dp, kb * 64, Epilogue::kBias, a.s + r * L64, L64);
    for (int64_t i = 0; i < mt; ++i) {
      float* si = a.s + i * L64;
      scale_to_bf16(si, L, exp_row(si, L, scale), a.p + i * Lp, Lp);
    }
    float* out = g.ctx + (g.row0 + q0) * H + g.head * d;
    for (int64_t c0 = 0; c0 < d; c0 += kVw) pv_block(mt, a.p, Lp, a.v + (c0 / kVw) * kVw * Lp, Lp / 2, ro_min(kVw, d - c0), out + c0, H);
  }
}

// The table's fp32 attention (from isa_avx512.cpp), kept for fp32 models.
size_t (*g_f32_scratch)(Precision, int64_t, int64_t) = nullptr;
void (*g_f32_attention)(Precision, const AttentionArgs&) = nullptr;

size_t attention_scratch_any(Precision p, int64_t max_len, int64_t d) {
  return p == Precision::kFp32 ? g_f32_scratch(p, max_len, d) : attn_carve(nullptr, max_len, d, nullptr) + 64;
}

void attention_any(Precision p, const AttentionArgs& g) {
  if (p == Precision::kFp32) return g_f32_attention(p, g);
  attention_bf16(g);
}

}  // namespace
}  // namespace avx512_bf16

void avx512_bf16_fill(IsaKernels& k) {
  avx512_bf16::g_f32_scratch = k.attention_scratch_bytes;
  avx512_bf16::g_f32_attention = k.attention;
  k.attention_scratch_bytes = avx512_bf16::attention_scratch_any;
  k.attention = avx512_bf16::attention_any;
  k.attention_desc[static_cast<int>(Precision::kInt8)] = "bf16 vdpbf16ps products, fp32 softmax";
  k.gemm[static_cast<int>(Precision::kBf16)] = avx512_bf16::ro_gemm_kernel(avx512_bf16::kG, avx512_bf16::kNb, 1, false, 2, avx512_bf16::packed_bytes, avx512_bf16::pack, avx512_bf16::ro_quantize_bf16, avx512_bf16::gemm);
  k.linear_desc[static_cast<int>(Precision::kBf16)] = "bf16, AVX-512 BF16 vdpbf16ps (fp32 sums)";
  k.attention_desc[static_cast<int>(Precision::kBf16)] = "bf16 vdpbf16ps products, fp32 softmax";
  k.attention_bf16_input[static_cast<int>(Precision::kInt8)] = true;  // the QKV GEMM writes bf16
  k.attention_bf16_input[static_cast<int>(Precision::kBf16)] = true;
}

}  // namespace encoder
}  // namespace spanrt
