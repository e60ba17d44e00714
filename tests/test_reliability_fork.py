"""Reliability round 2 (issue 19): an Engine stays usable in a child forked while other threads are
inside the model.

ONNX Runtime's thread pool does not survive fork(): a child forked while another thread was inside
``InferenceSession.run`` could hang in its next ``answer`` (1 in 10 to 1 in 60 children in the
adversarial run; here, with the model below whose matmuls ONNX Runtime splits over its threads,
3 of 200 children hung inside ``run`` without the fix, 0 of 200 with it). Python 3.11's
functools.cached_property also held one lock per class, which a parent thread could hold at the
fork (2 of 60 children hung in it on the plain lookup model); it is gone. The
ONNX Runtime backend now opens its session again in a new process and never touches the inherited
one; the Engine's own locks are renewed in the child. A BatchingEngine, whose worker threads do not
exist in the child, refuses with a typed error that says to create it after the fork.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_helpers import lookup_bundle, planted

from engine import Engine
from engine.dynamic_batching import BatchingEngine, WorkerDiedError

ANSWER = "Zanzibar Island"
CONTEXT = " ".join(["The crew mended sails and counted stores."] * 12) + " After a long voyage the ship sailed to Zanzibar Island."
QUESTION = "Where did the ship sail?"
CHILDREN = 40
CHILD_TIMEOUT_S = 60

_shared: dict[str, Any] = {}  # what the forked children inherit


def add_heavy_branch(root: Path, width: int = 512) -> None:
    """Rewrite the bundle's fp32 lookup model so each call also runs two [B*S, width] matmuls
    (their result times zero is added to the logits): ONNX Runtime splits those over its threads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    path = root / "model.fp32.onnx"
    model = onnx.load(str(path))
    g = model.graph
    rng = np.random.default_rng(0)
    g.initializer.extend([numpy_helper.from_array(rng.standard_normal((1, width)).astype(np.float32), "heavy_w1"),
                          numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) / width, "heavy_w2"),
                          numpy_helper.from_array(np.array([-1], np.int64), "heavy_axis"),
                          numpy_helper.from_array(np.array(0.0, np.float32), "heavy_zero")])
    for node in g.node:  # the start logits' last Add now writes a temporary
        if list(node.output) == ["start_logits"]:
            node.output[0] = "start_plain"
    g.node.extend([
        helper.make_node("Cast", ["input_ids"], ["heavy_x"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["heavy_x", "heavy_axis"], ["heavy_x3"]),
        helper.make_node("MatMul", ["heavy_x3", "heavy_w1"], ["heavy_h1"]),
        helper.make_node("MatMul", ["heavy_h1", "heavy_w2"], ["heavy_h2"]),
        helper.make_node("ReduceSum", ["heavy_h2", "heavy_axis"], ["heavy_sum"], keepdims=0),
        helper.make_node("Mul", ["heavy_sum", "heavy_zero"], ["heavy_nothing"]),
        helper.make_node("Add", ["start_plain", "heavy_nothing"], ["start_logits"]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    m = json.loads((root / "manifest.json").read_text())
    m["artifacts"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = lookup_bundle(tmp_path_factory.mktemp("fork"), **planted(ANSWER), max_seq_len=48)
    add_heavy_branch(root)
    return root


def _child_answers(conn: Any) -> None:
    try:
        texts = [_shared["engine"].answer(QUESTION, CONTEXT).text for _ in range(3)]
        conn.send(("ok", texts))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
        conn.send(("error", f"{type(e).__name__}: {e}"))


@pytest.fixture
def busy_engine(bundle: Path) -> Iterator[Engine]:
    """An Engine with two threads answering in a loop: forks land while they are inside ONNX Runtime."""
    eng = Engine(bundle, backend="onnxruntime", threads=2, max_batch_size=1, context_cache=0)
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            eng.answer(QUESTION, CONTEXT)

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    _shared["engine"] = eng
    try:
        yield eng
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        _shared.clear()
        eng.close()


def test_children_forked_while_threads_run_the_model_answer(busy_engine: Engine) -> None:
    ctx = multiprocessing.get_context("fork")
    hung, results = [], []
    for i in range(CHILDREN):
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_answers, args=(child_end,), daemon=True)
        proc.start()
        child_end.close()
        if parent_end.poll(CHILD_TIMEOUT_S):
            results.append(parent_end.recv())
            proc.join(CHILD_TIMEOUT_S)
        else:
            hung.append(i)
            proc.kill()
            proc.join(5)
        parent_end.close()
    assert not hung, f"{len(hung)} of {CHILDREN} forked children did not answer within {CHILD_TIMEOUT_S}s: {hung}"
    assert results == [("ok", [ANSWER] * 3)] * CHILDREN, [r for r in results if r[0] != "ok"][:3]
    assert busy_engine.answer(QUESTION, CONTEXT).text == ANSWER  # the parent is unaffected


def _child_batching(conn: Any) -> None:
    try:
        _shared["batching"].answer(QUESTION, CONTEXT, timeout=10)
        conn.send("answered")
    except WorkerDiedError as e:
        conn.send(str(e))


def test_a_batching_engine_in_a_forked_child_refuses_with_a_typed_error(bundle: Path) -> None:
    with Engine(bundle, backend="onnxruntime", threads=1) as eng, BatchingEngine(eng, max_delay_ms=0) as be:
        assert be.answer(QUESTION, CONTEXT).text == ANSWER
        _shared["batching"] = be
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_batching, args=(child_end,), daemon=True)
        proc.start()
        try:
            assert parent_end.poll(CHILD_TIMEOUT_S), "the child hung"
            message = parent_end.recv()
        finally:
            proc.join(10)
            _shared.clear()
        assert "Create the BatchingEngine after the fork" in message, message
        assert be.answer(QUESTION, CONTEXT).text == ANSWER
