// The native encoder on Intel AMX (Xeon Sapphire Rapids and newer): the path of the first native
// encoder, unchanged in its arithmetic and speed. Compiled with the AVX-512 flags plus -mavx512bf16
// -mamx-tile -mamx-int8 -mamx-bf16; the table is used only where the CPU reports AMX-TILE/INT8/BF16
// and AVX512_BF16 and Linux has granted this process the AMX tile state (cpu_features.cpp). Its
// fp32 linear layers and fp32 attention are the AVX-512 path's.
//
// Tiles: every kernel uses the same configuration, eight tiles of 16 rows x 64 bytes:
//   int8 GEMM: A 16 tokens x 64 int8, B 16 rows of 4 k x 16 columns (VNNI), C 16 x 16 int32;
//   bf16 GEMM: A 16 tokens x 32 bf16, B 16 rows of 2 k x 16 columns, C 16 x 16 fp32.
// A GEMM block is 32 x 32 outputs: C tiles 0-3, A tiles 4-5, B tiles 6-7. Attention runs in bf16
// tiles with an fp32 softmax; probabilities stay unnormalised (exp(s - max) <= 1) and each output
// row is divided by its fp32 sum at the end.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "microkernels.h"

namespace spanrt {
namespace encoder {
namespace amx {
namespace {

#include "rowops.inc"

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

#include "avx512_math.inc"


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


// ---- int8 / bf16 GEMMs --------------------------------------------------------------------------
size_t i8_packed_bytes(int64_t n_pad, int64_t k_pad) { return static_cast<size_t>(n_pad * k_pad); }
size_t bf16_packed_bytes(int64_t n_pad, int64_t k_pad) { return sizeof(uint16_t) * static_cast<size_t>(n_pad * k_pad); }

// [n_pad/16][k_pad/64][16][64]: 16 rows of 4 k x 16 columns per tile.
void i8_pack(const void* src, int64_t out, int64_t in, int64_t k_pad, int64_t, void* dst, int32_t*) {
  const int8_t* q = static_cast<const int8_t*>(src);
  int8_t* d = static_cast<int8_t*>(dst);
  const int64_t kb_count = k_pad / 64;
  for (int64_t n = 0; n < out; ++n) {
    const int64_t nb = n / 16, c = n % 16;
    for (int64_t k = 0; k < in; ++k) {
      const int64_t kb = k / 64, r = (k % 64) / 4, e = k % 4;
      d[((nb * kb_count + kb) * 16 + r) * 64 + c * 4 + e] = q[n * in + k];
    }
  }
}

// [n_pad/16][k_pad/32][16][32]: 16 rows of 2 k x 16 columns per tile.
void bf16_pack(const void* src, int64_t out, int64_t in, int64_t k_pad, int64_t, void* dst, int32_t*) {
  const float* w = static_cast<const float*>(src);
  uint16_t* d = static_cast<uint16_t*>(dst);
  const int64_t kb_count = k_pad / 32;
  for (int64_t n = 0; n < out; ++n) {
    const int64_t nb = n / 16, c = n % 16;
    for (int64_t k = 0; k < in; ++k) {
      const int64_t kb = k / 32, r = (k % 32) / 2, e = k % 2;
      d[((nb * kb_count + kb) * 16 + r) * 32 + c * 2 + e] = ro_to_bf16(w[n * in + k]);
    }
  }
}

// One row as signed int8 activations (per-token scale), with AVX-512.
void i8_quantize_row(const float* xr, int64_t n, int64_t k_pad, void* dst, float* scale) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(n - j), xr + j)));
  const float m = _mm512_reduce_max_ps(amax);
  const float s = m > 0.0f ? m / 127.0f : 1.0f;
  *scale = s;
  const __m512 inv = _mm512_set1_ps(1.0f / s);
  int8_t* out = static_cast<int8_t*>(dst);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mk = tail_mask(n - j);
    const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xr + j), inv),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_mask_storeu_epi8(out + j, mk, _mm512_cvtsepi32_epi8(q));
  }
  if (k_pad > n) std::memset(out + n, 0, static_cast<size_t>(k_pad - n));
}

