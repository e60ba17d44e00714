// The native encoder on AVX-512 with VNNI (Intel Cascade Lake / Ice Lake and newer, AMD Zen 4/5).
// Compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512vnni -mfma; the table is used
// only where the CPU reports them (cpu_features.cpp). bf16 linear layers live in
// isa_avx512_bf16.cpp (compiled with -mavx512bf16 as well), added to this table on CPUs with it.
//
// int8: vpdpbusd multiplies unsigned by signed bytes, so activations are stored as q + 128 (u8)
// and 128 * (the weight column's sum) is subtracted from each int32 sum: exact, the same int32 as
// s8 x s8. Register block 6 rows x 64 columns (24 zmm accumulators), weights in panels of 64
// columns x 4 consecutive k per 32-bit lane.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "microkernels.h"

namespace spanrt {
namespace encoder {
namespace avx512 {
namespace {

#include "rowops.inc"

#include "avx512_math.inc"

inline void softmax_row(float* s, int64_t n, float scale) { softmax512(s, n, scale); }

// ---- fp32: 8 rows x 48 columns (24 accumulators) -------------------------------------------------
constexpr int64_t kF32Nb = 48;
constexpr int64_t kF32Mr = 8;

template <int MR>
void f32_block_t(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, const float* bias, int64_t ncols, float* out,
                 int64_t ldo) {
  __m512 acc[MR][3];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < 3; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * ldb), b1 = _mm512_loadu_ps(b + k * ldb + 16), b2 = _mm512_loadu_ps(b + k * ldb + 32);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + k]);
      acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(av, b2, acc[i][2]);
    }
  }
  for (int v = 0; v < 3; ++v) {
    if (16 * v >= ncols) break;
    const __mmask16 mk = tail_mask(ncols - 16 * v);
    const __m512 bv = bias != nullptr ? _mm512_maskz_loadu_ps(mk, bias + 16 * v) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(out + i * ldo + 16 * v, mk, _mm512_add_ps(acc[i][v], bv));
  }
}

void f32_block(int64_t mr, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, const float* bias, int64_t ncols, float* out,
               int64_t ldo) {
  switch (mr) {
    case 8: f32_block_t<8>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
    case 7: f32_block_t<7>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
    case 6: f32_block_t<6>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
    case 5: f32_block_t<5>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
    case 4: f32_block_t<4>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
    case 3: f32_block_t<3>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
    case 2: f32_block_t<2>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
    default: f32_block_t<1>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
  }
}

#include "f32ops.inc"

// ---- int8: 6 rows x 64 columns, vpdpbusd -----------------------------------------------------------
constexpr int64_t kI8Nb = 64;
constexpr int64_t kI8Mr = 6;
constexpr int64_t kI8G = 4;

size_t i8_packed_bytes(int64_t n_pad, int64_t k_pad) { return static_cast<size_t>(n_pad * k_pad); }

// One row as q + 128 (u8), per-token scale amax / 127; the same numbers as ro_quantize_s8, stored + 128 (round
// half to even of x * (1 / scale)), in intrinsics: GCC's auto-vectorised float -> u8 narrowing was
// 13 % of a forward pass.
void i8_quantize_row(const float* x, int64_t n, int64_t k_pad, void* dst, float* scale) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(n - j), x + j)));
  const float m = _mm512_reduce_max_ps(amax);
  const float s = m > 0.0f ? m / 127.0f : 1.0f;
  *scale = s;
  const __m512 inv = _mm512_set1_ps(1.0f / s);
  // 64 values a step: four int32 vectors narrowed by saturating packs (int32 -> int16 -> int8, then
  // max -127: the same clamp), lanes put back in order, + 128 as xor 0x80. Past n the masked loads
  // give q = 0, stored as 128: the padding up to k_pad.
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  const __m512i lo = _mm512_set1_epi8(-127), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  uint8_t* out = static_cast<uint8_t*>(dst);
  for (int64_t j = 0; j < k_pad; j += 64) {
    __m512i q[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t c = j + 16 * v;
      const __mmask16 mk = c < n ? tail_mask(n - c) : static_cast<__mmask16>(0);
      q[v] = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + c), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    __m512i b = _mm512_packs_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
    b = _mm512_xor_si512(_mm512_max_epi8(_mm512_permutexvar_epi32(order, b), lo), flip);
    const int64_t left = k_pad - j;
    _mm512_mask_storeu_epi8(out + j, left >= 64 ? ~static_cast<__mmask64>(0) : (static_cast<__mmask64>(1) << left) - 1, b);
  }
}

void i8_pack(const void* src, int64_t out, int64_t in, int64_t k_pad, int64_t, void* dst, int32_t* comp) {
  ro_pack_i8_groups(static_cast<const int8_t*>(src), out, in, k_pad, kI8Nb, kI8G, static_cast<int8_t*>(dst), comp);
}

// vpdpbusd through inline asm: GCC (12) models the intrinsic's accumulator badly and copies every
// accumulator register around each instruction (measured: 2.6x slower than this loop).
inline void dpbusd(__m512i& acc, __m512i a, __m512i b) { __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b)); }

