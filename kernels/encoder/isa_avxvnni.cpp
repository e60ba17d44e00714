// int8 linear layers with AVX-VNNI (vpdpbusd on ymm: Intel Alder Lake and later client chips,
// Sierra Forest, AMD Zen 5). Compiled with -mavx2 -mfma -mavxvnni; added to the AVX2 table where
// the CPU reports AVX-VNNI. As on AVX-512: activations stored as q + 128 (u8) and 128 * (column sum)
// subtracted, exact. Register block 6 rows x 16 columns; panels of 16 columns x 4 k per lane.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "microkernels.h"

namespace spanrt {
namespace encoder {
namespace avxvnni {
namespace {

#include "rowops.inc"

constexpr int64_t kNb = 16;
constexpr int64_t kMr = 6;
constexpr int64_t kG = 4;

#include "avx2_math.inc"

size_t packed_bytes(int64_t n_pad, int64_t k_pad) { return static_cast<size_t>(n_pad * k_pad); }

void pack(const void* src, int64_t out, int64_t in, int64_t k_pad, int64_t, void* dst, int32_t* comp) {
  ro_pack_i8_groups(static_cast<const int8_t*>(src), out, in, k_pad, kNb, kG, static_cast<int8_t*>(dst), comp);
}

// {vex} vpdpbusd through inline asm (see isa_avx512.cpp: GCC copies the intrinsic's accumulator).
inline void dpbusd(__m256i& acc, __m256i a, __m256i b) { __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b)); }

// 6 rows x 16 columns in 12 named accumulators (see isa_avx512.cpp); fewer rows repeat the last.
#define SPANRT_ROW(i)                       \
  {                                         \
    int32_t quad;                           \
    std::memcpy(&quad, a##i + o, 4);        \
    const __m256i av = _mm256_set1_epi32(quad); \
    dpbusd(c##i##0, av, b0);                \
    dpbusd(c##i##1, av, b1);                \
  }
#define SPANRT_ZERO2(i) __m256i c##i##0 = _mm256_setzero_si256(), c##i##1 = c##i##0;
#define SPANRT_SAVE(i)  \
  acc[i][0] = c##i##0;  \
  acc[i][1] = c##i##1;

void block(int64_t mr, const LinearView& L, const uint8_t* a, int64_t lda, const float* a_scale, const int8_t* panel, int64_t n0,
           Epilogue ep, float* out, int64_t ldo) {
  const uint8_t* a0 = a;
  const uint8_t* a1 = a + ro_min(1, mr - 1) * lda;
  const uint8_t* a2 = a + ro_min(2, mr - 1) * lda;
  const uint8_t* a3 = a + ro_min(3, mr - 1) * lda;
  const uint8_t* a4 = a + ro_min(4, mr - 1) * lda;
  const uint8_t* a5 = a + ro_min(5, mr - 1) * lda;
  SPANRT_ZERO2(0) SPANRT_ZERO2(1) SPANRT_ZERO2(2) SPANRT_ZERO2(3) SPANRT_ZERO2(4) SPANRT_ZERO2(5)
  const int64_t groups = L.k_pad / kG;
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* bp = panel + g * kNb * kG;
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bp)),
                  b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bp + 32));
    const int64_t o = g * kG;
    SPANRT_ROW(0) SPANRT_ROW(1) SPANRT_ROW(2) SPANRT_ROW(3) SPANRT_ROW(4) SPANRT_ROW(5)
  }
  __m256i acc[6][2];
  SPANRT_SAVE(0) SPANRT_SAVE(1) SPANRT_SAVE(2) SPANRT_SAVE(3) SPANRT_SAVE(4) SPANRT_SAVE(5)
  const int64_t ncols = ro_min(kNb, L.out - n0);
  for (int v = 0; v < 2; ++v) {
    if (8 * v >= ncols) break;
    const int64_t n = n0 + 8 * v;
    const __m256i mk = tail_mask8(ncols - 8 * v);
    const __m256i comp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(L.comp + n));
    const __m256 ws = _mm256_loadu_ps(L.scale + n);
    const __m256 bias = _mm256_loadu_ps(L.bias + n);
    for (int64_t i = 0; i < mr; ++i) {
      const __m256 x = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][v], comp));
      const __m256 y = _mm256_fmadd_ps(x, _mm256_mul_ps(ws, _mm256_set1_ps(a_scale[i])), bias);
      _mm256_maskstore_ps(out + i * ldo + n, mk, ep == Epilogue::kBias ? y : activate256(ep, y));  // in registers (isa_avx512.cpp)
    }
  }
}
#undef SPANRT_ROW
#undef SPANRT_ZERO2
#undef SPANRT_SAVE

void gemm(const LinearView& L, const void* a, int64_t lda, const float* a_scale, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1,
          Epilogue ep, float* out, int64_t ldo) {
  const uint8_t* x = static_cast<const uint8_t*>(a);
  const int8_t* w = static_cast<const int8_t*>(L.w);
  ro_drive_gemm(L, m0, m1, nb0, nb1, kNb, kMr, [&](int64_t rows, int64_t m, int64_t nb, int64_t n0) {
    block(rows, L, x + m * lda, lda, a_scale + m, w + nb * L.k_pad * kNb, n0, ep, out + m * ldo, ldo);
  });
}

}  // namespace
}  // namespace avxvnni

void avxvnni_fill(IsaKernels& k) {
  k.gemm[static_cast<int>(Precision::kInt8)] = avxvnni::ro_gemm_kernel(avxvnni::kG, avxvnni::kNb, 1, true, 1, avxvnni::packed_bytes, avxvnni::pack, avxvnni::quantize_u8_row, avxvnni::gemm);
  k.linear_desc[static_cast<int>(Precision::kInt8)] = "int8, AVX-VNNI vpdpbusd ymm (u8 + 128 compensation, int32 sums)";
}

}  // namespace encoder
}  // namespace spanrt
