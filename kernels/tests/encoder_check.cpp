// The native encoder on tiny random weights against a double-precision scalar reference, on every
// instruction-set path this CPU runs and every precision each path computes; plus, per path, a
// window's logits bit for bit the same alone, in a batch, with extra padding and with another thread
// count. Built by CMake with SPANRT_BUILD_TESTS=ON (ctest); in CI also cross-compiled for AArch64
// and run under qemu-aarch64 (kernels/tests/encoder_aarch64.sh). Exit status 0 when every check passes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "microkernels.h"
#include "spanrt/encoder.h"

namespace {

using spanrt::EncoderConfig;
using spanrt::LinearPrecision;

struct Model {
  EncoderConfig cfg;
  std::vector<std::pair<std::string, std::vector<float>>> tensors;
  std::vector<std::vector<int64_t>> shapes;
  spanrt::WeightMap map() const {
    spanrt::WeightMap m;
    for (size_t i = 0; i < tensors.size(); ++i) m[tensors[i].first] = spanrt::TensorView{tensors[i].second.data(), shapes[i]};
    return m;
  }
  const std::vector<float>& get(const std::string& name) const {
    for (const auto& t : tensors)
      if (t.first == name) return t.second;
    std::fprintf(stderr, "no tensor %s\n", name.c_str());
    std::abort();
  }
};

Model make_model(int64_t E, int64_t H, int64_t heads, int64_t I, int64_t layers, int64_t offset, unsigned seed) {
  Model m;
  m.cfg.vocab_size = 53;
  m.cfg.max_positions = 70;
  m.cfg.type_vocab_size = 2;
  m.cfg.embedding_size = E;
  m.cfg.hidden = H;
  m.cfg.layers = layers;
  m.cfg.heads = heads;
  m.cfg.intermediate = I;
  m.cfg.position_offset = offset;
  m.cfg.layer_norm_eps = 1e-12f;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float mean = 0.0f) {
    size_t n = 1;
    for (auto s : shape) n *= static_cast<size_t>(s);
    std::vector<float> v(n);
    for (auto& x : v) x = mean + normal(rng);
    m.tensors.emplace_back(name, std::move(v));
    m.shapes.push_back(shape);
  };
  add("embeddings.word", {53, E});
  add("embeddings.position", {70, E});
  add("embeddings.token_type", {2, E});
  add("embeddings.norm.weight", {E}, 1.0f);
  add("embeddings.norm.bias", {E});
  if (E != H) {
    add("embeddings.project.weight", {H, E});
    add("embeddings.project.bias", {H});
  }
  for (int64_t i = 0; i < layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    add(p + "qkv.weight", {3 * H, H});
    add(p + "qkv.bias", {3 * H});
    add(p + "attn_out.weight", {H, H});
    add(p + "attn_out.bias", {H});
    add(p + "attn_norm.weight", {H}, 1.0f);
    add(p + "attn_norm.bias", {H});
    add(p + "ffn_in.weight", {I, H});
    add(p + "ffn_in.bias", {I});
    add(p + "ffn_out.weight", {H, I});
    add(p + "ffn_out.bias", {H});
    add(p + "ffn_norm.weight", {H}, 1.0f);
    add(p + "ffn_norm.bias", {H});
  }
  add("qa.weight", {2, H});
  add("qa.bias", {2});
  return m;
}

// y[t] = x[t] W^T + b for T rows.
std::vector<double> linear(const std::vector<double>& x, int64_t T, int64_t in, const std::vector<float>& w, const std::vector<float>& b, int64_t out) {
  std::vector<double> y(static_cast<size_t>(T * out));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < out; ++n) {
      double s = b[n];
      for (int64_t k = 0; k < in; ++k) s += x[t * in + k] * w[n * in + k];
      y[t * out + n] = s;
    }
  return y;
}

