// The native encoder on AArch64 NEON with the dot-product instructions (FEAT_DotProd: Cortex-A76
// and newer, Neoverse N1/V1/V2 (AWS Graviton 2-4), Jetson Orin's Cortex-A78AE, Apple M1 and newer).
// Compiled with -march=armv8.2-a+dotprod; used only where HWCAP reports ASIMDDP.
//
// int8: sdot multiplies signed by signed bytes, so activations stay s8 (no compensation) and each
// instruction adds four 4-byte dot products into four int32 lanes. Register block 6 rows x 16
// columns (24 accumulators of 32), weights in panels of 16 columns x 4 k per lane. On CPUs with
// FEAT_I8MM the "neon_i8mm" path replaces the int8 GEMM with smmla (isa_neon_i8mm.cpp).
#include <arm_neon.h>

#include <cmath>
#include <cstring>

#include "microkernels.h"

namespace spanrt {
namespace encoder {
namespace neon {
namespace {

#include "rowops.inc"

// ---- fp32: 6 rows x 16 columns -----------------------------------------------------------------
constexpr int64_t kF32Nb = 16;
constexpr int64_t kF32Mr = 6;

template <int MR>
void f32_block_t(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, const float* bias, int64_t ncols, float* out,
                 int64_t ldo) {
  float32x4_t acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < 4; ++v) acc[i][v] = vdupq_n_f32(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const float32x4_t b0 = vld1q_f32(b + k * ldb), b1 = vld1q_f32(b + k * ldb + 4), b2 = vld1q_f32(b + k * ldb + 8),
                      b3 = vld1q_f32(b + k * ldb + 12);
    for (int i = 0; i < MR; ++i) {
      const float av = a[i * lda + k];
      acc[i][0] = vfmaq_n_f32(acc[i][0], b0, av);
      acc[i][1] = vfmaq_n_f32(acc[i][1], b1, av);
      acc[i][2] = vfmaq_n_f32(acc[i][2], b2, av);
      acc[i][3] = vfmaq_n_f32(acc[i][3], b3, av);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float row[16];
    for (int v = 0; v < 4; ++v) vst1q_f32(row + 4 * v, acc[i][v]);
    for (int64_t c = 0; c < ncols; ++c) out[i * ldo + c] = row[c] + (bias != nullptr ? bias[c] : 0.0f);
  }
}

void f32_block(int64_t mr, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, const float* bias, int64_t ncols, float* out,
               int64_t ldo) {
  switch (mr) {
    case 6: f32_block_t<6>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
    case 5: f32_block_t<5>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
    case 4: f32_block_t<4>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
    case 3: f32_block_t<3>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
    case 2: f32_block_t<2>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
    default: f32_block_t<1>(a, lda, b, ldb, K, bias, ncols, out, ldo); break;
  }
}

inline void softmax_row(float* s, int64_t n, float scale) { ro_softmax(s, n, scale); }
inline void activate_row(Epilogue ep, float* x, int64_t n) { ro_activate_inplace(ep, x, n); }

#include "f32ops.inc"

// ---- int8: 6 rows x 16 columns, sdot -----------------------------------------------------------
constexpr int64_t kI8Nb = 16;
constexpr int64_t kI8Mr = 6;
constexpr int64_t kI8G = 4;

size_t i8_packed_bytes(int64_t n_pad, int64_t k_pad) { return static_cast<size_t>(n_pad * k_pad); }

void i8_pack(const void* src, int64_t out, int64_t in, int64_t k_pad, int64_t, void* dst, int32_t*) {
  ro_pack_i8_groups(static_cast<const int8_t*>(src), out, in, k_pad, kI8Nb, kI8G, static_cast<int8_t*>(dst), nullptr);
}

template <int MR>
void i8_block_t(const LinearView& L, const int8_t* a, int64_t lda, const float* a_scale, const int8_t* panel, int64_t n0, Epilogue ep,
                float* out, int64_t ldo) {
  int32x4_t acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < 4; ++v) acc[i][v] = vdupq_n_s32(0);
  const int64_t groups = L.k_pad / kI8G;
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* bp = panel + g * kI8Nb * kI8G;
    const int8x16_t b0 = vld1q_s8(bp), b1 = vld1q_s8(bp + 16), b2 = vld1q_s8(bp + 32), b3 = vld1q_s8(bp + 48);
    for (int i = 0; i < MR; ++i) {
      int32_t quad;
      std::memcpy(&quad, a + i * lda + g * kI8G, 4);
      const int8x16_t av = vreinterpretq_s8_s32(vdupq_n_s32(quad));
      acc[i][0] = vdotq_s32(acc[i][0], b0, av);
      acc[i][1] = vdotq_s32(acc[i][1], b1, av);
      acc[i][2] = vdotq_s32(acc[i][2], b2, av);
      acc[i][3] = vdotq_s32(acc[i][3], b3, av);
    }
  }
  const int64_t ncols = ro_min(kI8Nb, L.out - n0);
  for (int i = 0; i < MR; ++i) {
    float row[16];
    const float32x4_t as = vdupq_n_f32(a_scale[i]);
    for (int v = 0; v < 4; ++v) {
      const float32x4_t ws = vmulq_f32(vld1q_f32(L.scale + n0 + 4 * v), as);
      vst1q_f32(row + 4 * v, vfmaq_f32(vld1q_f32(L.bias + n0 + 4 * v), vcvtq_f32_s32(acc[i][v]), ws));
    }
    for (int64_t c = 0; c < ncols; ++c) out[i * ldo + n0 + c] = row[c];
    ro_activate_inplace(ep, out + i * ldo + n0, ncols);
  }
}

void i8_gemm(const LinearView& L, const void* a, int64_t lda, const float* a_scale, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1,
             Epilogue ep, float* out, int64_t ldo) {
  const int8_t* x = static_cast<const int8_t*>(a);
  const int8_t* w = static_cast<const int8_t*>(L.w);
  ro_drive_gemm(L, m0, m1, nb0, nb1, kI8Nb, kI8Mr, [&](int64_t rows, int64_t m, int64_t nb, int64_t n0) {
    const int8_t* am = x + m * lda;
    const int8_t* panel = w + nb * L.k_pad * kI8Nb;
    float* om = out + m * ldo;
    switch (rows) {
      case 6: i8_block_t<6>(L, am, lda, a_scale + m, panel, n0, ep, om, ldo); break;
      case 5: i8_block_t<5>(L, am, lda, a_scale + m, panel, n0, ep, om, ldo); break;
      case 4: i8_block_t<4>(L, am, lda, a_scale + m, panel, n0, ep, om, ldo); break;
      case 3: i8_block_t<3>(L, am, lda, a_scale + m, panel, n0, ep, om, ldo); break;
      case 2: i8_block_t<2>(L, am, lda, a_scale + m, panel, n0, ep, om, ldo); break;
      default: i8_block_t<1>(L, am, lda, a_scale + m, panel, n0, ep, om, ldo); break;
    }
  });
}

}  // namespace
}  // namespace neon

void neon_i8mm_fill(IsaKernels& k);  // isa_neon_i8mm.cpp

const IsaKernels& neon_kernels(bool i8mm) {
  static const IsaKernels base = [] {
    IsaKernels k{};
    k.isa = Isa::kNeon;
    k.name = "neon";
    k.gemm[static_cast<int>(Precision::kInt8)] = neon::ro_gemm_kernel(neon::kI8G, neon::kI8Nb, 1, false, 1, neon::i8_packed_bytes, neon::i8_pack,
                                                                    neon::ro_quantize_s8, neon::i8_gemm);
    neon::fill_f32(k);
    neon::ro_describe(k, "int8, NEON sdot (s8 x s8, int32 sums)", "fp32, NEON FMA");
    return k;
  }();
  static const IsaKernels with_i8mm = [] {
    IsaKernels k = base;
    k.isa = Isa::kNeonI8mm;
    k.name = "neon_i8mm";
    neon_i8mm_fill(k);
    return k;
  }();
  return i8mm ? with_i8mm : base;
}

}  // namespace encoder
}  // namespace spanrt
