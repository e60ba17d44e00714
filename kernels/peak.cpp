// engine._peak: this CPU's int8 and fp32 arithmetic peak, measured in a few seconds by a loop of
// multiply-add instructions on every thread. The bench sets each system's model throughput
// against it ("what share of the machine does the model use?").
//
// How operations are counted: one multiply-add is 2 operations (a multiply and an add), the
// convention of GEMM FLOP counts (2*M*N*K), so a model's operations per token are counted the
// same way. Per instruction:
//   int8  avx512_vnni   vpdpbusd zmm                 16 lanes x 4 u8*s8 products = 64 MACs = 128 ops
//   int8  avx_vnni      vpdpbusd ymm (VEX)            8 lanes x 4                 = 32 MACs =  64 ops
//   int8  avx2          vpmaddubsw + vpmaddwd + vpaddd on ymm, the AVX2 int8 dot product
//                       (3 instructions for 32 u8*s8 products)                    = 32 MACs =  64 ops
//   int8  neon_dotprod  sdot v.4s                     4 lanes x 4 s8*s8 products  = 16 MACs =  32 ops
//   fp32  avx512f       vfmadd231ps zmm              16 FMAs                                 =  32 ops
//   fp32  avx2_fma      vfmadd231ps ymm               8 FMAs                                 =  16 ops
//   fp32  neon          fmla v.4s                     4 FMAs                                 =   8 ops
// Each kernel keeps kChains independent accumulators (more than latency x ports needs on the
// CPUs we know), so the loop is bound by the multiply-add units, not by a dependency chain.
//
// Every kernel is compiled with a function-level target attribute, so the module is built
// without ISA flags, imports on any x86-64 or aarch64 CPU, and runs a kernel only when CPUID
// (x86-64) or the hardware capabilities (aarch64 Linux) say the CPU and OS support it.
// AMX (tdpbusd) is not measured: on a CPU with AMX the int8 peak reported is AVX-512 VNNI's.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define SPANRT_PEAK_X86 1
#include <cpuid.h>
#include <immintrin.h>
#elif defined(__aarch64__)
#define SPANRT_PEAK_ARM64 1
#include <arm_neon.h>
#if defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif
#endif

namespace py = pybind11;