void layer_norm(std::vector<double>& x, int64_t T, int64_t n, const std::vector<float>& g, const std::vector<float>& b, double eps) {
  for (int64_t t = 0; t < T; ++t) {
    double mean = 0, var = 0;
    for (int64_t j = 0; j < n; ++j) mean += x[t * n + j];
    mean /= n;
    for (int64_t j = 0; j < n; ++j) var += (x[t * n + j] - mean) * (x[t * n + j] - mean);
    var /= n;
    for (int64_t j = 0; j < n; ++j) x[t * n + j] = (x[t * n + j] - mean) / std::sqrt(var + eps) * g[j] + b[j];
  }
}

// The reference: one window of L tokens, in double precision.
void reference(const Model& m, const int64_t* ids, const int64_t* types, int64_t L, std::vector<double>& start, std::vector<double>& end) {
  const EncoderConfig& c = m.cfg;
  const int64_t E = c.embedding_size, H = c.hidden, I = c.intermediate, d = H / c.heads;
  std::vector<double> x(static_cast<size_t>(L * E));
  for (int64_t t = 0; t < L; ++t)
    for (int64_t j = 0; j < E; ++j)
      x[t * E + j] = double(m.get("embeddings.word")[ids[t] * E + j]) + m.get("embeddings.position")[(t + c.position_offset) * E + j] +
                     m.get("embeddings.token_type")[types[t] * E + j];
  layer_norm(x, L, E, m.get("embeddings.norm.weight"), m.get("embeddings.norm.bias"), c.layer_norm_eps);
  if (E != H) x = linear(x, L, E, m.get("embeddings.project.weight"), m.get("embeddings.project.bias"), H);
  for (int64_t li = 0; li < c.layers; ++li) {
    const std::string p = "layers." + std::to_string(li) + ".";
    const auto qkv = linear(x, L, H, m.get(p + "qkv.weight"), m.get(p + "qkv.bias"), 3 * H);
    std::vector<double> ctx(static_cast<size_t>(L * H));
    for (int64_t h = 0; h < c.heads; ++h)
      for (int64_t i = 0; i < L; ++i) {
        std::vector<double> s(static_cast<size_t>(L));
        double mx = -1e300;
        for (int64_t j = 0; j < L; ++j) {
          double dot = 0;
          for (int64_t e = 0; e < d; ++e) dot += qkv[i * 3 * H + h * d + e] * qkv[j * 3 * H + H + h * d + e];
          s[j] = dot / std::sqrt(double(d));
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (auto& v : s) sum += (v = std::exp(v - mx));
        for (int64_t e = 0; e < d; ++e) {
          double o = 0;
          for (int64_t j = 0; j < L; ++j) o += s[j] / sum * qkv[j * 3 * H + 2 * H + h * d + e];
          ctx[i * H + h * d + e] = o;
        }
      }
    auto a = linear(ctx, L, H, m.get(p + "attn_out.weight"), m.get(p + "attn_out.bias"), H);
    for (size_t j = 0; j < a.size(); ++j) x[j] += a[j];
    layer_norm(x, L, H, m.get(p + "attn_norm.weight"), m.get(p + "attn_norm.bias"), c.layer_norm_eps);
    auto f = linear(x, L, H, m.get(p + "ffn_in.weight"), m.get(p + "ffn_in.bias"), I);
    for (auto& v : f) {
      v = c.gelu_tanh ? 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)))
                      : 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    }
    auto o = linear(f, L, I, m.get(p + "ffn_out.weight"), m.get(p + "ffn_out.bias"), H);
    for (size_t j = 0; j < o.size(); ++j) x[j] += o[j];
    layer_norm(x, L, H, m.get(p + "ffn_norm.weight"), m.get(p + "ffn_norm.bias"), c.layer_norm_eps);
  }
  const auto qa = linear(x, L, H, m.get("qa.weight"), m.get("qa.bias"), 2);
  start.resize(L);
  end.resize(L);
  for (int64_t t = 0; t < L; ++t) {
    start[t] = qa[t * 2];
    end[t] = qa[t * 2 + 1];
  }
}

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

