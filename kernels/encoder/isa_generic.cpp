// The native encoder's portable path: plain C++ for any CPU (correct, not tuned), compiled with
// the baseline flags. It is the reference the other paths are tested against in the C++ check.
#include <cmath>
#include <cstring>

#include "microkernels.h"

namespace spanrt {
namespace encoder {
namespace generic {

#include "rowops.inc"

constexpr int64_t kF32Nb = 16;
constexpr int64_t kF32Mr = 4;

static void f32_block(int64_t mr, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, const float* bias, int64_t ncols,
                      float* out, int64_t ldo) {
  for (int64_t i = 0; i < mr; ++i) {
    float acc[kF32Nb] = {0};
    for (int64_t k = 0; k < K; ++k) {
      const float av = a[i * lda + k];
      for (int64_t c = 0; c < kF32Nb; ++c) acc[c] += av * b[k * ldb + c];
    }
    for (int64_t c = 0; c < ncols; ++c) out[i * ldo + c] = acc[c] + (bias != nullptr ? bias[c] : 0.0f);
  }
}

inline void softmax_row(float* s, int64_t n, float scale) { ro_softmax(s, n, scale); }
inline void activate_row(Epilogue ep, float* x, int64_t n) { ro_activate_inplace(ep, x, n); }

#include "f32ops.inc"

// int8: s8 x s8 products in int32, weights in groups of 4 k per column, panels of 16 columns.
constexpr int64_t kI8Nb = 16;
constexpr int64_t kI8G = 4;

static size_t i8_packed_bytes(int64_t n_pad, int64_t k_pad) { return static_cast<size_t>(n_pad * k_pad); }

static void i8_pack(const void* src, int64_t out, int64_t in, int64_t k_pad, int64_t, void* dst, int32_t*) {
  ro_pack_i8_groups(static_cast<const int8_t*>(src), out, in, k_pad, kI8Nb, kI8G, static_cast<int8_t*>(dst), nullptr);
}

static void i8_gemm(const LinearView& L, const void* a, int64_t lda, const float* a_scale, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1,
                    Epilogue ep, float* out, int64_t ldo) {
  const int8_t* x = static_cast<const int8_t*>(a);
  const int8_t* w = static_cast<const int8_t*>(L.w);
  const int64_t groups = L.k_pad / kI8G;
  ro_drive_gemm(L, m0, m1, nb0, nb1, kI8Nb, 1, [&](int64_t, int64_t m, int64_t nb, int64_t n0) {
    const int64_t ncols = ro_min(kI8Nb, L.out - n0);
    const int8_t* panel = w + nb * groups * kI8Nb * kI8G;
    int32_t acc[kI8Nb] = {0};
    const int8_t* xr = x + m * lda;
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t c = 0; c < kI8Nb; ++c)
        for (int64_t e = 0; e < kI8G; ++e) acc[c] += int32_t{xr[g * kI8G + e]} * int32_t{panel[(g * kI8Nb + c) * kI8G + e]};
    float* o = out + m * ldo + n0;
    for (int64_t c = 0; c < ncols; ++c) o[c] = static_cast<float>(acc[c]) * (L.scale[n0 + c] * a_scale[m]) + L.bias[n0 + c];
    ro_activate_inplace(ep, o, ncols);
  });
}

}  // namespace generic

const IsaKernels& generic_kernels() {
  static const IsaKernels kernels = [] {
    IsaKernels k{};
    k.isa = Isa::kGeneric;
    k.name = "generic";
    k.gemm[static_cast<int>(Precision::kInt8)] = generic::ro_gemm_kernel(generic::kI8G, generic::kI8Nb, 1, false, 1, generic::i8_packed_bytes, generic::i8_pack, generic::ro_quantize_s8, generic::i8_gemm);
    generic::fill_f32(k);
    generic::ro_describe(k, "int8, portable C++ (int32 sums)", "fp32, portable C++");
    return k;
  }();
  return kernels;
}

}  // namespace encoder
}  // namespace spanrt