namespace spanrt {
namespace peak {
namespace {

constexpr int kChains = 12;  // independent accumulators per kernel

// One kernel: `iterations` rounds of its multiply-add instructions on `seed`'s 128 bytes;
// returns a value derived from the accumulators so that the compiler keeps the work.
using KernelFn = int64_t (*)(int64_t iterations, const uint8_t* seed);

struct Kernel {
  const char* kind;   // "int8" or "fp32"
  const char* isa;    // the name peak_ops takes and returns
  double ops_per_instruction;  // AVX2 int8: per vpmaddubsw + vpmaddwd + vpaddd group
  int instructions_per_iteration;
  KernelFn run;
  bool (*supported)();
};

// The loops are inline assembly over named register operands: the compiler chooses the
// registers but cannot spill the accumulators, reorder, merge or drop the instructions, so the
// loop runs exactly the instructions counted above (intrinsics over an array of accumulators
// made GCC 12 spill them to the stack in the 256-bit kernels).
// "v": any vector register the function's ISA can encode (x86-64: XMM/YMM 0-15 under AVX2,
// 0-31 under AVX-512; "w": v0-v31 on AArch64).
#if defined(SPANRT_PEAK_ARM64)
#define SPANRT_VREG(x) "w"(x)
#else
#define SPANRT_VREG(x) "v"(x)
#endif
#define SPANRT_X12(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
#define SPANRT_X6(M) M(0) M(1) M(2) M(3) M(4) M(5)
#define SPANRT_DECLARE(i) V c##i = zero;
#define SPANRT_OPERAND(i) [c##i] "+" SPANRT_VREG(c##i),
#define SPANRT_SUM(i) sum += lane0(c##i);
// The body of a kernel with 12 accumulators: INSN(i) is the assembly of one multiply-add into
// accumulator i from the inputs a and b (declared by the caller, with the zero of their type).
#define SPANRT_LOOP12(INSN, SUM)                                                                  \
  SPANRT_X12(SPANRT_DECLARE)                                                                      \
  for (int64_t i = 0; i < iterations; ++i) {                                                      \
    __asm__ volatile(SPANRT_X12(INSN) : SPANRT_X12(SPANRT_OPERAND)[unused] "+r"(i)                \
                     : [a] SPANRT_VREG(a), [b] SPANRT_VREG(b));                                   \
  }                                                                                               \
  int64_t sum = 0;                                                                                \
  SPANRT_X12(SUM)                                                                                 \
  return sum;

template <typename V>
int64_t lane0(const V& v) {
  int32_t first;
  std::memcpy(&first, &v, sizeof first);
  return first;
}

#define SPANRT_SUMF(i) sum += static_cast<int64_t>(1e3f * first_float(c##i));
template <typename V>
float first_float(const V& v) {
  float first;
  std::memcpy(&first, &v, sizeof first);
  return first;
}

#if defined(SPANRT_PEAK_X86)

struct Cpuid {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Cpuid cpuid(unsigned leaf, unsigned sub) {
  Cpuid r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) return Cpuid{};
  return r;
}

// The register state the OS saves (XCR0): bits 1-2 for YMM, 5-7 in addition for ZMM.
uint64_t xcr0() {
  if (!((cpuid(1, 0).c >> 27) & 1u)) return 0;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
bool os_ymm() { return (xcr0() & 0x6u) == 0x6u; }
bool os_zmm() { return (xcr0() & 0xE6u) == 0xE6u; }
bool has_avx2() { return os_ymm() && ((cpuid(7, 0).b >> 5) & 1u); }
bool has_avx2_fma() { return has_avx2() && ((cpuid(1, 0).c >> 12) & 1u); }
bool has_avx512f() { return os_zmm() && ((cpuid(7, 0).b >> 16) & 1u); }
bool has_avx512_vnni() { return has_avx512f() && ((cpuid(7, 0).c >> 11) & 1u); }
bool has_avx_vnni() { return has_avx2() && ((cpuid(7, 1).a >> 4) & 1u); }

// AVX-512 VNNI's EVEX encoding, and AVX-VNNI's VEX one of the same instruction on YMM registers.
#define SPANRT_DPBUSD_EVEX(i) "vpdpbusd %[b], %[a], %[c" #i "]\n\t"
#define SPANRT_DPBUSD_VEX(i) "%{vex%} vpdpbusd %[b], %[a], %[c" #i "]\n\t"
__attribute__((target("avx512f,avx512vnni"))) int64_t int8_avx512_vnni(int64_t iterations, const uint8_t* seed) {
  using V = __m512i;
  const V a = _mm512_loadu_si512(seed), b = _mm512_loadu_si512(seed + 64), zero = _mm512_setzero_si512();
  SPANRT_LOOP12(SPANRT_DPBUSD_EVEX, SPANRT_SUM)
}

__attribute__((target("avx2,avxvnni"))) int64_t int8_avx_vnni(int64_t iterations, const uint8_t* seed) {
  using V = __m256i;
  const V a = _mm256_loadu_si256(reinterpret_cast<const V*>(seed)), b = _mm256_loadu_si256(reinterpret_cast<const V*>(seed + 32));
  const V zero = _mm256_setzero_si256();
  SPANRT_LOOP12(SPANRT_DPBUSD_VEX, SPANRT_SUM)
}
#undef SPANRT_DPBUSD_EVEX
#undef SPANRT_DPBUSD_VEX

// AVX2 has no int8 dot-product instruction: u8*s8 pairs to int16 (vpmaddubsw), int16 pairs to
// int32 (vpmaddwd with ones), then the add; 32 multiply-adds per three instructions. Six chains,
// each with its own temporary, fill the 16 YMM registers.
#define SPANRT_TEMP(i) [t##i] "=&x"(t##i),
#define SPANRT_MADD(i) "vpmaddubsw %[b], %[a], %[t" #i "]\n\t" "vpmaddwd %[ones], %[t" #i "], %[t" #i "]\n\t" \
                       "vpaddd %[t" #i "], %[c" #i "], %[c" #i "]\n\t"
__attribute__((target("avx2"))) int64_t int8_avx2(int64_t iterations, const uint8_t* seed) {
  using V = __m256i;
  const V a = _mm256_loadu_si256(reinterpret_cast<const V*>(seed)), b = _mm256_loadu_si256(reinterpret_cast<const V*>(seed + 32));
  const V ones = _mm256_set1_epi16(1), zero = _mm256_setzero_si256();
  SPANRT_X6(SPANRT_DECLARE)
  V t0, t1, t2, t3, t4, t5;
  for (int64_t i = 0; i < iterations; ++i) {
    __asm__ volatile(SPANRT_X6(SPANRT_MADD) : SPANRT_X6(SPANRT_OPERAND) SPANRT_X6(SPANRT_TEMP)[unused] "+r"(i)
                     : [a] "x"(a), [b] "x"(b), [ones] "x"(ones));
  }
  int64_t sum = 0;
  SPANRT_X6(SPANRT_SUM)
  return sum;
}
#undef SPANRT_TEMP
#undef SPANRT_MADD

// c = a * c + b (vfmadd213ps) with a just under 1: the accumulators converge to b / (1 - a),
// never to infinities or denormals (which are slow on some CPUs).
#define SPANRT_FMA(i) "vfmadd213ps %[b], %[a], %[c" #i "]\n\t"
__attribute__((target("avx512f"))) int64_t fp32_avx512f(int64_t iterations, const uint8_t* /*seed*/) {
  using V = __m512;
  const V a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-3f), zero = _mm512_setzero_ps();
  SPANRT_LOOP12(SPANRT_FMA, SPANRT_SUMF)
}

__attribute__((target("avx2,fma"))) int64_t fp32_avx2_fma(int64_t iterations, const uint8_t* /*seed*/) {
  using V = __m256;
  const V a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-3f), zero = _mm256_setzero_ps();
  SPANRT_LOOP12(SPANRT_FMA, SPANRT_SUMF)
}
#undef SPANRT_FMA

// Best first within each kind: the ISA chosen when none is named is the first one supported.
const Kernel kKernels[] = {
    {"int8", "avx512_vnni", 128.0, kChains, int8_avx512_vnni, has_avx512_vnni},
    {"int8", "avx_vnni", 64.0, kChains, int8_avx_vnni, has_avx_vnni},
    {"int8", "avx2", 64.0, 6, int8_avx2, has_avx2},
    {"fp32", "avx512f", 32.0, kChains, fp32_avx512f, has_avx512f},
    {"fp32", "avx2_fma", 16.0, kChains, fp32_avx2_fma, has_avx2_fma},
};

#elif defined(SPANRT_PEAK_ARM64)

bool has_dotprod() {
#if defined(__linux__) && defined(HWCAP_ASIMDDP)
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
  return true;  // every Apple silicon CPU has the dot-product extension
#else
  return false;
#endif
}
bool has_neon() { return true; }  // Advanced SIMD is mandatory on AArch64

// As on x86-64: inline assembly over named register operands ("w": any of v0-v31).
#define SPANRT_SDOT(i) "sdot %[c" #i "].4s, %[a].16b, %[b].16b\n\t"
#define SPANRT_FMLA(i) "fmla %[c" #i "].4s, %[a].4s, %[b].4s\n\t"
__attribute__((target("arch=armv8.2-a+dotprod"))) int64_t int8_neon_dotprod(int64_t iterations, const uint8_t* seed) {
  using V = int32x4_t;
  const int8x16_t a = vld1q_s8(reinterpret_cast<const int8_t*>(seed));
  const int8x16_t b = vld1q_s8(reinterpret_cast<const int8_t*>(seed + 16));
  const V zero = vdupq_n_s32(0);
  SPANRT_LOOP12(SPANRT_SDOT, SPANRT_SUM)
}

// c += a * b with a * b = 1e-6: the accumulators grow slowly, never to infinities.
int64_t fp32_neon(int64_t iterations, const uint8_t* /*seed*/) {
  using V = float32x4_t;
  const V a = vdupq_n_f32(1e-3f), b = vdupq_n_f32(1e-3f), zero = vdupq_n_f32(0.0f);
  SPANRT_LOOP12(SPANRT_FMLA, SPANRT_SUMF)
}
#undef SPANRT_SDOT
#undef SPANRT_FMLA

const Kernel kKernels[] = {
    {"int8", "neon_dotprod", 32.0, kChains, int8_neon_dotprod, has_dotprod},
    {"fp32", "neon", 8.0, kChains, fp32_neon, has_neon},
};

#endif

std::atomic<int64_t> g_sink{0};  // the kernels' results end here, so the compiler keeps the work

std::vector<const Kernel*> all_kernels() {
  std::vector<const Kernel*> out;
#if defined(SPANRT_PEAK_X86) || defined(SPANRT_PEAK_ARM64)
  for (const Kernel& k : kKernels) out.push_back(&k);
#endif
  return out;
}

void check_kind(const std::string& kind) {
  if (kind != "int8" && kind != "fp32") throw py::value_error("kind must be 'int8' or 'fp32', got '" + kind + "'");
}

// The ISAs of `kind` this CPU runs, best first.
std::vector<std::string> supported_isas(const std::string& kind) {
  check_kind(kind);
  std::vector<std::string> out;
  for (const Kernel* k : all_kernels()) {
    if (kind == k->kind && k->supported()) out.emplace_back(k->isa);
  }
  return out;
}

const Kernel& choose(const std::string& kind, const std::optional<std::string>& isa) {
  check_kind(kind);
  std::string known;
  for (const Kernel* k : all_kernels()) {
    if (kind != k->kind) continue;
    known += std::string(known.empty() ? "" : ", ") + k->isa;
    if (isa.has_value() && *isa != k->isa) continue;
    if (k->supported()) return *k;
    if (isa.has_value()) throw std::runtime_error(std::string("this CPU (or OS) cannot run the ") + k->isa + " " + kind + " kernel");
  }
  if (isa.has_value()) {
    throw py::value_error("no " + kind + " peak kernel named '" + *isa + "'; this build knows: " + (known.empty() ? "none" : known));
  }
  throw std::runtime_error("no " + kind + " peak kernel runs on this CPU (this build knows: " + (known.empty() ? "none" : known) + ")");
}

struct Measured {
  double ops_per_s;
  std::string isa;
};

// Seconds this thread has run on a CPU (POSIX); the wall clock where there is no such clock.
double thread_cpu_seconds() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts{};
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
#endif
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// All threads warm up (clocks, wide-vector power states) for a tenth of the time, meet, then loop
// for `seconds` of wall time. The peak is the sum over threads of each thread's operations over
// the CPU time it got: on an idle machine that is the operations over the wall time; on a busy
// one it is still the machine's peak, not the share of it other processes left us (the caller
// keeps threads <= CPUs, where every thread can have a CPU of its own).
Measured measure(const Kernel& kernel, int threads, double seconds) {
  using clock = std::chrono::steady_clock;
  constexpr int64_t kChunk = 1 << 14;  // iterations between clock reads: ~0.1-1 ms
  alignas(64) uint8_t seed[128];
  for (int i = 0; i < 128; ++i) seed[i] = static_cast<uint8_t>(1 + (i * 7) % 13);
  std::atomic<int> ready{0};
  std::vector<int64_t> iterations(threads, 0);
  std::vector<double> cpu_s(threads, 0.0);
  const auto warm = std::chrono::duration<double>(seconds / 10);
  const auto run_for = std::chrono::duration<double>(seconds);
  auto body = [&](int t) {
    int64_t keep = 0;
    const auto warm_end = clock::now() + warm;
    while (clock::now() < warm_end) keep += kernel.run(kChunk, seed);
    ready.fetch_add(1);
    while (ready.load() < threads) {
    }
    const auto t0 = clock::now();
    const double c0 = thread_cpu_seconds();
    int64_t n = 0;
    do {
      keep += kernel.run(kChunk, seed);
      n += kChunk;
    } while (clock::now() - t0 < run_for);
    cpu_s[t] = thread_cpu_seconds() - c0;
    iterations[t] = n;
    g_sink.fetch_add(keep);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(body, t);
  body(0);
  for (auto& th : pool) th.join();
  double ops_per_s = 0.0;
  for (int t = 0; t < threads; ++t) {
    ops_per_s += static_cast<double>(iterations[t]) * kernel.instructions_per_iteration * kernel.ops_per_instruction / cpu_s[t];
  }
  return {ops_per_s, kernel.isa};
}

// Every kernel this build has, for the tests and the curious: kind, isa, ops per instruction,
// instructions per loop iteration, and whether it runs here.
py::list kernel_table() {
  py::list out;
  for (const Kernel* k : all_kernels()) {
    py::dict row;
    row["kind"] = k->kind;
    row["isa"] = k->isa;
    row["ops_per_instruction"] = k->ops_per_instruction;
    row["instructions_per_iteration"] = k->instructions_per_iteration;
    row["supported"] = k->supported();
    out.append(row);
  }
  return out;
}

std::pair<double, std::string> peak_ops(const std::string& kind, const std::optional<std::string>& isa, int threads,
                                        double seconds) {
  if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
  if (!(seconds > 0.0 && seconds <= 60.0)) throw py::value_error("seconds must be in (0, 60], got " + std::to_string(seconds));
  const Kernel& kernel = choose(kind, isa);
  Measured m;
  {
    py::gil_scoped_release release;
    m = measure(kernel, threads, seconds);
  }
  return {m.ops_per_s, m.isa};
}

}  // namespace
}  // namespace peak
}  // namespace spanrt