void run_model(const char* label, const Model& m) {
  const std::vector<int64_t> lengths = {37, 1, 66, 20};
  const int64_t B = static_cast<int64_t>(lengths.size()), S = 66;
  std::mt19937 rng(7);
  std::vector<int64_t> ids(B * S, 0), mask(B * S, 0), types(B * S, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < lengths[b]; ++t) {
      ids[b * S + t] = 1 + static_cast<int64_t>(rng() % 52);
      mask[b * S + t] = 1;
      types[b * S + t] = t >= lengths[b] / 3 ? 1 : 0;
    }
  std::vector<std::vector<double>> ref_s(B), ref_e(B);
  double scale = 0;
  for (int64_t b = 0; b < B; ++b) {
    reference(m, &ids[b * S], &types[b * S], lengths[b], ref_s[b], ref_e[b]);
    for (int64_t t = 0; t < lengths[b]; ++t) scale = std::max({scale, std::fabs(ref_s[b][t]), std::fabs(ref_e[b][t])});
  }
  const auto weights = m.map();
  const char* pnames[3] = {"int8", "bf16", "fp32"};
  const LinearPrecision precs[3] = {LinearPrecision::kInt8, LinearPrecision::kBf16, LinearPrecision::kFp32};
  const double tols[3] = {0.06, 0.03, 2e-5};
  for (auto isa : spanrt::encoder::runnable_isas()) {
    const std::string isa_s = spanrt::encoder::isa_name(isa);
    const auto& k = spanrt::encoder::kernels_for(isa);
    for (int pi = 0; pi < 3; ++pi) {
      if (k.gemm[pi].gemm == nullptr) continue;
      const std::string what = std::string(label) + " " + isa_s + " " + pnames[pi];
      spanrt::Encoder enc(m.cfg, weights, precs[pi], 2, isa_s);
      check(isa_s == enc.isa(), what + ": path taken " + enc.isa());
      std::vector<float> s(B * S), e(B * S);
      enc.forward(ids.data(), mask.data(), types.data(), B, S, s.data(), e.data());
      double err = 0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < S; ++t) {
          if (t < lengths[b]) {
            err = std::max({err, std::fabs(double(s[b * S + t]) - ref_s[b][t]), std::fabs(double(e[b * S + t]) - ref_e[b][t])});
          } else {
            check(s[b * S + t] == -10000.0f && e[b * S + t] == -10000.0f, what + ": masked logit");
          }
        }
      std::printf("%-28s max |logit - reference| %.3g (max |logit| %.3g, bound %.3g)\n", what.c_str(), err, scale, tols[pi] * scale);
      check(err <= tols[pi] * scale, what + ": logits off the reference");
      // invariance: each window alone (no padding), and with 1 thread and extra padding
      spanrt::Encoder one(m.cfg, weights, precs[pi], 1, isa_s);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t L = lengths[b], P = L + 5;
        std::vector<int64_t> i1(ids.begin() + b * S, ids.begin() + b * S + L), m1(L, 1), t1(types.begin() + b * S, types.begin() + b * S + L);
        std::vector<float> s1(L), e1(L);
        enc.forward(i1.data(), m1.data(), t1.data(), 1, L, s1.data(), e1.data());
        std::vector<int64_t> i2(P, 0), m2(P, 0), t2(P, 0);
        for (int64_t t = 0; t < L; ++t) {
          i2[t] = i1[t];
          m2[t] = 1;
          t2[t] = t1[t];
        }
        std::vector<float> s2(P), e2(P);
        one.forward(i2.data(), m2.data(), t2.data(), 1, P, s2.data(), e2.data());
        bool same = true;
        for (int64_t t = 0; t < L; ++t)
          same = same && s1[t] == s[b * S + t] && e1[t] == e[b * S + t] && s2[t] == s[b * S + t] && e2[t] == e[b * S + t];
        check(same, what + ": window " + std::to_string(b) + " depends on its batch, padding or thread count");
      }
    }
  }
}

