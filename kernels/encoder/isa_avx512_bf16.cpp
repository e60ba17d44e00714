// bf16 linear layers on AVX-512 BF16 (vdpbf16ps: pairs of bf16, fp32 sums): AMD Zen 4/5, Intel
// Cooper Lake and Sapphire Rapids. Compiled with the AVX-512 flags plus -mavx512bf16; its entry is
// added to the AVX-512 table only where the CPU reports AVX512_BF16. Register block 6 rows x 64
// columns; weights in panels of 64 columns x 2 consecutive k per 32-bit lane.
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

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

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
    for (int64_t i = 0; i < mr; ++i) _mm512_mask_storeu_ps(out + i * ldo + n, mk, _mm512_add_ps(acc[i][v], bias));
  }
  if (ep == Epilogue::kBiasGelu)
    for (int64_t i = 0; i < mr; ++i) ro_gelu_inplace(out + i * ldo + n0, ncols);
}
#undef SPANRT_ROW
#undef SPANRT_ZERO4
#undef SPANRT_SAVE

void gemm(const LinearView& L, const void* a, int64_t lda, const float*, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1, Epilogue ep,
          float* out, int64_t ldo) {
  const uint16_t* x = static_cast<const uint16_t*>(a);
  const uint16_t* w = static_cast<const uint16_t*>(L.w);
  for (int64_t r0 = m0; r0 < m1; r0 += 96) {
    const int64_t r1 = ro_min(m1, r0 + 96);
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const int64_t n0 = nb * kNb;
      if (n0 >= L.out) break;
      const uint16_t* panel = w + nb * L.k_pad * kNb;
      for (int64_t m = r0; m < r1; m += kMr) {
        const uint16_t* am = x + m * lda;
        float* om = out + m * ldo;
        block(ro_min(kMr, r1 - m), L, am, lda, panel, n0, ep, om, ldo);
      }
    }
  }
}

}  // namespace
}  // namespace avx512_bf16

void avx512_bf16_fill(IsaKernels& k) {
  GemmKernel& g = k.gemm[static_cast<int>(Precision::kBf16)];
  g.k_step = avx512_bf16::kG;
  g.n_block = avx512_bf16::kNb;
  g.m_step = 1;
  g.act_u8 = false;
  g.act_bytes = 2;
  g.packed_bytes = avx512_bf16::packed_bytes;
  g.pack = avx512_bf16::pack;
  g.quantize_row = avx512_bf16::ro_quantize_bf16;
  g.gemm = avx512_bf16::gemm;
  k.linear_desc[static_cast<int>(Precision::kBf16)] = "bf16, AVX-512 BF16 vdpbf16ps (fp32 sums)";
  k.attention_desc[static_cast<int>(Precision::kBf16)] = "fp32, exact softmax";
}

}  // namespace encoder
}  // namespace spanrt
