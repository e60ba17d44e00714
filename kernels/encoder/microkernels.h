// The native encoder's per-ISA micro-kernel interface (XNNPACK/ggml style).
//
// The layer code (encoder.cpp: embeddings, the layer loop, attention scheduling, LayerNorm calls,
// the thread team) is written once and compiled for the baseline CPU. Everything that needs an
// instruction set lives in one file per ISA (isa_*.cpp, each compiled with its own flags), behind
// the plain function pointers of `IsaKernels`. Each ISA file keeps its code in a namespace of its
// own and uses no inline function shared with other files, so that no AVX-512 copy of a shared
// inline function can be picked by the linker for the baseline code.
//
// The ISA files look alike on purpose (`duplicates` pairs them by shape): each writes the same block
// structure (named accumulators, epilogue, tail rows) in its own instruction set's intrinsics; what
// is not ISA-specific (the GEMM's loop over rows and column blocks, table entries, packing, row
// math) is written once in rowops.inc / f32ops.inc and included into each file's namespace.
//
// Numerics shared by every path (so that paths agree with each other):
//   int8: weights quantized once, symmetric, one scale per output channel (encoder.cpp does it,
//         the same for every ISA); activations quantized per token (row), symmetric, scale
//         amax/127, round half to even; int32 sums, exact. Kernels built on u8 x s8 products
//         (vpdpbusd) store activations as q + 128 and subtract 128 * (column sum of the weights),
//         precomputed at packing: the int32 result is the same as s8 x s8.
//   bf16: weights and activations rounded to nearest even, fp32 sums.
//   fp32: plain fp32 (FMA where the ISA has it).
#pragma once

#include <cstddef>
#include <cstdint>

