// The native encoder on AVX2 + FMA (Intel Haswell and newer, AMD Zen 1 and newer). Compiled with
// -mavx2 -mfma -mf16c. On CPUs with AVX-VNNI (Alder Lake and later client chips, Zen 5) the int8
// GEMM comes from isa_avxvnni.cpp instead.
//
// int8 without VNNI: vpmaddubsw would saturate (255 * 127 * 2 > 32767), the trap behind wrong
// BERT answers on AVX2 CPUs in other runtimes. Here both operands are int16 instead (activations
// quantized straight to int16, weights widened at packing) and vpmaddwd adds pairs of int16
// products into int32: |q| <= 127, so a pair is at most 2 * 127 * 127 = 32258 and the sums are
// exact. Register block 4 rows x 16 columns (8 ymm accumulators).
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "microkernels.h"

namespace spanrt {
namespace encoder {
namespace avx2 {
namespace {

#include "rowops.inc"

#include "avx2_math.inc"

// ---- fp32: 6 rows x 16 columns -----------------------------------------------------------------
constexpr int64_t kF32Nb = 16;
constexpr int64_t kF32Mr = 6;

// 6 rows x 16 columns in 12 named accumulators (GCC spilled an accumulator array on every k step);
// fewer rows repeat the last one (computed, not stored).
#define SPANRT_ROW(i)                                   \
  {                                                     \
    const __m256 av = _mm256_broadcast_ss(a##i + k);    \
    c##i##0 = _mm256_fmadd_ps(av, b0, c##i##0);         \
    c##i##1 = _mm256_fmadd_ps(av, b1, c##i##1);         \
  }
#define SPANRT_ZERO2(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = c##i##0;
#define SPANRT_SAVE(i)  \
  acc[i][0] = c##i##0;  \
  acc[i][1] = c##i##1;

void f32_block(int64_t mr, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, const float* bias, int64_t ncols, float* out,
               int64_t ldo) {
  const float* a0 = a;
  const float* a1 = a + ro_min(1, mr - 1) * lda;
  const float* a2 = a + ro_min(2, mr - 1) * lda;
  const float* a3 = a + ro_min(3, mr - 1) * lda;
  const float* a4 = a + ro_min(4, mr - 1) * lda;
  const float* a5 = a + ro_min(5, mr - 1) * lda;
  SPANRT_ZERO2(0) SPANRT_ZERO2(1) SPANRT_ZERO2(2) SPANRT_ZERO2(3) SPANRT_ZERO2(4) SPANRT_ZERO2(5)
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
    SPANRT_ROW(0) SPANRT_ROW(1) SPANRT_ROW(2) SPANRT_ROW(3) SPANRT_ROW(4) SPANRT_ROW(5)
  }
  __m256 acc[6][2];
  SPANRT_SAVE(0) SPANRT_SAVE(1) SPANRT_SAVE(2) SPANRT_SAVE(3) SPANRT_SAVE(4) SPANRT_SAVE(5)
  for (int v = 0; v < 2; ++v) {
    if (8 * v >= ncols) break;
    const __m256i mk = tail_mask8(ncols - 8 * v);
    const __m256 bv = bias != nullptr ? _mm256_maskload_ps(bias + 8 * v, mk) : _mm256_setzero_ps();
    for (int64_t i = 0; i < mr; ++i) _mm256_maskstore_ps(out + i * ldo + 8 * v, mk, _mm256_add_ps(acc[i][v], bv));
  }
}
#undef SPANRT_ROW
#undef SPANRT_ZERO2
#undef SPANRT_SAVE

#include "f32ops.inc"

// ---- int8 as int16 pairs: 6 rows x 16 columns, vpmaddwd ------------------------------------------
constexpr int64_t kI8Nb = 16;
constexpr int64_t kI8Mr = 4;
constexpr int64_t kI8G = 2;

size_t i8_packed_bytes(int64_t n_pad, int64_t k_pad) { return sizeof(int16_t) * static_cast<size_t>(n_pad * k_pad); }

void i8_pack(const void* src, int64_t out, int64_t in, int64_t k_pad, int64_t, void* dst, int32_t*) {
  const int8_t* q = static_cast<const int8_t*>(src);
  int16_t* d = static_cast<int16_t*>(dst);
  for (int64_t n = 0; n < out; ++n)
    for (int64_t k = 0; k < in; ++k) d[(((n / kI8Nb) * (k_pad / kI8G) + k / kI8G) * kI8Nb + n % kI8Nb) * kI8G + k % kI8G] = q[n * in + k];
}

// 4 rows x 16 columns in 8 named accumulators (an accumulator array is spilled by GCC; 16 ymm
// registers hold 8 sums, 2 weight vectors, the broadcast and the products); fewer rows repeat the
// last one (computed, not stored).
#define SPANRT_ROW(i)                                                   \
  {                                                                     \
    int32_t pair;                                                       \
    std::memcpy(&pair, a##i + o, 4);                                    \
    const __m256i av = _mm256_set1_epi32(pair);                         \
    c##i##0 = _mm256_add_epi32(c##i##0, _mm256_madd_epi16(av, b0));     \
    c##i##1 = _mm256_add_epi32(c##i##1, _mm256_madd_epi16(av, b1));     \
  }
#define SPANRT_ZERO2(i) __m256i c##i##0 = _mm256_setzero_si256(), c##i##1 = c##i##0;
#define SPANRT_SAVE(i)  \
  acc[i][0] = c##i##0;  \
  acc[i][1] = c##i##1;

void i8_block(int64_t mr, const LinearView& L, const int16_t* a, int64_t lda, const float* a_scale, const int16_t* panel, int64_t n0,
              Epilogue ep, float* out, int64_t ldo) {
  const int16_t* a0 = a;
  const int16_t* a1 = a + ro_min(1, mr - 1) * lda;
  const int16_t* a2 = a + ro_min(2, mr - 1) * lda;
  const int16_t* a3 = a + ro_min(3, mr - 1) * lda;
  SPANRT_ZERO2(0) SPANRT_ZERO2(1) SPANRT_ZERO2(2) SPANRT_ZERO2(3)
  const int64_t groups = L.k_pad / kI8G;
  for (int64_t g = 0; g < groups; ++g) {
    const int16_t* bp = panel + g * kI8Nb * kI8G;
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bp)),
                  b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bp + 16));
    const int64_t o = g * kI8G;
    SPANRT_ROW(0) SPANRT_ROW(1) SPANRT_ROW(2) SPANRT_ROW(3)
  }
  __m256i acc[4][2];
  SPANRT_SAVE(0) SPANRT_SAVE(1) SPANRT_SAVE(2) SPANRT_SAVE(3)
  const int64_t ncols = ro_min(kI8Nb, L.out - n0);
  for (int v = 0; v < 2; ++v) {
    if (8 * v >= ncols) break;
    const int64_t n = n0 + 8 * v;
    const __m256i mk = tail_mask8(ncols - 8 * v);
    const __m256 ws = _mm256_loadu_ps(L.scale + n);
    const __m256 bias = _mm256_loadu_ps(L.bias + n);
    for (int64_t i = 0; i < mr; ++i) {
      const __m256 x = _mm256_cvtepi32_ps(acc[i][v]);
      const __m256 y = _mm256_fmadd_ps(x, _mm256_mul_ps(ws, _mm256_set1_ps(a_scale[i])), bias);
      _mm256_maskstore_ps(out + i * ldo + n, mk, ep == Epilogue::kBias ? y : activate256(ep, y));  // in registers (isa_avx512.cpp)
    }
  }
}
#undef SPANRT_ROW
#undef SPANRT_ZERO2
#undef SPANRT_SAVE

void i8_gemm(const LinearView& L, const void* a, int64_t lda, const float* a_scale, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1,
             Epilogue ep, float* out, int64_t ldo) {
  const int16_t* x = static_cast<const int16_t*>(a);
  const int16_t* w = static_cast<const int16_t*>(L.w);
  ro_drive_gemm(L, m0, m1, nb0, nb1, kI8Nb, kI8Mr, [&](int64_t rows, int64_t m, int64_t nb, int64_t n0) {
    i8_block(rows, L, x + m * lda, lda, a_scale + m, w + nb * L.k_pad * kI8Nb, n0, ep, out + m * ldo, ldo);
  });
}

}  // namespace
}  // namespace avx2

void avxvnni_fill(IsaKernels& k);  // isa_avxvnni.cpp

const IsaKernels& avx2_kernels(bool vnni) {
  static const IsaKernels base = [] {
    IsaKernels k{};
    k.isa = Isa::kAvx2;
    k.name = "avx2";
    k.gemm[static_cast<int>(Precision::kInt8)] = avx2::ro_gemm_kernel(avx2::kI8G, avx2::kI8Nb, 1, false, 2, avx2::i8_packed_bytes, avx2::i8_pack, avx2::quantize_s16_row, avx2::i8_gemm);
    avx2::fill_f32(k);
    avx2::ro_describe(k, "int8, AVX2 vpmaddwd on int16-widened operands (int32 sums, no saturation)", "fp32, AVX2 FMA");
    return k;
  }();
  static const IsaKernels with_vnni = [] {
    IsaKernels k = base;
    k.isa = Isa::kAvx2Vnni;
    k.name = "avx2_vnni";
    avxvnni_fill(k);
    return k;
  }();
  return vnni ? with_vnni : base;
}

}  // namespace encoder
}  // namespace spanrt
