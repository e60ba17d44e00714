"""The native AMX encoder (kernels/encoder_cpu.cpp, backend "native") against PyTorch, the oracle:
small random models of every supported family, odd sizes (tails of every vector loop and tile),
batch invariance, thread-count invariance, input errors, and the backend's refusals without AMX."""

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


def _amx() -> tuple[bool, str]:
    ok, why = native_backend.amx_status()
    if ok and importlib.util.find_spec("engine._encoder") is None:
        return False, "engine._encoder was not built"
    return ok, why


AMX_OK, AMX_WHY = _amx()
needs_amx = pytest.mark.skipif(not AMX_OK, reason=f"native encoder cannot run here: {AMX_WHY}")


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


def _encoder(model: Any, spec: Any, precision: str, threads: int = 2) -> Any:
    from engine import _encoder
    from export.native import native_weights

    config, weights = native_weights(model, spec)
    return _encoder.Encoder(config, weights, precision, threads)


def _run(enc: Any, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return enc.forward(feeds["input_ids"], feeds["attention_mask"], feeds.get("token_type_ids"))


# (family, hidden, heads, intermediate): head sizes 32 and 64 (whole tiles), 24 and 20 (padded
# head dimensions), hidden 40 and 48 (vector tails), intermediate 100 (a K tail in the tiles)
SHAPES = [("bert", 64, 2, 128), ("bert", 128, 2, 256), ("bert", 48, 2, 100), ("bert", 40, 2, 64),
          ("roberta", 64, 2, 128), ("electra", 64, 2, 128), ("distilbert", 64, 2, 128)]


@needs_amx
@pytest.mark.parametrize("precision,tol", [("fp32", 2e-5), ("bf16", 0.03), ("int8", 0.06)])
@pytest.mark.parametrize("family,hidden,heads,inter", SHAPES)
def test_logits_match_pytorch(family: str, hidden: int, heads: int, inter: int, precision: str, tol: float) -> None:
    model, spec = _model(family, hidden, heads, inter)
    feeds = _inputs(family, [57, 33, 1, 90], 90)
    ref = _torch(model, feeds)
    got = _run(_encoder(model, spec, precision), feeds)
    mask = feeds["attention_mask"].astype(bool)
    for r, g in zip(ref, got):
        scale = float(np.abs(r[mask]).max())
        err = float(np.abs(r - g)[mask].max())
        assert err <= tol * scale, f"{family} {precision}: max |diff| {err:.4g} vs max |logit| {scale:.4g}"
        assert np.all(g[~mask] == -10000.0)  # positions past a window's length
        # the ranking the span search relies on: per window, the best token is the same or a near tie
        for row in range(r.shape[0]):
            n = int(mask[row].sum())
            best = int(np.argmax(g[row, :n]))
            assert r[row, best] >= r[row, :n].max() - 2 * tol * scale


@needs_amx
@pytest.mark.parametrize("precision", ["int8", "bf16", "fp32"])
def test_a_window_gets_the_same_logits_whatever_its_batch_and_thread_count(precision: str) -> None:
    model, spec = _model("bert")
    enc2, enc1 = _encoder(model, spec, precision, threads=2), _encoder(model, spec, precision, threads=1)
    batch = _inputs("bert", [70, 12, 45, 88, 3], 96, seed=1)
    s, e = _run(enc2, batch)
    for row, n in enumerate([70, 12, 45, 88, 3]):
        alone = {k: v[row:row + 1, :n] for k, v in batch.items()}
        s1, e1 = _run(enc2, alone)
        assert np.array_equal(s1[0], s[row, :n]) and np.array_equal(e1[0], e[row, :n])
        padded = {k: np.pad(v, ((0, 0), (0, 9))) for k, v in alone.items()}
        sp, _ = _run(enc1, padded)  # one thread, extra padding: still the same bits
        assert np.array_equal(sp[0, :n], s[row, :n])


@needs_amx
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


@needs_amx
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
    del weights["layers.1.ffn_out.bias"]
    with pytest.raises(ValueError, match="'layers.1.ffn_out.bias' is missing"):
        module.Encoder(config, weights, "int8", 1)
    with pytest.raises(ValueError, match="'int8', 'bf16' or 'fp32'"):
        module.Encoder(*native_weights(model, spec), "fp16", 1)


def test_unsupported_activation_is_refused_at_export() -> None:
    from export.errors import UnsupportedModelError
    from export.native import native_weights

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=1, intermediate_size=32, num_hidden_layers=1,
                                  hidden_act="relu")
    model = transformers.BertForQuestionAnswering(cfg).eval()
    with pytest.raises(UnsupportedModelError, match="exact GELU"):
        native_weights(model, _spec("bert", cfg))


def test_without_amx_the_backend_is_unavailable_and_auto_moves_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import Engine
    from export.pipeline import ExportOptions, export_bundle

    ckpt = tmp_path / "ckpt"
    model, _ = _model("bert", 64, 2, 128)
    model.save_pretrained(ckpt)
    _tokenizer(ckpt)
    bundle = export_bundle(ckpt, tmp_path / "bundle", ExportOptions(precisions=("int8",), max_seq_len=64, tensorrt_onnx=(), quiet=True))
    monkeypatch.setattr(native_backend, "amx_status", lambda: (False, "this CPU lacks AMX-INT8 (test)"))
    with pytest.raises(BackendUnavailableError, match="needs Intel AMX and AVX-512 BF16: this CPU lacks AMX-INT8"):
        Engine(bundle, backend="native")
    with Engine(bundle, precision="int8", threads=1) as e:
        assert e.backend != "native"
        assert any(n.startswith("native: ") and "AMX-INT8 (test)" in n for n in e.backend_notes)
    # --no-native: no weights, and the backend says which artifact is missing
    lean = export_bundle(ckpt, tmp_path / "lean", ExportOptions(precisions=("int8",), max_seq_len=64, tensorrt_onnx=(), native=False,
                                                                  quiet=True))
    assert not (lean / "model.native.npz").exists()
    monkeypatch.setattr(native_backend, "amx_status", lambda: (True, "test"))
    with pytest.raises(BackendUnavailableError, match="needs the fp32 native model"):
        Engine(lean, backend="native")


def _tokenizer(folder: Path) -> None:
    """A WordPiece tokenizer for the 211-token test models (the shipped default's first 211 tokens)."""
    from engine.default_model import default_checkpoint_dir

    vocab = (default_checkpoint_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()[:211]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)


@needs_amx
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
    checked = b.manifest["verification"]["native"]
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


@needs_amx
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
