// engine._encoder: the native encoder (spanrt/encoder.h) bound to Python, with the CPU probe and the
// instruction-set paths. Importable on every CPU: this file and the layer code are compiled for the
// baseline of the target, and each ISA's kernels run only where the CPU has them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cpu_features.h"
#include "spanrt/encoder.h"

namespace py = pybind11;

namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

int64_t config_int(const py::dict& config, const char* key) {
  if (!config.contains(key)) throw py::value_error(std::string("native encoder config lacks '") + key + "'");
  return config[key].cast<int64_t>();
}

std::unique_ptr<spanrt::Encoder> make_encoder(const py::dict& config, const py::dict& weights, const std::string& precision,
                                              int threads, const std::string& isa) {
  spanrt::EncoderConfig c;
  c.vocab_size = config_int(config, "vocab_size");
  c.max_positions = config_int(config, "max_positions");
  c.type_vocab_size = config_int(config, "type_vocab_size");
  c.embedding_size = config_int(config, "embedding_size");
  c.hidden = config_int(config, "hidden_size");
  c.layers = config_int(config, "num_layers");
  c.heads = config_int(config, "num_heads");
  c.intermediate = config_int(config, "intermediate_size");
  c.position_offset = config_int(config, "position_offset");
  if (!config.contains("layer_norm_eps")) throw py::value_error("native encoder config lacks 'layer_norm_eps'");
  c.layer_norm_eps = config["layer_norm_eps"].cast<float>();
  const std::string activation = config.contains("activation") ? config["activation"].cast<std::string>() : "gelu";
  if (activation != "gelu" && activation != "gelu_tanh") {
    throw py::value_error("native encoder activation must be 'gelu' (exact) or 'gelu_tanh', got '" + activation + "'");
  }
  c.gelu_tanh = activation == "gelu_tanh";
  spanrt::LinearPrecision p;
  if (precision == "int8") {
    p = spanrt::LinearPrecision::kInt8;
  } else if (precision == "bf16") {
    p = spanrt::LinearPrecision::kBf16;
  } else if (precision == "fp32") {
    p = spanrt::LinearPrecision::kFp32;
  } else {
    throw py::value_error("native encoder precision must be 'int8', 'bf16' or 'fp32', got '" + precision + "'");
  }
  std::vector<F32> keep;  // float32 copies alive until the encoder has packed them
  spanrt::WeightMap map;
  for (auto item : weights) {
    F32 a = F32::ensure(item.second);
    if (!a) throw py::type_error("native encoder weight '" + item.first.cast<std::string>() + "' is not a float array");
    spanrt::TensorView view;
    view.data = a.data();
    for (py::ssize_t i = 0; i < a.ndim(); ++i) view.shape.push_back(a.shape(i));
    map.emplace(item.first.cast<std::string>(), std::move(view));
    keep.push_back(std::move(a));
  }
  try {
    return std::make_unique<spanrt::Encoder>(c, map, p, threads, isa);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }  // std::runtime_error (a path or precision this CPU cannot run) becomes RuntimeError
}

py::tuple forward(const spanrt::Encoder& encoder, const I64& ids, const I64& mask, const std::optional<I64>& types) {
  if (ids.ndim() != 2) throw py::value_error("input_ids must be 2-D [batch, seq]");
  const int64_t batch = ids.shape(0), seq = ids.shape(1);
  if (mask.ndim() != 2 || mask.shape(0) != batch || mask.shape(1) != seq) {
    throw py::value_error("attention_mask must have the shape of input_ids");
  }
  if (types && (types->ndim() != 2 || types->shape(0) != batch || types->shape(1) != seq)) {
    throw py::value_error("token_type_ids must have the shape of input_ids");
  }
  F32 start({batch, seq}), end({batch, seq});
  const int64_t* tp = types ? types->data() : nullptr;
  float* s = start.mutable_data();
  float* e = end.mutable_data();
  std::string error;
  {
    py::gil_scoped_release release;
    try {
      encoder.forward(ids.data(), mask.data(), tp, batch, seq, s, e);
    } catch (const std::invalid_argument& err) {
      error = err.what();
    }
  }
  if (!error.empty()) throw py::value_error(error);
  return py::make_tuple(start, end);
}



