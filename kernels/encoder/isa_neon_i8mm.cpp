// int8 linear layers with the AArch64 int8 matrix-multiply instructions (FEAT_I8MM: smmla; Neoverse
// V1/V2/N2 (AWS Graviton 3/4), Cortex-A710 and newer, Apple M2 and newer). Compiled with
// -march=armv8.2-a+dotprod+i8mm; added to the NEON table ("neon_i8mm") only where HWCAP2 reports
// I8MM. smmla multiplies a 2x8 block of rows by an 8x2 block of columns into a 2x2 int32 tile:
// signed x signed, exact int32 sums, as sdot. Register block 4 rows x 16 columns (16 accumulators,
// each a 2x2 tile); weights in panels of 16 columns, each 8-k chunk holding 8 column pairs x 2 x 8 k.
#include <arm_neon.h>

#include <cmath>
#include <cstring>

#include "microkernels.h"

namespace spanrt {
namespace encoder {
namespace neon_i8mm {
namespace {

#include "rowops.inc"

constexpr int64_t kNb = 16;
constexpr int64_t kMr = 4;
constexpr int64_t kK = 8;

size_t packed_bytes(int64_t n_pad, int64_t k_pad) { return static_cast<size_t>(n_pad * k_pad); }

// [n_pad/16][k_pad/8][8 column pairs][2 columns][8 k]
void pack(const void* src, int64_t out, int64_t in, int64_t k_pad, int64_t, void* dst, int32_t*) {
  const int8_t* q = static_cast<const int8_t*>(src);
  int8_t* d = static_cast<int8_t*>(dst);
  for (int64_t n = 0; n < out; ++n)
    for (int64_t k = 0; k < in; ++k)
      d[(((n / kNb) * (k_pad / kK) + k / kK) * (kNb / 2) + (n % kNb) / 2) * 16 + (n % 2) * 8 + k % kK] = q[n * in + k];
}

void block(int64_t mr, const LinearView& L, const int8_t* a, int64_t lda, const float* a_scale, const int8_t* panel, int64_t n0,
           Epilogue ep, float* out, int64_t ldo) {
  const int8_t* a0 = a;
  const int8_t* a1 = a + ro_min(1, mr - 1) * lda;
  const int8_t* a2 = a + ro_min(2, mr - 1) * lda;
  const int8_t* a3 = a + ro_min(3, mr - 1) * lda;
  int32x4_t acc[2][8];
  for (int r = 0; r < 2; ++r)
    for (int c = 0; c < 8; ++c) acc[r][c] = vdupq_n_s32(0);
  const int64_t chunks = L.k_pad / kK;
  for (int64_t kc = 0; kc < chunks; ++kc) {
    const int8x16_t a01 = vcombine_s8(vld1_s8(a0 + kc * kK), vld1_s8(a1 + kc * kK));
    const int8x16_t a23 = vcombine_s8(vld1_s8(a2 + kc * kK), vld1_s8(a3 + kc * kK));
    const int8_t* bp = panel + kc * kNb * kK;
    for (int c = 0; c < 8; ++c) {
      const int8x16_t b = vld1q_s8(bp + c * 16);
      acc[0][c] = vmmlaq_s32(acc[0][c], a01, b);
      acc[1][c] = vmmlaq_s32(acc[1][c], a23, b);
    }
  }
  // tile (row pair p, column pair c) lanes: [r0 c0, r0 c1, r1 c0, r1 c1]
  int32_t sums[4][kNb];
  for (int p = 0; p < 2; ++p)
    for (int c = 0; c < 8; ++c) {
      int32_t t[4];
      vst1q_s32(t, acc[p][c]);
      sums[2 * p][2 * c] = t[0];
      sums[2 * p][2 * c + 1] = t[1];
      sums[2 * p + 1][2 * c] = t[2];
      sums[2 * p + 1][2 * c + 1] = t[3];
    }
  const int64_t ncols = ro_min(kNb, L.out - n0);
  for (int64_t i = 0; i < mr; ++i) {
    float* o = out + i * ldo + n0;
    for (int64_t c = 0; c < ncols; ++c) o[c] = static_cast<float>(sums[i][c]) * (L.scale[n0 + c] * a_scale[i]) + L.bias[n0 + c];
    ro_activate_inplace(ep, o, ncols);
  }
}

void gemm(const LinearView& L, const void* a, int64_t lda, const float* a_scale, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1,
          Epilogue ep, float* out, int64_t ldo) {
  const int8_t* x = static_cast<const int8_t*>(a);
  const int8_t* w = static_cast<const int8_t*>(L.w);
  ro_drive_gemm(L, m0, m1, nb0, nb1, kNb, kMr, [&](int64_t rows, int64_t m, int64_t nb, int64_t n0) {
    block(rows, L, x + m * lda, lda, a_scale + m, w + nb * L.k_pad * kNb, n0, ep, out + m * ldo, ldo);
  });
}

}  // namespace
}  // namespace neon_i8mm

void neon_i8mm_fill(IsaKernels& k) {
  k.gemm[static_cast<int>(Precision::kInt8)] = neon_i8mm::ro_gemm_kernel(neon_i8mm::kK, neon_i8mm::kNb, 1, false, 1, neon_i8mm::packed_bytes,
                                                                         neon_i8mm::pack, neon_i8mm::ro_quantize_s8, neon_i8mm::gemm);
  k.linear_desc[static_cast<int>(Precision::kInt8)] = "int8, NEON i8mm smmla (s8 x s8 2x2 tiles, int32 sums)";
}

}  // namespace encoder
}  // namespace spanrt