inline int32_t load4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// 6 rows x 64 columns in 24 named accumulators (GCC keeps an accumulator array in memory once
// the asm takes its elements by reference). Fewer than 6 rows: the missing rows repeat the last
// one (computed, not stored).
#define SPANRT_ROW(i)                                    \
  {                                                      \
    const __m512i av = _mm512_set1_epi32(load4(a##i + o)); \
    dpbusd(c##i##0, av, b0);                             \
    dpbusd(c##i##1, av, b1);                             \
    dpbusd(c##i##2, av, b2);                             \
    dpbusd(c##i##3, av, b3);                             \
  }
#define SPANRT_ZERO4(i) __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
#define SPANRT_SAVE(i)  \
  acc[i][0] = c##i##0;  \
  acc[i][1] = c##i##1;  \
  acc[i][2] = c##i##2;  \
  acc[i][3] = c##i##3;

void i8_block(int64_t mr, const LinearView& L, const uint8_t* a, int64_t lda, const float* a_scale, const int8_t* panel, int64_t n0,
              Epilogue ep, float* out, int64_t ldo) {
  const uint8_t* a0 = a;
  const uint8_t* a1 = a + ro_min(1, mr - 1) * lda;
  const uint8_t* a2 = a + ro_min(2, mr - 1) * lda;
  const uint8_t* a3 = a + ro_min(3, mr - 1) * lda;
  const uint8_t* a4 = a + ro_min(4, mr - 1) * lda;
  const uint8_t* a5 = a + ro_min(5, mr - 1) * lda;
  SPANRT_ZERO4(0) SPANRT_ZERO4(1) SPANRT_ZERO4(2) SPANRT_ZERO4(3) SPANRT_ZERO4(4) SPANRT_ZERO4(5)
  const int64_t groups = L.k_pad / kI8G;
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* bp = panel + g * kI8Nb * kI8G;
    const __m512i b0 = _mm512_load_si512(bp), b1 = _mm512_load_si512(bp + 64), b2 = _mm512_load_si512(bp + 128),
                  b3 = _mm512_load_si512(bp + 192);
    const int64_t o = g * kI8G;
    SPANRT_ROW(0) SPANRT_ROW(1) SPANRT_ROW(2) SPANRT_ROW(3) SPANRT_ROW(4) SPANRT_ROW(5)
  }
  __m512i acc[6][4];
  SPANRT_SAVE(0) SPANRT_SAVE(1) SPANRT_SAVE(2) SPANRT_SAVE(3) SPANRT_SAVE(4) SPANRT_SAVE(5)
  const int64_t ncols = ro_min(kI8Nb, L.out - n0);
  for (int v = 0; v < 4; ++v) {
    if (16 * v >= ncols) break;
    const int64_t n = n0 + 16 * v;
    const __mmask16 mk = tail_mask(ncols - 16 * v);
    const __m512i comp = _mm512_loadu_si512(L.comp + n);
    const __m512 ws = _mm512_loadu_ps(L.scale + n);
    const __m512 bias = _mm512_loadu_ps(L.bias + n);
    // the activation in registers: a masked store read back at once does not forward (measured: the
    // read-back stalled ~6 % of a forward pass on Zen 5)
    for (int64_t i = 0; i < mr; ++i) {
      const __m512 x = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][v], comp));
      const __m512 y = _mm512_fmadd_ps(x, _mm512_mul_ps(ws, _mm512_set1_ps(a_scale[i])), bias);
      if (ep == Epilogue::kBiasBf16) {
        _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(out) + i * ldo + n, mk, bf16_rne(y));
      } else {
        _mm512_mask_storeu_ps(out + i * ldo + n, mk, ep == Epilogue::kBias ? y : activate512(ep, y));
      }
    }
  }
}
#undef SPANRT_ROW
#undef SPANRT_ZERO4
#undef SPANRT_SAVE

void i8_gemm(const LinearView& L, const void* a, int64_t lda, const float* a_scale, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1,
             Epilogue ep, float* out, int64_t ldo) {
  const uint8_t* x = static_cast<const uint8_t*>(a);
  const int8_t* w = static_cast<const int8_t*>(L.w);
  ro_drive_gemm(L, m0, m1, nb0, nb1, kI8Nb, kI8Mr, [&](int64_t rows, int64_t m, int64_t nb, int64_t n0) {
    i8_block(rows, L, x + m * lda, lda, a_scale + m, w + nb * L.k_pad * kI8Nb, n0, ep, ro_out_row(out, m, ldo, ep), ldo);
  });
}

}  // namespace
}  // namespace avx512

void avx512_bf16_fill(IsaKernels& k);  // isa_avx512_bf16.cpp

const IsaKernels& avx512_kernels(bool bf16) {
  static const IsaKernels base = [] {
    IsaKernels k{};
    k.isa = Isa::kAvx512Vnni;
    k.name = "avx512_vnni";
    k.gemm[static_cast<int>(Precision::kInt8)] = avx512::ro_gemm_kernel(avx512::kI8G, avx512::kI8Nb, 1, true, 1, avx512::i8_packed_bytes, avx512::i8_pack, avx512::i8_quantize_row, avx512::i8_gemm);
    avx512::fill_f32(k);
    avx512::ro_describe(k, "int8, AVX-512 VNNI vpdpbusd (u8 + 128 compensation, int32 sums)", "fp32, AVX-512 FMA");
    return k;
  }();
  static const IsaKernels with_bf16 = [] {
    IsaKernels k = base;
    k.isa = Isa::kAvx512Bf16;
    k.name = "avx512_bf16";
    avx512_bf16_fill(k);
    return k;
  }();
  return bf16 ? with_bf16 : base;
}

}  // namespace encoder
}  // namespace spanrt