// Every path's int8 quantizer gives the same values as the portable one: round half to even of
// fl(x * (1 / scale)), clamped to [-127, 127] (the decision that makes paths agree; an FMA that
// rounds the exact product flips values that lie near .5 after the multiply). Rows of several
// lengths (vector tails, K padding) with values placed on and around the rounding points.
void check_quantizers() {
  using spanrt::encoder::GemmKernel;
  const GemmKernel& ref = spanrt::encoder::kernels_for(spanrt::encoder::Isa::kGeneric).gemm[0];
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (auto isa : spanrt::encoder::runnable_isas()) {
    const GemmKernel& g = spanrt::encoder::kernels_for(isa).gemm[0];
    int bad = 0;
    for (int64_t n : {1, 7, 24, 37, 100, 384, 1536}) {
      std::vector<float> x(static_cast<size_t>(n));
      for (int trial = 0; trial < 40; ++trial) {
        const float scale = std::fabs(normal(rng)) / 127.0f + 1e-3f;
        for (auto& v : x) {
          const float q = static_cast<float>(static_cast<int>(rng() % 255) - 127);
          v = trial % 2 == 0 ? normal(rng) : (q + 0.5f + 1e-6f * normal(rng)) * scale;  // near the .5 points
        }
        x[0] = 127.0f * scale;  // sets the row's scale exactly
        const int64_t k_ref = (n + ref.k_step - 1) / ref.k_step * ref.k_step, k_pad = (n + g.k_step - 1) / g.k_step * g.k_step;
        std::vector<int8_t> want(static_cast<size_t>(k_ref));
        std::vector<uint8_t> got(static_cast<size_t>(k_pad * static_cast<int64_t>(g.act_bytes)) + 64);
        float s_ref = 0, s_got = 0;
        ref.quantize_row(x.data(), n, k_ref, want.data(), &s_ref);
        g.quantize_row(x.data(), n, k_pad, got.data(), &s_got);
        if (s_ref != s_got) ++bad;
        for (int64_t j = 0; j < k_pad; ++j) {
          int v;
          if (g.act_bytes == 2) {
            int16_t h;
            std::memcpy(&h, got.data() + 2 * j, 2);
            v = h;
          } else {
            v = g.act_u8 ? static_cast<int>(got[static_cast<size_t>(j)]) - 128 : static_cast<int>(static_cast<int8_t>(got[static_cast<size_t>(j)]));
          }
          if (v != (j < n ? want[static_cast<size_t>(j)] : 0)) ++bad;
        }
      }
    }
    check(bad == 0, std::string(spanrt::encoder::isa_name(isa)) + " int8 quantizer differs from the portable one in " + std::to_string(bad) + " values");
    std::printf("%-28s int8 quantizer %s\n", spanrt::encoder::isa_name(isa), bad == 0 ? "= portable" : "DIFFERS");
  }
}

}  // namespace

int main() {
  const auto& f = spanrt::encoder::cpu_features();
  std::printf("arch %s; paths here:", f.arch.c_str());
  for (auto i : spanrt::encoder::runnable_isas()) std::printf(" %s", spanrt::encoder::isa_name(i));
  std::printf("\n");
  // BERT-shaped (head size 24: padded head dimensions; intermediate 100: K tails), then an
  // ELECTRA-shaped model (embeddings 32 wide, projected to 48) with RoBERTa's position offset.
  check_quantizers();
  run_model("bert 48/2/100", make_model(48, 48, 2, 100, 2, 0, 1));
  run_model("electra 32->48", make_model(32, 48, 3, 64, 1, 2, 2));
  run_model("odd head 45/3/64", make_model(45, 45, 3, 64, 1, 0, 5));  // head size 15: odd, padded pairs
  Model tanh_gelu = make_model(48, 48, 2, 100, 2, 0, 4);  // ALBERT's activation: GELU's tanh approximation
  tanh_gelu.cfg.gelu_tanh = true;
  run_model("gelu_tanh 48/2/100", tanh_gelu);
  // an unknown path name and a path of another architecture are refused
  bool threw = false;
  try {
    spanrt::Encoder bad(make_model(48, 48, 2, 100, 1, 0, 3).cfg, make_model(48, 48, 2, 100, 1, 0, 3).map(), LinearPrecision::kFp32, 1, "sse9");
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, "an unknown path name is refused");
  std::printf(failures == 0 ? "encoder_check: all passed\n" : "encoder_check: %d FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
