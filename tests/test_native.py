"""The native encoder (kernels/encoder/, backend "native") against PyTorch, the oracle: small random
models of every supported family, odd sizes (tails of every vector loop and tile), on every
instruction-set path this CPU runs (the others skip, by name) and against each other; batch
invariance, thread-count invariance, input errors, the ISA cap and the backend's refusals."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.backends import native as native_backend
from engine.errors import BackendUnavailableError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _paths() -> tuple[list[str], list[str], str]:
    """(every path of this build, the paths this CPU runs, why the module is missing or '')."""
    try:
        from engine import _encoder
    except ImportError as e:
        return [], [], f"engine._encoder was not built: {e}"
    return list(_encoder.known_isas()), list(_encoder.runnable_isas()), ""


KNOWN_ISAS, RUNNABLE_ISAS, MISSING = _paths()
needs_encoder = pytest.mark.skipif(bool(MISSING), reason=MISSING or "ok")
BEST = RUNNABLE_ISAS[0] if RUNNABLE_ISAS else "generic"
# every path of the build x precision: run where this CPU can, skipped by name elsewhere
PATH_PRECISIONS = [(isa, p) for isa in ["amx", "avx512_bf16", "avx512_vnni", "avx2_vnni", "avx2", "neon_i8mm", "neon", "generic"] for p in ("int8", "bf16", "fp32")]


def _skip_unless_runs(isa: str, precision: str) -> None:
    from engine import _encoder

    if isa not in RUNNABLE_ISAS:
        why = dict(_encoder.isa_status()).get(isa, "not built for this architecture")
        pytest.skip(f"the {isa} path cannot run here: {why}")
    if precision not in _encoder.isa_precisions(isa):
        pytest.skip(f"the {isa} path does not compute {precision} on this CPU")


def _spec(model_type: str, cfg: Any) -> Any:
    from export.onnx import SUPPORTED, ModelSpec

    d = cfg.to_dict()
    if model_type == "distilbert":
        heads, hidden, layers = d["n_heads"], d["dim"], d["n_layers"]
    else:
        heads, hidden, layers = d["num_attention_heads"], d["hidden_size"], d["num_hidden_layers"]
    return ModelSpec(model_dir=Path("."), model_type=model_type, architecture=SUPPORTED[model_type].architecture,
                     input_names=SUPPORTED[model_type].input_names, num_heads=heads, hidden_size=hidden, num_layers=layers,
                     vocab_size=d["vocab_size"], max_positions=d["max_position_embeddings"], config=d)


def _model(model_type: str, hidden: int = 64, heads: int = 2, inter: int = 128, layers: int = 2) -> tuple[Any, Any]:
    torch.manual_seed(0)
    common = {"vocab_size": 211, "max_position_embeddings": 96, "initializer_range": 0.1}
    if model_type == "bert":
        cfg = transformers.BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter, num_hidden_layers=layers,
                                      **common)
        m = transformers.BertForQuestionAnswering(cfg)
    elif model_type == "roberta":
        cfg = transformers.RobertaConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter,
                                         num_hidden_layers=layers, pad_token_id=1, type_vocab_size=1, **common)
        m = transformers.RobertaForQuestionAnswering(cfg)
    elif model_type == "electra":  # embeddings narrower than hidden: the projection
        cfg = transformers.ElectraConfig(embedding_size=hidden // 2, hidden_size=hidden, num_attention_heads=heads,
                                         intermediate_size=inter, num_hidden_layers=layers, **common)
        m = transformers.ElectraForQuestionAnswering(cfg)
    else:
        cfg = transformers.DistilBertConfig(dim=hidden, n_heads=heads, hidden_dim=inter, n_layers=layers, **common)
        m = transformers.DistilBertForQuestionAnswering(cfg)
    return m.eval(), _spec(model_type, cfg)


def _inputs(model_type: str, lengths: list[int], seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = len(lengths)
    ids = np.full((b, seq), 1 if model_type == "roberta" else 0, dtype=np.int64)
    mask = np.zeros((b, seq), dtype=np.int64)
    types = np.zeros((b, seq), dtype=np.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(3, 211, n)
        mask[r, :n] = 1
        types[r, n // 3:n] = 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    if model_type in ("bert", "electra"):
        feeds["token_type_ids"] = types
    return feeds


def _torch(model: Any, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return out.start_logits.numpy(), out.end_logits.numpy()


def _encoder(model: Any, spec: Any, precision: str, threads: int = 2, isa: str = "") -> Any:
    from engine import _encoder
    from export.native import native_weights

    config, weights = native_weights(model, spec)
    return _encoder.Encoder(config.to_json(), weights, precision, threads, isa)


def _run(enc: Any, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return enc.forward(feeds["input_ids"], feeds["attention_mask"], feeds.get("token_type_ids"))


# (family, hidden, heads, intermediate): head sizes 32 and 64 (whole tiles), 24 and 20 (padded
# head dimensions), hidden 40 and 48 (vector tails), intermediate 100 (a K tail in the tiles)
SHAPES = [("bert", 64, 2, 128), ("bert", 128, 2, 256), ("bert", 48, 2, 100), ("bert", 40, 2, 64),
          ("roberta", 64, 2, 128), ("electra", 64, 2, 128), ("distilbert", 64, 2, 128)]


TOLERANCE = {"fp32": 2e-5, "bf16": 0.03, "int8": 0.06}


@needs_encoder
@pytest.mark.parametrize("isa,precision", PATH_PRECISIONS)
@pytest.mark.parametrize("family,hidden,heads,inter", SHAPES)
def test_logits_match_pytorch(family: str, hidden: int, heads: int, inter: int, isa: str, precision: str) -> None:
    _skip_unless_runs(isa, precision)
    tol = TOLERANCE[precision]
    model, spec = _model(family, hidden, heads, inter)
    feeds = _inputs(family, [57, 33, 1, 90], 90)
    ref = _torch(model, feeds)
    enc = _encoder(model, spec, precision, isa=isa)
    assert enc.isa == isa
    got = _run(enc, feeds)
    mask = feeds["attention_mask"].astype(bool)
    for r, g in zip(ref, got):
        scale = float(np.abs(r[mask]).max())
        err = float(np.abs(r - g)[mask].max())
        assert err <= tol * scale, f"{family} {isa} {precision}: max |diff| {err:.4g} vs max |logit| {scale:.4g}"
        assert np.all(g[~mask] == -10000.0)  # positions past a window's length
        # the ranking the span search relies on: per window, the best token is the same or a near tie
        for row in range(r.shape[0]):
            n = int(mask[row].sum())
            best = int(np.argmax(g[row, :n]))
            assert r[row, best] >= r[row, :n].max() - 2 * tol * scale


@needs_encoder
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_every_path_agrees_with_the_others(precision: str) -> None:
    """The paths share their numerics (int8: the same quantized weights and activations, exact int32
    sums), so they agree far more closely than each does with PyTorch (amx and avx512_bf16 compute
    attention in bf16: a looser bound)."""
    model, spec = _model("bert", 48, 2, 100)
    feeds = _inputs("bert", [57, 33, 1, 90], 90)
    mask = feeds["attention_mask"].astype(bool)
    outs = {isa: _run(_encoder(model, spec, precision, isa=isa), feeds) for isa in RUNNABLE_ISAS}
    assert len(outs) >= 1 and "generic" in outs
    ref = outs["generic"]
    scale = float(np.abs(ref[0][mask]).max())
    for isa, got in outs.items():
        tol = 2e-5 if precision == "fp32" else (0.03 if isa in ("amx", "avx512_bf16") else 1e-3)
        for r, g in zip(ref, got):
            err = float(np.abs(r - g)[mask].max())
            assert err <= tol * scale, f"{isa} vs generic {precision}: max |diff| {err:.4g} (max |logit| {scale:.4g})"


@needs_encoder
@pytest.mark.parametrize("isa,precision", PATH_PRECISIONS)
def test_a_window_gets_the_same_logits_whatever_its_batch_and_thread_count(isa: str, precision: str) -> None:
    _skip_unless_runs(isa, precision)
    model, spec = _model("bert")
    enc2, enc1 = _encoder(model, spec, precision, threads=2, isa=isa), _encoder(model, spec, precision, threads=1, isa=isa)
    enc3 = _encoder(model, spec, precision, threads=3, isa=isa)
    batch = _inputs("bert", [70, 12, 45, 88, 3], 96, seed=1)
    s, e = _run(enc2, batch)
    s3, e3 = _run(enc3, batch)
    assert np.array_equal(s, s3) and np.array_equal(e, e3)
    for row, n in enumerate([70, 12, 45, 88, 3]):
        alone = {k: v[row:row + 1, :n] for k, v in batch.items()}
        s1, e1 = _run(enc2, alone)
        assert np.array_equal(s1[0], s[row, :n]) and np.array_equal(e1[0], e[row, :n])
        padded = {k: np.pad(v, ((0, 0), (0, 9))) for k, v in alone.items()}
        sp, _ = _run(enc1, padded)  # one thread, extra padding: still the same bits
        assert np.array_equal(sp[0, :n], s[row, :n])


@needs_encoder
def test_concurrent_calls_give_the_serial_results() -> None:
    model, spec = _model("bert")
    enc = _encoder(model, spec, "int8")
    feeds = [_inputs("bert", [20 + 7 * i, 60 - 5 * i], 64, seed=i) for i in range(6)]
    expected = [_run(enc, f) for f in feeds]
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(15):
            got = _run(enc, feeds[i])
            if not (np.array_equal(got[0], expected[i][0]) and np.array_equal(got[1], expected[i][1])):
                errors.append(f"thread {i}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@needs_encoder
def test_bad_inputs_are_value_errors() -> None:
    model, spec = _model("bert")
    enc = _encoder(model, spec, "int8")
    feeds = _inputs("bert", [10, 20], 24)
    holes = {**feeds, "attention_mask": feeds["attention_mask"].copy()}
    holes["attention_mask"][0, 3] = 0
    with pytest.raises(ValueError, match="ones followed by zeros"):
        _run(enc, holes)
    bad_id = {**feeds, "input_ids": feeds["input_ids"].copy()}
    bad_id["input_ids"][1, 5] = 211
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _run(enc, bad_id)
    with pytest.raises(ValueError, match="more than the model's 96 positions"):
        _run(enc, _inputs("bert", [97], 97))
    with pytest.raises(ValueError, match="shape of input_ids"):
        enc.forward(feeds["input_ids"], feeds["attention_mask"][:, :5])
    from engine import _encoder as module
    from export.native import native_weights

    config, weights = native_weights(model, spec)
    with pytest.raises(ValueError, match="'int8', 'bf16' or 'fp32'"):
        module.Encoder(config.to_json(), weights, "fp16", 1)
    with pytest.raises(ValueError, match="unknown instruction-set path 'sse9'"):
        module.Encoder(config.to_json(), weights, "fp32", 1, "sse9")
    if "bf16" not in module.isa_precisions("generic"):
        with pytest.raises(RuntimeError, match="generic path does not compute bf16"):
            module.Encoder(config.to_json(), weights, "bf16", 1, "generic")
    del weights["layers.1.ffn_out.bias"]
    with pytest.raises(ValueError, match="'layers.1.ffn_out.bias' is missing"):
        module.Encoder(config.to_json(), weights, "int8", 1)


def test_unsupported_activation_is_refused_at_export() -> None:
    from export.errors import UnsupportedModelError
    from export.native import native_weights

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=1, intermediate_size=32, num_hidden_layers=1,
                                  hidden_act="relu")
    model = transformers.BertForQuestionAnswering(cfg).eval()
    with pytest.raises(UnsupportedModelError, match="computes GELU .* only; this model uses 'relu'"):
        native_weights(model, _spec("bert", cfg))


@needs_encoder
@pytest.mark.parametrize("isa", ["amx", "avx512_bf16", "avx512_vnni", "avx2_vnni", "avx2", "neon_i8mm", "neon", "generic"])
@pytest.mark.parametrize("hidden_act", ["gelu_new", "gelu_pytorch_tanh"])
def test_the_tanh_gelu_of_albert_checkpoints_matches_pytorch(isa: str, hidden_act: str) -> None:
    """GELU's tanh approximation (ALBERT's gelu_new), fp32 and int8, on every path here."""
    from export.native import native_weights

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=211, hidden_size=48, num_attention_heads=2, intermediate_size=100, num_hidden_layers=2,
                                  max_position_embeddings=96, initializer_range=0.1, hidden_act=hidden_act)
    model = transformers.BertForQuestionAnswering(cfg).eval()
    config, weights = native_weights(model, _spec("bert", cfg))
    assert config.activation == "gelu_tanh"
    feeds = _inputs("bert", [57, 33, 1, 90], 90)
    ref = _torch(model, feeds)
    mask = feeds["attention_mask"].astype(bool)
    for precision in ("fp32", "int8"):
        _skip_unless_runs(isa, precision)
        from engine import _encoder

        got = _run(_encoder.Encoder(config.to_json(), weights, precision, 2, isa), feeds)
        for r, g in zip(ref, got):
            scale = float(np.abs(r[mask]).max())
            assert float(np.abs(r - g)[mask].max()) <= TOLERANCE[precision] * scale, (isa, precision)
    exact = {**config.to_json(), "activation": "gelu"}  # the other GELU gives other logits: the setting is used
    assert not np.allclose(_run(_encoder.Encoder(exact, weights, "fp32", 2, isa), feeds)[0][mask], ref[0][mask], atol=1e-5)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, exported int8 bundle with native weights) of the small BERT, shared by the tests below."""
    from export.pipeline import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("int8_bundle")
    ckpt = root / "ckpt"
    model, _ = _model("bert", 64, 2, 128)
    model.save_pretrained(ckpt)
    _tokenizer(ckpt)
    return ckpt, export_bundle(ckpt, root / "bundle", ExportOptions(precisions=("int8",), max_seq_len=64, tensorrt_onnx=(), quiet=True))


