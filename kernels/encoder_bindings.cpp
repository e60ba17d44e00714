// engine._encoder: the native AMX encoder (spanrt/encoder.h) bound to Python. Built with AVX-512
// and AMX code: import it only after engine._kernels.amx_status() said yes (the backend does).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

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
                                              int threads) {
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
    return std::make_unique<spanrt::Encoder>(c, map, p, threads);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
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

}  // namespace

PYBIND11_MODULE(_encoder, m) {
  m.doc() = "SpanRT's native AMX encoder (INT8/BF16). Import only where engine._kernels.amx_status() is true.";
  py::class_<spanrt::Encoder>(m, "Encoder")
      .def(py::init(&make_encoder), py::arg("config"), py::arg("weights"), py::arg("precision"), py::arg("threads"),
           "Pack the float32 weights (names in spanrt/encoder.h) for INT8 or BF16 tiles, or FP32 panels.")
      .def("forward", &forward, py::arg("input_ids"), py::arg("attention_mask"), py::arg("token_type_ids") = py::none(),
           "(start_logits, end_logits) float32 [batch, seq]; -10000 past each window's length. GIL released.")
      .def_property_readonly("precision", [](const spanrt::Encoder& e) {
        switch (e.precision()) {
          case spanrt::LinearPrecision::kInt8: return "int8";
          case spanrt::LinearPrecision::kBf16: return "bf16";
          default: return "fp32";
        }
      })
      .def_property_readonly("threads", &spanrt::Encoder::threads);
}
