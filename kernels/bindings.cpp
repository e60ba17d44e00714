// engine._kernels: the span-search decoder bound to Python. The binding checks every argument
// (shape, dtype, contiguity, device), fills a SpanSearchParams and calls the C++ or CUDA decoder
// with the GIL released. engine/decode.py is the public front end; see engine/_kernels.pyi.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "spanrt/span_search.h"

namespace py = pybind11;

namespace spanrt {
namespace {

constexpr int64_t kMaxIndex = std::numeric_limits<int32_t>::max();

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "(";
  for (size_t d = 0; d < shape.size(); ++d) {
    text += std::to_string(shape[d]);
    if (d + 1 < shape.size() || shape.size() == 1) text += ",";
    if (d + 1 < shape.size()) text += " ";
  }
  return text + ")";
}

void check_options(int64_t max_answer_len, int64_t top_k) {
  if (max_answer_len < 1) {
    throw py::value_error("max_answer_len must be >= 1 (tokens per answer), got " +
                          std::to_string(max_answer_len));
  }
  if (top_k < 1) throw py::value_error("top_k must be >= 1, got " + std::to_string(top_k));
}

// Shapes of start_logits, end_logits and mask: all [batch, seq_len] with seq_len >= 1.
void check_shapes(const std::vector<int64_t>& start, const std::vector<int64_t>& end,
                  const std::vector<int64_t>& mask) {
  if (start.size() != 2) {
    throw py::value_error("start_logits must be 2-D [batch, seq_len], got shape " +
                          shape_text(start));
  }
  if (end != start) {
    throw py::value_error("end_logits must have the shape of start_logits " + shape_text(start) +
                          ", got " + shape_text(end));
  }
  if (mask != start) {
    throw py::value_error("mask must have the shape of start_logits " + shape_text(start) +
                          ", got " + shape_text(mask));
  }
  if (start[1] < 1) throw py::value_error("seq_len (axis 1 of the logits) must be >= 1, got 0");
  if (start[0] > kMaxIndex || start[1] > kMaxIndex) {
    throw py::value_error("batch and seq_len must each be < 2**31, got shape " + shape_text(start));
  }
}

[[noreturn]] void raise_nan(int64_t row) {
  throw py::value_error("row " + std::to_string(row) +
                        " of start_logits/end_logits holds NaN at a position where mask is true; "
                        "the model or its inputs produced NaN logits");
}

struct Outputs {
  py::object spans, scores, start_lse, end_lse, null_scores;
  py::tuple as_tuple() const {
    return py::make_tuple(spans, scores, start_lse, end_lse, null_scores);
  }
};

// New NumPy arrays for the results, wired into `p` (spans/scores always, the others on request).
Outputs host_outputs(SpanSearchParams& p, int64_t batch, int64_t top_k, bool return_lse,
                     bool return_null) {
  py::array_t<int64_t> spans({batch, top_k, int64_t{2}});
  py::array_t<float> scores({batch, top_k});
  p.spans = spans.mutable_data();
  p.scores = scores.mutable_data();
  Outputs out{spans, scores, py::none(), py::none(), py::none()};
  if (return_lse) {
    py::array_t<float> start_lse(batch), end_lse(batch);
    p.start_lse = start_lse.mutable_data();
    p.end_lse = end_lse.mutable_data();
    out.start_lse = start_lse;
    out.end_lse = end_lse;
  }
  if (return_null) {
    py::array_t<float> null_scores(batch);
    p.null_scores = null_scores.mutable_data();
    out.null_scores = null_scores;
  }
  return out;
}

// ---- NumPy (host) ---------------------------------------------------------------------------

bool same_dtype(const py::array& a, const py::dtype& t) { return a.dtype().equal(t); }

// A C-contiguous, aligned view of `array` (a copy when it is not one already), of the same dtype.
py::array contiguous(const py::array& array) {
  return py::array::ensure(array, py::array::c_style | py::detail::npy_api::NPY_ARRAY_ALIGNED_);
}

std::vector<int64_t> shape_of(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

py::tuple span_search_host(const py::array& start_in, const py::array& end_in,
                           const py::array& mask_in, int64_t max_answer_len, int64_t top_k,
                           bool return_lse, bool return_null) {
  check_options(max_answer_len, top_k);
  const py::dtype f32 = py::dtype::of<float>();
  const py::dtype f16("float16");
  LogitType type;
  if (same_dtype(start_in, f32)) {
    type = LogitType::kFloat32;
  } else if (same_dtype(start_in, f16)) {
    type = LogitType::kFloat16;
  } else {
    throw py::type_error("start_logits must be float32 or float16, got " +
                         std::string(py::str(start_in.dtype())));
  }
  if (!start_in.dtype().equal(end_in.dtype())) {
    throw py::type_error("end_logits must have the dtype of start_logits (" +
                         std::string(py::str(start_in.dtype())) + "), got " +
                         std::string(py::str(end_in.dtype())));
  }
  if (!same_dtype(mask_in, py::dtype::of<bool>()) && !same_dtype(mask_in, py::dtype::of<uint8_t>())) {
    throw py::type_error("mask must be bool or uint8, got " + std::string(py::str(mask_in.dtype())));
  }
  check_shapes(shape_of(start_in), shape_of(end_in), shape_of(mask_in));
  const py::array start = contiguous(start_in);
  const py::array end = contiguous(end_in);
  const py::array mask = contiguous(mask_in);

  const int64_t batch = start.shape(0);
  SpanSearchParams p;
  p.start_logits = start.data();
  p.end_logits = end.data();
  p.mask = static_cast<const uint8_t*>(mask.data());
  p.logit_type = type;
  p.batch = batch;
  const int64_t seq_len = start.shape(1);
  p.seq_len = seq_len;
  p.max_answer_len = std::min(max_answer_len, seq_len);  // the same spans, no overflow in i + L - 1
  p.top_k = top_k;
  const Outputs out = host_outputs(p, batch, top_k, return_lse, return_null);
  int64_t nan_row;
  {
    py::gil_scoped_release release;
    nan_row = span_search_cpu(p);
  }
  if (nan_row >= 0) raise_nan(nan_row);
  return out.as_tuple();
}

// ---- __cuda_array_interface__ (device) ------------------------------------------------------

#if defined(SPANRT_WITH_CUDA)

// What the decoder needs from one object's __cuda_array_interface__ (version 0 to 3).
struct DeviceArray {
  uintptr_t data = 0;
  bool readonly = false;
  std::vector<int64_t> shape;
  std::string typestr;  // "<f4", "<f2", "|b1", "|u1", "<i8"
  std::optional<intptr_t> stream;
  int64_t size() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

int64_t itemsize_of(const std::string& typestr) {
  return typestr.size() >= 3 ? std::stoll(typestr.substr(2)) : 0;
}

// "<f4" and "=f4" are the same on the little-endian machines CUDA runs on.
std::string normalised(std::string typestr) {
  if (!typestr.empty() && typestr[0] == '=') typestr[0] = '<';
  return typestr;
}

DeviceArray read_device_array(const py::handle& object, const char* name) {
  const py::dict cai = object.attr("__cuda_array_interface__");
  DeviceArray array;
  for (const py::handle d : cai["shape"].cast<py::tuple>()) array.shape.push_back(d.cast<int64_t>());
  array.typestr = normalised(cai["typestr"].cast<std::string>());
  const py::tuple data = cai["data"].cast<py::tuple>();
  array.data = data[0].cast<uintptr_t>();
  array.readonly = data[1].cast<bool>();
  if (cai.contains("mask") && !cai["mask"].is_none()) {
    throw py::value_error(std::string(name) + " is a masked device array; pass a plain array");
  }
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    const py::tuple strides = cai["strides"].cast<py::tuple>();
    int64_t expected = itemsize_of(array.typestr);
    bool contiguous = true;
    for (int64_t d = static_cast<int64_t>(array.shape.size()) - 1; d >= 0; --d) {
      if (array.shape[d] != 1 && strides[d].cast<int64_t>() != expected) contiguous = false;
      expected *= array.shape[d];
    }
    if (!contiguous && array.size() > 0) {
      throw py::value_error(std::string(name) +
                            " must be C-contiguous on the device (e.g. call .contiguous() or "
                            "cupy.ascontiguousarray first)");
    }
  }
  if (cai.contains("stream") && !cai["stream"].is_none()) {
    array.stream = cai["stream"].cast<intptr_t>();
  }
  return array;
}

void check_typestr(const DeviceArray& array, const char* name,
                   std::initializer_list<const char*> allowed, const char* expected) {
  for (const char* t : allowed) {
    if (array.typestr == t) return;
  }
  throw py::type_error(std::string(name) + " must be " + expected + ", got typestr '" +
                       array.typestr + "'");
}

void check_output(const DeviceArray& array, const char* name, const char* typestr,
                  const std::vector<int64_t>& shape) {
  check_typestr(array, name, {typestr}, typestr);
  if (array.shape != shape) {
    throw py::value_error(std::string(name) + " must have shape " + shape_text(shape) + ", got " +
                          shape_text(array.shape));
  }
  if (array.readonly) throw py::value_error(std::string(name) + " is read-only");
}

py::tuple span_search_device(const py::object& start_object, const py::object& end_object,
                             const py::object& mask_object, int64_t max_answer_len, int64_t top_k,
                             bool return_lse, bool return_null, std::optional<intptr_t> stream,
                             const std::optional<py::tuple>& out) {
  check_options(max_answer_len, top_k);
  const DeviceArray start = read_device_array(start_object, "start_logits");
  const DeviceArray end = read_device_array(end_object, "end_logits");
  const DeviceArray mask = read_device_array(mask_object, "mask");
  check_typestr(start, "start_logits", {"<f4", "<f2"}, "float32 or float16");
  if (end.typestr != start.typestr) {
    throw py::type_error("end_logits must have the dtype of start_logits ('" + start.typestr +
                         "'), got '" + end.typestr + "'");
  }
  check_typestr(mask, "mask", {"|b1", "|u1", "<b1", "<u1"}, "bool or uint8");
  check_shapes(start.shape, end.shape, mask.shape);
  const int64_t batch = start.shape[0];
  const int64_t seq_len = start.shape[1];

  SpanSearchParams p;
  p.start_logits = reinterpret_cast<const void*>(start.data);
  p.end_logits = reinterpret_cast<const void*>(end.data);
  p.mask = reinterpret_cast<const uint8_t*>(mask.data);
  p.logit_type = start.typestr == "<f2" ? LogitType::kFloat16 : LogitType::kFloat32;
  p.batch = batch;
  p.seq_len = seq_len;
  p.max_answer_len = std::min(max_answer_len, seq_len);  // the same spans, no overflow in i + L - 1
  p.top_k = top_k;

  std::vector<std::pair<const DeviceArray*, const char*>> on_device = {
      {&start, "start_logits"}, {&end, "end_logits"}, {&mask, "mask"}};
  Outputs result;
  std::array<DeviceArray, 5> out_arrays;
  if (out.has_value()) {
    // Results stay on the device, in the caller's buffers.
    const py::tuple& buffers = *out;
    if (buffers.size() != 5) {
      throw py::value_error("out must hold 5 entries (spans, scores, start_lse, end_lse, "
                            "null_scores), got " + std::to_string(buffers.size()));
    }
    const char* names[5] = {"out.spans", "out.scores", "out.start_lse", "out.end_lse",
                            "out.null_scores"};
    const bool wanted[5] = {true, true, return_lse, return_lse, return_null};
    const std::vector<int64_t> shapes[5] = {
        {batch, top_k, 2}, {batch, top_k}, {batch}, {batch}, {batch}};
    for (int i = 0; i < 5; ++i) {
      if (!wanted[i]) continue;
      if (buffers[i].is_none() || !py::hasattr(buffers[i], "__cuda_array_interface__")) {
        throw py::value_error(std::string(names[i]) +
                              " must be a device array (with __cuda_array_interface__)");
      }
      out_arrays[i] = read_device_array(buffers[i], names[i]);
      check_output(out_arrays[i], names[i], i == 0 ? "<i8" : "<f4", shapes[i]);
      on_device.emplace_back(&out_arrays[i], names[i]);
    }
    p.spans = reinterpret_cast<int64_t*>(out_arrays[0].data);
    p.scores = reinterpret_cast<float*>(out_arrays[1].data);
    p.start_lse = return_lse ? reinterpret_cast<float*>(out_arrays[2].data) : nullptr;
    p.end_lse = return_lse ? reinterpret_cast<float*>(out_arrays[3].data) : nullptr;
    p.null_scores = return_null ? reinterpret_cast<float*>(out_arrays[4].data) : nullptr;
    result = Outputs{buffers[0], buffers[1], return_lse ? buffers[2] : py::none(),
                     return_lse ? buffers[3] : py::none(), return_null ? buffers[4] : py::none()};
  } else {
    result = host_outputs(p, batch, top_k, return_lse, return_null);
  }
  if (batch == 0) return result.as_tuple();

  // Every array must be device memory of one device.
  int device = -1;
  for (const auto& [array, name] : on_device) {
    const int here = cuda_pointer_device(reinterpret_cast<const void*>(array->data));
    if (here < 0) {
      throw py::value_error(std::string(name) +
                            "'s __cuda_array_interface__ does not point to CUDA device memory");
    }
    if (device >= 0 && here != device) {
      throw py::value_error(std::string(name) + " is on CUDA device " + std::to_string(here) +
                            " but start_logits is on device " + std::to_string(device) +
                            "; put all arrays on one device");
    }
    device = here;
  }
  std::vector<intptr_t> producers;
  for (const auto& [array, name] : on_device) {
    if (array->stream.has_value()) producers.push_back(*array->stream);
  }
  CudaLaunch launch;
  launch.device = device;
  // Default: the stream start_logits was produced on (e.g. torch's current stream), else 0.
  launch.stream = stream.has_value() ? *stream : start.stream.value_or(0);
  launch.wait_for = producers.data();
  launch.num_wait_for = static_cast<int>(producers.size());
  launch.outputs_on_host = !out.has_value();
  int64_t nan_row;
  {
    py::gil_scoped_release release;
    nan_row = span_search_cuda(p, launch);
  }
  if (nan_row >= 0) raise_nan(nan_row);
  return result.as_tuple();
}

#endif  // SPANRT_WITH_CUDA

}  // namespace
}  // namespace spanrt

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "SpanRT's span-search decoder (C++ and, when built with it, CUDA). Use engine.decode.";
#if defined(SPANRT_WITH_CUDA)
  m.attr("WITH_CUDA") = true;
  m.attr("CUDA_ARCHITECTURES") = SPANRT_CUDA_ARCHITECTURES;