py::dict cpu_features() {
  const auto& f = spanrt::encoder::cpu_features();
  py::dict d;
  d["arch"] = f.arch;
  d["avx2"] = f.avx2;
  d["avx_vnni"] = f.avx_vnni;
  d["avx512"] = f.avx512;
  d["avx512_vnni"] = f.avx512_vnni;
  d["avx512_bf16"] = f.avx512_bf16;
  d["amx"] = f.amx;
  d["amx_granted"] = f.amx_granted;
  d["neon"] = f.neon;
  d["neon_dot"] = f.neon_dot;
  d["neon_i8mm"] = f.neon_i8mm;
  d["neon_bf16"] = f.neon_bf16;
  return d;
}

std::vector<std::string> names(const std::vector<spanrt::encoder::Isa>& isas) {
  std::vector<std::string> out;
  for (auto i : isas) out.emplace_back(spanrt::encoder::isa_name(i));
  return out;
}

// (isa -> reason it cannot run here, "" when it can) for every path of this build, best first.
std::vector<std::pair<std::string, std::string>> isa_status() {
  std::vector<std::pair<std::string, std::string>> out;
  for (auto i : spanrt::encoder::known_isas()) out.emplace_back(spanrt::encoder::isa_name(i), spanrt::encoder::isa_unavailable_reason(i));
  return out;
}

// The precisions a path computes on this CPU (it must be runnable).
std::vector<std::string> isa_precisions(const std::string& name) {
  spanrt::encoder::Isa isa;
  if (!spanrt::encoder::parse_isa(name, &isa)) throw py::value_error("unknown instruction-set path '" + name + "'");
  if (!spanrt::encoder::isa_unavailable_reason(isa).empty()) return {};
  const auto& k = spanrt::encoder::kernels_for(isa);
  std::vector<std::string> out;
  const char* pn[3] = {"int8", "bf16", "fp32"};
  for (int p = 0; p < 3; ++p)
    if (k.gemm[p].gemm != nullptr) out.emplace_back(pn[p]);
  return out;
}

}  // namespace

PYBIND11_MODULE(_encoder, m) {
  m.doc() = "SpanRT's native encoder (INT8/BF16/FP32) with run-time instruction-set paths. Use engine.backends.native.";
  m.def("cpu_features", &cpu_features, "What this CPU (and OS) offers the encoder: AVX2, AVX-VNNI, AVX-512 VNNI/BF16, AMX, NEON dot/i8mm.");
  m.def("known_isas", [] { return names(spanrt::encoder::known_isas()); }, "Every path of this build, best first.");
  m.def("runnable_isas", [] { return names(spanrt::encoder::runnable_isas()); }, "The paths this CPU runs, best first.");
  m.def("isa_status", &isa_status, "[(path, reason it cannot run here or '')] for every path of this build, best first.");
  m.def("isa_precisions", &isa_precisions, py::arg("isa"), "The precisions a runnable path computes here (empty if it cannot run).");
  py::class_<spanrt::Encoder>(m, "Encoder")
      .def(py::init(&make_encoder), py::arg("config"), py::arg("weights"), py::arg("precision"), py::arg("threads"), py::arg("isa") = "",
           "Pack the float32 weights (names in spanrt/encoder.h) for the path `isa` ('' = the best here).\n"
           "ValueError: bad weights/config or an unknown path; RuntimeError: a path or precision this CPU cannot run.")
      .def("forward", &forward, py::arg("input_ids"), py::arg("attention_mask"), py::arg("token_type_ids") = py::none(),
           "(start_logits, end_logits) float32 [batch, seq]; -10000 past each window's length. GIL released.")
      .def_property_readonly("precision", [](const spanrt::Encoder& e) {
        switch (e.precision()) {
          case spanrt::LinearPrecision::kInt8: return "int8";
          case spanrt::LinearPrecision::kBf16: return "bf16";
          default: return "fp32";
        }
      })
      .def_property_readonly("threads", &spanrt::Encoder::threads)
      .def_property_readonly("isa", &spanrt::Encoder::isa)
      .def_property_readonly("linear_layers", &spanrt::Encoder::linear_layers)
      .def_property_readonly("attention", &spanrt::Encoder::attention);
}
