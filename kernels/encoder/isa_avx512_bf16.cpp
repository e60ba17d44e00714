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

template <int MR>
void block_t(const LinearView& L, const uint16_t* a, int64_t lda, const uint16_t* panel, int64_t n0, Epilogue ep, float* out, int64_t ldo) {
  __m512 acc[MR][4];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_setzero_ps();
  const int64_t groups = L.k_pad / kG;
  for (int64_t g = 0; g < groups; ++g) {
    const uint16_t* bp = panel + g * kNb * kG;
    const __m512bh b0 = (__m512bh)_mm512_load_si512(bp), b1 = (__m512bh)_mm512_load_si512(bp + 32),
                   b2 = (__m512bh)_mm512_load_si512(bp + 64), b3 = (__m512bh)_mm512_load_si512(bp + 96);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + i * lda + g * kG, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], av, b2);
      acc[i][3] = _mm512_dpbf16_ps(acc[i][3], av, b3);
    }
  }
  const int64_t ncols = ro_min(kNb, L.out - n0);
  for (int v = 0; v < 4; ++v) {
    if (16 * v >= ncols) break;
    const int64_t n = n0 + 16 * v;
    const __mmask16 mk = tail_mask(ncols - 16 * v);
    const __m512 bias = _mm512_loadu_ps(L.bias + n);
    for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(out + i * ldo + n, mk, _mm512_add_ps(acc[i][v], bias));
  }
  if (ep == Epilogue::kBiasGelu)
    for (int i = 0; i < MR; ++i) ro_gelu_inplace(out + i * ldo + n0, ncols);
}

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
        switch (ro_min(kMr, r1 - m)) {
          case 6: block_t<6>(L, am, lda, panel, n0, ep, om, ldo); break;
          case 5: block_t<5>(L, am, lda, panel, n0, ep, om, ldo); break;
          case 4: block_t<4>(L, am, lda, panel, n0, ep, om, ldo); break;
          case 3: block_t<3>(L, am, lda, panel, n0, ep, om, ldo); break;
          case 2: block_t<2>(L, am, lda, panel, n0, ep, om, ldo); break;
          default: block_t<1>(L, am, lda, panel, n0, ep, om, ldo); break;
        }
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