void bf16_quantize_row(const float* xr, int64_t n, int64_t k_pad, void* dst, float* scale) {
  *scale = 1.0f;
  uint16_t* out = static_cast<uint16_t*>(dst);
  row_to_bf16(xr, n, out);
  if (k_pad > n) std::memset(out + n, 0, sizeof(uint16_t) * static_cast<size_t>(k_pad - n));
}

// out[m, n] = epilogue(sum_k A[m, k] W[n, k] * scales + bias[n]): the thread's 32-column blocks,
// rows in chunks of 128 (the chunk's activations stay in cache while the thread's columns pass).
template <bool Int8>
void tile_gemm(const LinearView& L, const void* a, int64_t lda, const float* a_scale, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1,
               Epilogue ep, float* out, int64_t ldo) {
  alignas(64) int32_t c[32 * 32];
  for (int64_t r0 = m0; r0 < m1; r0 += 128) {
    const int64_t r1 = ro_min(m1, r0 + 128);
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      for (int64_t mb = r0; mb < r1; mb += 32) {
        const int64_t n0 = nb * 32;
        if (Int8) {
          const int8_t* b0 = static_cast<const int8_t*>(L.w) + (2 * nb) * (L.k_pad / 64) * 1024;
          tile_block_32x32<true>(static_cast<const int8_t*>(a) + mb * lda, lda, 64, b0, b0 + (L.k_pad / 64) * 1024, 64, 1024, L.k_pad / 64,
                                 c, 128);
        } else {
          const uint16_t* b0 = static_cast<const uint16_t*>(L.w) + (2 * nb) * (L.k_pad / 32) * 512;
          tile_block_32x32<false>(static_cast<const uint16_t*>(a) + mb * lda, lda * 2, 64, b0, b0 + (L.k_pad / 32) * 512, 64, 1024,
                                  L.k_pad / 32, c, 128);
        }
        const int64_t m_end = ro_min(32, m1 - mb);
        for (int64_t half = 0; half < 2; ++half) {
          const int64_t n = n0 + half * 16;
          if (n >= L.out) break;
          const __mmask16 mk = tail_mask(L.out - n);
          const __m512 ws = _mm512_loadu_ps(L.scale + n);
          const __m512 bias = _mm512_loadu_ps(L.bias + n);
          for (int64_t i = 0; i < m_end; ++i) {
            const __m512i raw = _mm512_load_si512(c + i * 32 + half * 16);
            __m512 v = Int8 ? _mm512_cvtepi32_ps(raw) : _mm512_castsi512_ps(raw);
            v = _mm512_fmadd_ps(v, _mm512_mul_ps(ws, _mm512_set1_ps(Int8 ? a_scale[mb + i] : 1.0f)), bias);
            v = activate512(ep, v);
            _mm512_mask_storeu_ps(out + (mb + i) * ldo + n, mk, v);
          }
        }
      }
    }
  }
}

// ---- attention (BF16 tiles, fp32 softmax) -----------------------------------------------------
struct HeadScratch {
  uint16_t* q;   // [L32][dq] queries, bf16
  uint32_t* kt;  // [L32][dq/2] keys as bf16 pairs (before the transpose)
  uint32_t* kp;  // [dq/2][L32] the B operand of Q K^T
  uint32_t* vp;  // [L32/2][dv] the B operand of P V: pairs of keys
  float* s;      // [32][L32] scores
  uint16_t* pr;  // [32][L32] exp(score - max), bf16
  float* o;      // [32][dv]
};