#else
  m.attr("WITH_CUDA") = false;
  m.attr("CUDA_ARCHITECTURES") = "";
#endif
#if defined(SPANRT_SANITIZED)
  m.attr("SANITIZED") = true;  // built with SPANRT_SANITIZE=ON (ASan + UBSan)
#else
  m.attr("SANITIZED") = false;
#endif

  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const spanrt::CudaUnavailableError& error) {
      const py::object kind = py::module_::import("engine.errors").attr("BackendUnavailableError");
      PyErr_SetString(kind.ptr(), error.what());
    }
  });

  m.def("span_search_host", &spanrt::span_search_host, py::arg("start_logits"),
        py::arg("end_logits"), py::arg("mask"), py::kw_only(), py::arg("max_answer_len"),
        py::arg("top_k"), py::arg("return_lse"), py::arg("return_null"),
        "Top-k spans of NumPy logits with the C++ decoder (GIL released).\n\n"
        "Returns (spans, scores, start_lse, end_lse, null_scores); the optional entries are\n"
        "None unless asked for. Raises ValueError (shapes, options, NaN logits in the mask)\n"
        "and TypeError (dtypes). Prefer engine.decode.span_search.");
#if defined(SPANRT_WITH_CUDA)
  m.def("span_search_device", &spanrt::span_search_device, py::arg("start_logits"),
        py::arg("end_logits"), py::arg("mask"), py::kw_only(), py::arg("max_answer_len"),
        py::arg("top_k"), py::arg("return_lse"), py::arg("return_null"),
        py::arg("stream") = py::none(), py::arg("out") = py::none(),
        "Top-k spans of device logits (__cuda_array_interface__) with the CUDA kernel.\n\n"
        "stream: a CUDA stream handle (0 default, 1 legacy, 2 per-thread, else cudaStream_t);\n"
        "None runs on start_logits' CAI stream, else the default stream. out: None copies the\n"
        "results to new NumPy arrays; a 5-tuple of device arrays (spans, scores, start_lse,\n"
        "end_lse, null_scores; None where not asked for) keeps them on the device. Returns the\n"
        "same 5-tuple. Prefer engine.decode.span_search.");
#endif
}
