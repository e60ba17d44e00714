// What this CPU can run, read once from CPUID / XCR0 (x86-64) or the auxiliary vector's HWCAPs
// (AArch64), and the choice of the native encoder's ISA path. Portable code: it runs, and says no,
// on any CPU, before any ISA-specific kernel is called.
#pragma once

#include <string>
#include <vector>

#include "microkernels.h"

namespace spanrt {
namespace encoder {

struct CpuFeatures {
  std::string arch;         // "x86_64", "aarch64" or another
  bool avx2 = false;        // AVX2 + FMA + F16C, with the OS saving ymm state
  bool avx_vnni = false;    // AVX-VNNI (vpdpbusd on ymm)
  bool avx512 = false;      // AVX-512 F, BW, DQ, VL, with the OS saving zmm state
  bool avx512_vnni = false;
  bool avx512_bf16 = false;
  bool amx = false;         // AMX-TILE, AMX-INT8, AMX-BF16 in CPUID
  bool amx_granted = false; // Linux granted this process the AMX tile state (arch_prctl)
  std::string amx_reason;   // why the AMX path cannot run, when it cannot
  bool neon = false;        // AArch64 Advanced SIMD
  bool neon_dot = false;    // sdot/udot (FEAT_DotProd)
  bool neon_i8mm = false;   // smmla (FEAT_I8MM)
  bool neon_bf16 = false;   // FEAT_BF16
};

// Read once per process (the AMX permission is asked for then).
const CpuFeatures& cpu_features();

const char* isa_name(Isa isa);
// false for an unknown name.
bool parse_isa(const std::string& name, Isa* isa);
// Every path this build knows on this architecture, best first (whether or not the CPU runs it).
std::vector<Isa> known_isas();
// The paths this CPU runs, best first (generic is always last).
std::vector<Isa> runnable_isas();
// Why `isa` cannot run here ("" when it can).
std::string isa_unavailable_reason(Isa isa);
// The kernels of a path this CPU runs (variants such as AVX-512 BF16 or AVX-VNNI chosen by the CPU).
const IsaKernels& kernels_for(Isa isa);

}  // namespace encoder
}  // namespace spanrt