PYBIND11_MODULE(_peak, m) {
  m.doc() = "This CPU's int8 and fp32 arithmetic peak (multiply-add loops on every thread). Use bench.peak.";
  m.def("peak_ops", &spanrt::peak::peak_ops, py::arg("kind"), py::kw_only(), py::arg("isa") = py::none(),
        py::arg("threads"), py::arg("seconds"),
        "(ops_per_s, isa): operations per second of a multiply-add loop of `kind` ('int8' or\n"
        "'fp32') on `threads` threads for `seconds` (after a warm-up of a tenth of that), one\n"
        "multiply-add counted as 2 operations, each thread's over the CPU time it got (so a busy\n"
        "machine still gives its peak; keep threads <= CPUs). isa: a name from supported_isas(kind); None takes\n"
        "the best this CPU runs. Raises ValueError (arguments) and RuntimeError (ISA not supported\n"
        "here). The GIL is released while it runs.");
  m.def("kernels", &spanrt::peak::kernel_table,
        "Every peak kernel of this build: [{kind, isa, ops_per_instruction, instructions_per_iteration,\n"
        "supported}], ops counted as 2 per multiply-add (AVX2 int8: per vpmaddubsw+vpmaddwd+vpaddd group).");
  m.def("supported_isas", &spanrt::peak::supported_isas, py::arg("kind"),
        "The ISAs of `kind` ('int8' or 'fp32') whose peak kernel runs on this CPU, best first.");
}