namespace spanrt {
namespace encoder {

// The paths, as oneDNN names its ISAs: each one is a cap that also runs on every CPU above it.
enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx2Vnni = 2, kAvx512Vnni = 3, kAvx512Bf16 = 4, kAmx = 5, kNeon = 6, kNeonI8mm = 7 };
enum class Precision : int { kInt8 = 0, kBf16 = 1, kFp32 = 2 };
// GELU exact (erf) or its tanh approximation; kBiasBf16: bias, then the rows are written as bf16
// (uint16_t, round to nearest even) instead of fp32 -- the QKV matrix of a path whose attention
// reads bf16 (IsaKernels::attention_bf16_input); only the GEMMs of such paths are given it.
enum class Epilogue : int { kBias = 0, kBiasGelu = 1, kBiasGeluTanh = 2, kBiasBf16 = 3 };

constexpr float kMaskedLogit = -10000.0f;

// A packed linear layer as the kernels see it (storage is owned by encoder.cpp).
struct LinearView {
  int64_t in, out;  // logical sizes (PyTorch Linear: weight [out, in])
  int64_t k_pad;        // in, rounded up to the kernel's k_step
  int64_t n_pad;        // out, rounded up to the kernel's n_block
  const void* w;  // the kernel's own layout
  const int32_t* comp;  // int8 u8-kernels: 128 * sum_k w[n, k] per column (else unused)
  const float* scale;   // int8: per output channel; else ones
  const float* bias;    // [n_pad] (zero past out); may be null (attention products)
};

// One precision's GEMM on one ISA: out[m, n] = epilogue(sum_k A[m, k] W[n, k] * scales + bias[n]).
struct GemmKernel {
  int64_t k_step;   // K is padded to a multiple of this
  int64_t n_block;  // columns per block: threads split a layer's columns in whole blocks
  int64_t m_step;   // activation rows are allocated in multiples of this (AMX tiles read 32 rows)
  bool act_u8;  // int8: activations stored as q + 128 (u8) instead of q (s8)
  size_t act_bytes; // bytes per activation element (1 int8, 2 bf16, 4 fp32)
  // Bytes of packed weights for (n_pad, k_pad).
  size_t (*packed_bytes)(int64_t n_pad, int64_t k_pad);
  // Packs `out` rows of `in` weights (int8: int8_t, already quantized; bf16/fp32: float) into dst
  // (zeroed by the caller, packed_bytes long); int8 u8-kernels also fill comp[n_pad].
  void (*pack)(const void* src, int64_t out, int64_t in, int64_t k_pad, int64_t n_pad, void* dst, int32_t* comp);
  // One row of n floats as this kernel's activations (k_pad elements, zero past n); int8 writes
  // its scale to *scale. Null for fp32 (the GEMM reads the fp32 rows).
  void (*quantize_row)(const float* x, int64_t n, int64_t k_pad, void* out, float* scale);
  // Rows [m0, m1) x column blocks [nb0, nb1). a: activations, row stride lda elements;
  // a_scale: per row (int8) or null. out row stride ldo elements (floats; uint16_t for kBiasBf16,
  // out then points at bf16 rows).
  void (*gemm)(const LinearView& L, const void* a, int64_t lda, const float* a_scale, int64_t m0, int64_t m1, int64_t nb0,
               int64_t nb1, Epilogue ep, float* out, int64_t ldo);
};

// Every struct here is a plain aggregate (no default member initialisers, no constructors): ISA
// files fill zero-initialised statics, and no inline constructor is compiled with ISA flags.

// Scratch space for one head of attention (sized by the ISA, allocated by encoder.cpp).
struct AttentionArgs {
  const float* qkv;  // [rows, 3H]: Q | K | V columns, heads d wide (null when qkv_bf16 is given)
  int64_t hidden;    // H
  int64_t row0;      // the window's first row
  int64_t length;    // L tokens
  int64_t head;
  int64_t head_dim;  // d
  float* ctx;        // [rows, H]: ctx[t, head*d : head*d + d] is written
  void* scratch;     // attention_scratch_bytes(L, d) bytes, 64-byte aligned, reused
  const uint16_t* qkv_bf16;  // the same matrix in bf16 where attention_bf16_input[p] (else null)
};

struct IsaKernels {
  Isa isa;
  const char* name;
  GemmKernel gemm[3];       // by Precision; gemm[p].gemm == nullptr: precision not computed here
  const char* linear_desc[3];     // how each precision's linear layers run
  const char* attention_desc[3];  // how attention runs at each precision
  // By precision: the QKV GEMM writes bf16 (Epilogue::kBiasBf16) and attention reads qkv_bf16,
  // so attention on bf16 operands needs no conversion pass over the fp32 matrix.
  bool attention_bf16_input[3];
  // Softmax(QK^T / sqrt d) V for one window and head, at the layer precision's attention.
  size_t (*attention_scratch_bytes)(Precision p, int64_t max_len, int64_t d);
  void (*attention)(Precision p, const AttentionArgs& args);
  // x[0:n] = LayerNorm(x + add) * gamma + beta (add may be null), in place.
  void (*add_layer_norm)(float* x, const float* add, int64_t n, const float* gamma, const float* beta, float eps);
  // Per-thread set-up/tear-down inside a parallel region (AMX tile configuration); may be null.
  void (*thread_begin)();
  void (*thread_end)();
};

// The kernels of each ISA (defined in its file; absent from builds for other architectures).
const IsaKernels& generic_kernels();
#if defined(__x86_64__) || defined(_M_X64)
const IsaKernels& avx2_kernels(bool vnni);          // "avx2": int8 by int16 vpmaddwd; "avx2_vnni": by vpdpbusd ymm (AVX-VNNI)
const IsaKernels& avx512_kernels(bool bf16);        // "avx512_vnni"; "avx512_bf16": + bf16 GEMMs and bf16 attention
const IsaKernels& amx_kernels();                    // AMX-INT8/BF16 tiles + AVX-512 BF16
#endif
#if defined(__aarch64__)
const IsaKernels& neon_kernels(bool i8mm);          // "neon": int8 by sdot; "neon_i8mm": by smmla
#endif

}  // namespace encoder
}  // namespace spanrt
