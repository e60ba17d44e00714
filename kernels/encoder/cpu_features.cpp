// CPU feature probe and ISA choice for the native encoder (see cpu_features.h). Compiled with the
// baseline flags of the target: no instruction here needs more than the CPU the build targets.
#include "cpu_features.h"

#include <cerrno>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace spanrt {
namespace encoder {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
bool bit(unsigned v, int b) { return ((v >> b) & 1u) != 0; }

void probe_x86(CpuFeatures& f) {
  f.arch = "x86_64";
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d)) return;
  const bool osxsave = bit(c, 27), fma = bit(c, 12), f16c = bit(c, 29), avx = bit(c, 28);
  unsigned xcr0 = 0;
  if (osxsave) {
    unsigned hi = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0), "=d"(hi) : "c"(0));
  }
  const bool ymm_state = (xcr0 & 0x6u) == 0x6u;       // SSE + AVX state
  const bool zmm_state = (xcr0 & 0xE6u) == 0xE6u;     // + opmask, ZMM_Hi256, Hi16_ZMM
  const bool tile_state = (xcr0 & 0x60000u) == 0x60000u;  // XTILECFG + XTILEDATA (may be granted on request)
  unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0, a71 = 0, b71 = 0, c71 = 0, d71 = 0;
  if (!__get_cpuid_count(7, 0, &a7, &b7, &c7, &d7)) return;
  __get_cpuid_count(7, 1, &a71, &b71, &c71, &d71);
  f.avx2 = avx && fma && f16c && ymm_state && bit(b7, 5);
  f.avx_vnni = f.avx2 && bit(a71, 4);
  f.avx512 = f.avx2 && zmm_state && bit(b7, 16) && bit(b7, 17) && bit(b7, 30) && bit(b7, 31);
  f.avx512_vnni = f.avx512 && bit(c7, 11);
  f.avx512_bf16 = f.avx512 && bit(a71, 5);
  f.amx = bit(d7, 22) && bit(d7, 24) && bit(d7, 25);
  if (!f.amx) {
    f.amx_reason = "this CPU has no AMX (AMX-TILE, AMX-INT8, AMX-BF16: Intel Xeon Sapphire Rapids or newer)";
  } else if (!f.avx512_bf16) {
    f.amx_reason = "the AMX path also needs AVX-512 BF16 with the OS saving zmm state";
  } else {
#if defined(__linux__)
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) != 0) {
      f.amx_reason = std::string("Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM: ") + std::strerror(errno) +
                     "; Linux 5.16 or newer grants it)";
    } else {
      f.amx_granted = true;
    }
#else
    (void)tile_state;
    f.amx_reason = "the AMX path is enabled on Linux only (the tile state must be requested from the OS)";
#endif
  }
  (void)tile_state;
}
#endif

#if defined(__aarch64__)
void probe_arm(CpuFeatures& f) {
  f.arch = "aarch64";
  f.neon = true;  // Advanced SIMD is mandatory in AArch64
#if defined(__linux__)
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  f.neon_dot = (hw & (1ul << 20)) != 0;    // HWCAP_ASIMDDP
  f.neon_i8mm = (hw2 & (1ul << 13)) != 0;  // HWCAP2_I8MM
  f.neon_bf16 = (hw2 & (1ul << 14)) != 0;  // HWCAP2_BF16
#elif defined(__APPLE__)
  f.neon_dot = true;  // every Apple M-series core has FEAT_DotProd
#endif
}
#endif

CpuFeatures probe() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
  probe_x86(f);
#elif defined(__aarch64__)
  probe_arm(f);
#else
  f.arch = "other";
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = probe();
  return f;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx2Vnni: return "avx2_vnni";
    case Isa::kAvx2: return "avx2";
    case Isa::kNeon: return "neon";
    case Isa::kNeonI8mm: return "neon_i8mm";
    default: return "generic";
  }
}

bool parse_isa(const std::string& name, Isa* isa) {
  for (Isa i : {Isa::kAmx, Isa::kAvx512Bf16, Isa::kAvx512Vnni, Isa::kAvx2Vnni, Isa::kAvx2, Isa::kNeonI8mm, Isa::kNeon, Isa::kGeneric}) {
    if (name == isa_name(i)) {
      *isa = i;
      return true;
    }
  }
  return false;
}

std::vector<Isa> known_isas() {
#if defined(__x86_64__) || defined(_M_X64)
  return {Isa::kAmx, Isa::kAvx512Bf16, Isa::kAvx512Vnni, Isa::kAvx2Vnni, Isa::kAvx2, Isa::kGeneric};
#elif defined(__aarch64__)
  return {Isa::kNeonI8mm, Isa::kNeon, Isa::kGeneric};
#else
  return {Isa::kGeneric};
#endif
}

std::string isa_unavailable_reason(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::kGeneric: return "";
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAmx: return f.amx_granted ? "" : f.amx_reason;
    case Isa::kAvx512Bf16:
      return f.avx512_vnni && f.avx512_bf16 ? "" : "this CPU (or its OS) lacks AVX-512 VNNI with AVX512_BF16 (AMD Zen 4 or newer, Intel Cooper Lake / Sapphire Rapids)";
    case Isa::kAvx512Vnni:
      return f.avx512_vnni ? "" : "this CPU (or its OS) lacks AVX-512 F/BW/DQ/VL with VNNI (Intel Cascade Lake or newer, AMD Zen 4 or newer)";
    case Isa::kAvx2Vnni: return f.avx_vnni ? "" : "this CPU (or its OS) lacks AVX-VNNI (Intel Alder Lake or newer client chips, AMD Zen 5)";
    case Isa::kAvx2: return f.avx2 ? "" : "this CPU (or its OS) lacks AVX2 with FMA and F16C";
    case Isa::kNeon:
    case Isa::kNeonI8mm: return std::string("the ") + isa_name(isa) + " path is built for AArch64 CPUs only (this is x86-64)";
    default: return "unknown path";
#elif defined(__aarch64__)
    case Isa::kNeonI8mm:
      return f.neon_dot && f.neon_i8mm ? "" : "this CPU lacks the int8 matrix-multiply instructions (FEAT_I8MM: smmla) with FEAT_DotProd";
    case Isa::kNeon: return f.neon_dot ? "" : "this CPU lacks the NEON dot-product instructions (FEAT_DotProd: sdot/udot)";
    default: return std::string("the ") + isa_name(isa) + " path is built for x86-64 CPUs only (this is AArch64)";
#else
    default: return std::string("the ") + isa_name(isa) + " path is not built for this architecture";
#endif
  }
}

std::vector<Isa> runnable_isas() {
  std::vector<Isa> out;
  for (Isa i : known_isas())
    if (isa_unavailable_reason(i).empty()) out.push_back(i);
  return out;
}

const IsaKernels& kernels_for(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAmx: return amx_kernels();
    case Isa::kAvx512Bf16: return avx512_kernels(true);
    case Isa::kAvx512Vnni: return avx512_kernels(false);
    case Isa::kAvx2Vnni: return avx2_kernels(true);
    case Isa::kAvx2: return avx2_kernels(false);
#endif
#if defined(__aarch64__)
    case Isa::kNeonI8mm: return neon_kernels(true);
    case Isa::kNeon: return neon_kernels(false);
#endif
    default: (void)f; return generic_kernels();
  }
}

}  // namespace encoder
}  // namespace spanrt