@needs_encoder
def test_the_isa_cap_picks_the_path_and_refuses_unknown_or_missing_ones(int8_bundle: tuple[Path, Path],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import Engine
    from engine.errors import InvalidInputError

    _, bundle = int8_bundle
    context = "the river runs past the old mill and the bridge near the town"
    answers = {}
    for isa in RUNNABLE_ISAS:  # the option, then the environment variable
        with Engine(bundle, backend="native", cpu_isa=isa, threads=1) as e:
            assert e.backend_details["isa"] == isa and e.backend_details["linear_layers"]
            answers[isa] = e.answer("where is the mill?", context).text
        monkeypatch.setenv("SPANRT_CPU_ISA", isa)
        with Engine(bundle, backend="native", threads=1) as e:
            assert e.backend_details["isa"] == isa
        monkeypatch.delenv("SPANRT_CPU_ISA")
    assert len(set(answers.values())) == 1, answers  # every path gives the same answer
    with Engine(bundle, backend="native", threads=1) as best:
        assert best.backend_details["isa"] == BEST
    with pytest.raises(InvalidInputError, match="not an instruction-set path.*knows"):
        Engine(bundle, backend="native", cpu_isa="sse9")
    monkeypatch.setenv("SPANRT_CPU_ISA", "avx1024")
    with pytest.raises(InvalidInputError, match="SPANRT_CPU_ISA='avx1024'"):
        Engine(bundle, backend="native")
    monkeypatch.delenv("SPANRT_CPU_ISA")
    missing = [isa for isa in KNOWN_ISAS if isa not in RUNNABLE_ISAS] or (["neon"] if "neon" not in KNOWN_ISAS else [])
    for isa in missing:
        with pytest.raises((BackendUnavailableError, InvalidInputError), match="cannot run on this CPU|not an instruction-set path"):
            Engine(bundle, backend="native", cpu_isa=isa)


@needs_encoder
def test_auto_skips_the_generic_path_and_says_why(int8_bundle: tuple[Path, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import Engine
    from export.pipeline import ExportOptions, export_bundle

    ckpt, bundle = int8_bundle
    with Engine(bundle, precision="int8", threads=1) as e:  # the best path: native, unless only generic runs here
        assert (e.backend == "native") == (BEST != "generic")
    monkeypatch.setenv("SPANRT_CPU_ISA", "generic")  # a CPU with no tuned path
    with Engine(bundle, precision="int8", threads=1) as e:
        assert e.backend != "native"
        assert any(n.startswith("native: the generic path") for n in e.backend_notes), e.backend_notes
    with Engine(bundle, backend="native", threads=1) as e:  # asked for by name, it runs
        assert e.backend_details["isa"] == "generic"
    monkeypatch.setattr(native_backend, "import_encoder", lambda: (_ for _ in ()).throw(BackendUnavailableError("not built (test)")))
    with Engine(bundle, precision="int8", threads=1) as e:
        assert e.backend != "native" and any("not built (test)" in n for n in e.backend_notes)
    monkeypatch.undo()
    # --no-native: no weights, and the backend says which artifact is missing
    lean = export_bundle(ckpt, tmp_path / "lean", ExportOptions(precisions=("int8",), max_seq_len=64, tensorrt_onnx=(), native=False,
                                                                  quiet=True))
    assert not (lean / "model.native.npz").exists()
    with pytest.raises(BackendUnavailableError, match="needs the fp32 native model"):
        Engine(lean, backend="native")


def _tokenizer(folder: Path) -> None:
    """A WordPiece tokenizer for the 211-token test models (the shipped default's first 211 tokens)."""
    from engine.default_model import default_checkpoint_dir

    vocab = (default_checkpoint_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()[:211]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)


@needs_encoder
def test_export_writes_and_checks_the_native_weights_and_the_engine_runs_them(tmp_path: Path) -> None:
    from engine import Engine
    from engine.bundle import load_bundle
    from export.pipeline import ExportOptions, export_bundle

    ckpt = tmp_path / "ckpt"
    model, _ = _model("bert", 64, 2, 128)
    model.save_pretrained(ckpt)
    _tokenizer(ckpt)
    path = export_bundle(ckpt, tmp_path / "bundle", ExportOptions(precisions=("fp32",), max_seq_len=64, tensorrt_onnx=(), quiet=True))
    b = load_bundle(path)
    art = b.find("native", "fp32")
    assert art is not None and art.info["encoder"]["hidden_size"] == 64 and art.info["encoder"]["num_layers"] == 2
    checked = b.manifest.verification["native"]
    assert checked["checked"] is True and checked["int8"]["rows"] == 16 and checked["bf16"]["max_abs_diff"] < 0.1
    assert checked["fp32"]["max_abs_diff"] < 1e-3 and checked["fp32"]["span_agreement"] == 1.0
    context = "the river runs past the old mill and the bridge near the town"
    with Engine(path, backend="native", threads=2) as e, Engine(path, backend="onnxruntime", precision="fp32", threads=1) as ref:
        assert (e.backend, e.precision, e.device) == ("native", "int8", "cpu")
        a = e.answer("where is the mill?", context, top_k=3)
        assert all(context[x.start:x.end] == x.text for x in a)
        r = ref.answer("where is the mill?", context, top_k=3)
        assert abs(a[0].score - r[0].score) < 0.2
    with Engine(path, threads=1) as auto:  # auto: the native encoder's int8 first on this CPU
        assert (auto.backend, auto.precision) == ("native", "int8")
    with Engine(path, precision="fp32", threads=1) as auto32:  # auto fp32: the native encoder's fp32 first too
        assert (auto32.backend, auto32.precision) == ("native", "fp32")
        got = auto32.answer("where is the mill?", context, top_k=3)
        assert [(x.text, x.start) for x in got] == [(x.text, x.start) for x in r]
        assert all(abs(x.score - y.score) < 1e-4 for x, y in zip(got, r))
    with pytest.raises(BackendUnavailableError, match="runs int8, bf16, fp32, not fp16"):
        Engine(path, backend="native", precision="fp16")


@needs_encoder
def test_a_forked_child_can_use_an_encoder_its_parent_ran() -> None:
    """gunicorn --preload and multiprocessing's fork: the parent has run the encoder (its threads
    started), the child uses the same object. OpenMP's libgomp hangs here; the encoder's own team
    is rebuilt in the child."""
    import multiprocessing as mp

    model, spec = _model("bert")
    enc = _encoder(model, spec, "int8", threads=2)
    feeds = _inputs("bert", [40, 25], 48)
    expected = _run(enc, feeds)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()

    def child() -> None:
        got = _run(enc, feeds)
        queue.put(bool(np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])))

    proc = ctx.Process(target=child)
    proc.start()
    proc.join(timeout=60)
    hung = proc.is_alive()
    if hung:
        proc.kill()
    assert not hung, "the forked child hung in the encoder"
    assert proc.exitcode == 0 and queue.get(timeout=5) is True
    assert np.array_equal(_run(enc, feeds)[0], expected[0])  # the parent's team still works