// Carves the scratch (nullptr base: only sizes it); returns the bytes used.
size_t carve(void* base, int64_t max_len, int64_t d, HeadScratch* hs) {
  const int64_t L32 = ro_round_up(max_len, 32), dq = ro_round_up(d, 32);
  const size_t sizes[7] = {sizeof(uint16_t) * L32 * dq, sizeof(uint32_t) * L32 * dq / 2, sizeof(uint32_t) * dq / 2 * L32,
                           sizeof(uint32_t) * L32 / 2 * dq, sizeof(float) * 32 * L32, sizeof(uint16_t) * 32 * L32, sizeof(float) * 32 * dq};
  char* p = static_cast<char*>(base);
  size_t used = 0;
  void* parts[7];
  for (int i = 0; i < 7; ++i) {
    parts[i] = p + used;
    used += (sizes[i] + 63) / 64 * 64;
  }
  if (hs != nullptr) {
    hs->q = static_cast<uint16_t*>(parts[0]);
    hs->kt = static_cast<uint32_t*>(parts[1]);
    hs->kp = static_cast<uint32_t*>(parts[2]);
    hs->vp = static_cast<uint32_t*>(parts[3]);
    hs->s = static_cast<float*>(parts[4]);
    hs->pr = static_cast<uint16_t*>(parts[5]);
    hs->o = static_cast<float*>(parts[6]);
  }
  return used;
}

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
void attention_head(const float* qkv, int64_t H, int64_t row0, int64_t L, int64_t head, int64_t d, float* ctx, const HeadScratch& hs) {
  const int64_t L32 = ro_round_up(L, 32), dq = ro_round_up(d, 32), dv = dq;
  const HeadColumns col = head_columns(qkv, H, row0, head, d);
  uint16_t* q = hs.q;
  uint32_t* kt = hs.kt;
  uint32_t* kp = hs.kp;
  uint32_t* vp = hs.vp;
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
  const __m512 sc = _mm512_set1_ps(1.0f / __builtin_sqrtf(static_cast<float>(d)));
  float* s = hs.s;
  uint16_t* pr = hs.pr;
  float* o = hs.o;
  float inv_sum[32];
  for (int64_t q0 = 0; q0 < L; q0 += 32) {
    for (int64_t k0 = 0; k0 < L32; k0 += 32) {
      tile_block_32x32<false>(q + q0 * dq, dq * 2, 64, kp + k0, kp + k0 + 16, L32 * 4, 16 * L32 * 4, dq / 32, s + k0, L32 * 4);
    }
    const int64_t rows = ro_min(32, L - q0);
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



size_t bf16_attention_scratch(int64_t max_len, int64_t d) { return carve(nullptr, max_len, d, nullptr) + 64; }

void configure() { configure_tiles(); }
void release() { _tile_release(); }

}  // namespace
}  // namespace amx

namespace {
const IsaKernels* g_avx512 = nullptr;  // the AVX-512 table, for fp32 (set when the AMX table is built)

size_t amx_attention_scratch(Precision p, int64_t max_len, int64_t d) {
  if (p == Precision::kFp32) return g_avx512->attention_scratch_bytes(p, max_len, d);
  return amx::bf16_attention_scratch(max_len, d);
}

void amx_attention(Precision p, const AttentionArgs& g) {
  if (p == Precision::kFp32) return g_avx512->attention(p, g);
  amx::HeadScratch hs;
  amx::carve(g.scratch, g.length, g.head_dim, &hs);
  amx::attention_head(g.qkv, g.hidden, g.row0, g.length, g.head, g.head_dim, g.ctx, hs);
}
}  // namespace

const IsaKernels& amx_kernels() {
  static const IsaKernels kernels = [] {
    const IsaKernels& avx512 = avx512_kernels(true);
    g_avx512 = &avx512;
    IsaKernels k = avx512;  // fp32 and LayerNorm: the AVX-512 (bf16) path
    k.isa = Isa::kAmx;
    k.name = "amx";
    k.gemm[static_cast<int>(Precision::kInt8)] = amx::ro_gemm_kernel(64, 32, 32, false, 1, amx::i8_packed_bytes, amx::i8_pack, amx::i8_quantize_row, amx::tile_gemm<true>);
    k.gemm[static_cast<int>(Precision::kBf16)] = amx::ro_gemm_kernel(32, 32, 32, false, 2, amx::bf16_packed_bytes, amx::bf16_pack, amx::bf16_quantize_row, amx::tile_gemm<false>);
    k.linear_desc[static_cast<int>(Precision::kInt8)] = "int8 on AMX tiles (per-token activation, per-channel weight scales)";
    k.linear_desc[static_cast<int>(Precision::kBf16)] = "bf16 on AMX tiles";
    k.attention_desc[static_cast<int>(Precision::kInt8)] = "bf16 AMX tiles, fp32 softmax";
    k.attention_desc[static_cast<int>(Precision::kBf16)] = "bf16 AMX tiles, fp32 softmax";
    k.attention_scratch_bytes = amx_attention_scratch;
    k.attention = amx_attention;
    k.thread_begin = amx::configure;
    k.thread_end = amx::release;
    return k;
  }();
  return kernels;
}

}  // namespace encoder
}  // namespace spanrt
