"""SpanRT's Triton Python-backend model; ``python -m export triton`` copies this file as model.py.

One file serves the models of both repositories, chosen by the config parameter ``spanrt_stage``.
The CPU repository (``--target cpu``) has one model:

* ``engine``: QUESTION, CONTEXT ([rows, 1] strings) and the optional per-row options TOP_K,
  MAX_ANSWER_LEN, HANDLE_IMPOSSIBLE -> ANSWER, SCORE, START, END, IMPOSSIBLE ([rows, k], best
  first), answered by ``engine.Engine`` (backend "auto" unless the export said otherwise) over the
  bundle copied beside this file. Triton's dynamic batcher hands ``execute`` the requests that
  arrived together; their rows go to ``Engine.answer_batch`` at once (one call per option set).

The GPU repository (``--target gpu``, an ensemble) has two:

* ``tokenize``: QUESTION, CONTEXT (one string each) -> the model inputs of every doc-stride window
  of the pair, [windows, length] int arrays, padded to a length bucket so that Triton's dynamic
  batcher can put windows of different requests into one model batch (it batches equal shapes);
* ``decode``: QUESTION, CONTEXT, start_logits, end_logits -> ANSWER, SCORE, START, END,
  IMPOSSIBLE (best first, up to top_k), with SpanRT's span search and post-processing.

Both stages run SpanRT's own runtime code (engine.preprocess, engine.windows, engine.decode,
engine.postprocess), so Triton answers exactly as ``engine.Engine`` does. The decode stage
re-derives the windows from the strings (the same deterministic tokenization) instead of passing
offsets through the ensemble, and checks that the logits it got have the shape those windows need.
The Triton server's Python environment needs SpanRT installed (``pip install spanrt``, which also
builds the C++ decoder); nothing here imports torch or transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.api import normalize_inputs
from engine.windows import Batch, WindowTable, build_batch
from engine.decode import span_search
from engine.errors import InvalidInputError
from engine.postprocess import Answer, Candidates, collect, finalize
from engine.preprocess import Example, TextEncoder, make_example

STAGES = ("tokenize", "decode", "engine")
OUTPUTS = ("ANSWER", "SCORE", "START", "END", "IMPOSSIBLE")
OPTION_INPUTS = {"TOP_K": "top_k", "MAX_ANSWER_LEN": "max_answer_len", "HANDLE_IMPOSSIBLE": "handle_impossible"}
PAD_POSITION = -1  # START and END of the padding of a row with fewer than k answers
Options = tuple[tuple[str, Any], ...]  # a row's answering options, sorted by name (hashable: rows group by them)
Row = tuple[str, str, Options]  # question, context, options


def _pb_utils() -> Any:
    """Triton's triton_python_backend_utils (present only inside the server's Python backend)."""
    import triton_python_backend_utils

    return triton_python_backend_utils


def _flag(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError(f"expected 'true' or 'false', got {text!r}")
    return text == "true"


class QAStages:
    """Tokenize and decode one (question, context) pair with the settings of the repository."""

    def __init__(self, tokenizer_path: str | Path, params: dict[str, str]) -> None:
        self.encoder = TextEncoder(tokenizer_path)
        self.template = self.encoder.template
        self.input_names = tuple(params["input_names"].split(","))
        self.input_dtypes = dict(zip(self.input_names, (np.dtype(t) for t in params["input_dtypes"].split(","))))
        self.pad_token_id = int(params["pad_token_id"])
        self.max_seq_len = int(params["max_seq_len"])
        self.max_question_len = int(params["max_question_len"])
        self.doc_stride = int(params["doc_stride"]) if params["doc_stride"] else None
        self.buckets = sorted(int(b) for b in params["length_buckets"].split(","))
        self.max_windows = int(params["max_windows"])
        self.top_k = int(params["top_k"])
        self.max_answer_len = int(params["max_answer_len"])
        self.handle_impossible = _flag(params["handle_impossible"])
        self.null_threshold = float(params["null_threshold"])
        self.align_to_words = _flag(params["align_to_words"])
        self.precision = params["precision"]
        if self.buckets[-1] < self.max_seq_len:
            raise ValueError(f"length_buckets {self.buckets} must reach max_seq_len {self.max_seq_len}")

    def windows(self, question: str, context: str) -> tuple[Example, WindowTable, Batch]:
        """The pair's example, its window table, and its windows as one batch padded to the longest."""
        normalize_inputs(question, context)  # the runtime's own checks and messages
        (q_ids,), (ctx,) = self.encoder.encode([question], [context])
        if len(q_ids) == 0:
            raise InvalidInputError("question has no tokens the model knows (only control or unknown characters); "
                                    "pass a question in words")
        if len(ctx.ids) == 0:
            raise InvalidInputError("context has no tokens the model knows (only control or unknown characters); "
                                    "pass a context in words")
        example = make_example(self.template, q_ids, ctx, max_seq_len=self.max_seq_len,
                               max_question_len=self.max_question_len, doc_stride=self.doc_stride)
        table = WindowTable.from_examples([example], self.template)
        if len(table) > self.max_windows:
            raise InvalidInputError(
                f"the context needs {len(table)} windows of {self.max_seq_len} tokens; this repository's model takes at most "
                f"{self.max_windows} per request (its max_batch_size). Split the context, or export the repository again "
                "with a larger --max-batch-size")
        rows = np.arange(len(table), dtype=np.int64)
        return example, table, build_batch([example], table, rows, self.template, self.pad_token_id)

    def bucket(self, length: int) -> int:
        """The padded length of a request whose longest window has ``length`` tokens."""
        for b in self.buckets:
            if length <= b:
                return b
        raise ValueError(f"window of {length} tokens is longer than the last length bucket {self.buckets[-1]}")

    def tokenize(self, question: str, context: str) -> dict[str, np.ndarray]:
        """The model inputs of the pair's windows, [windows, bucket length], by input name."""
        _, _, batch = self.windows(question, context)
        width = batch.input_ids.shape[1]
        pad = self.bucket(width) - width
        padded = {"input_ids": np.pad(batch.input_ids, ((0, 0), (0, pad)), constant_values=self.pad_token_id),
                  "attention_mask": np.pad(batch.attention_mask, ((0, 0), (0, pad))),
                  "token_type_ids": np.pad(batch.token_type_ids, ((0, 0), (0, pad)))}
        return {name: np.ascontiguousarray(padded[name], dtype=self.input_dtypes[name]) for name in self.input_names}

    def decode(self, question: str, context: str, start_logits: np.ndarray, end_logits: np.ndarray) -> dict[str, np.ndarray]:
        """The pair's answers from its windows' logits: ANSWER/SCORE/START/END/IMPOSSIBLE arrays, best first."""
        example, table, batch = self.windows(question, context)
        width = batch.input_ids.shape[1]
        if start_logits.ndim != 2 or start_logits.shape != end_logits.shape or start_logits.shape[0] != len(table) \
                or start_logits.shape[1] < width:
            raise ValueError(f"logits of shape {start_logits.shape} / {end_logits.shape} do not fit this request's "
                             f"{len(table)} windows of up to {width} tokens: the tokenize and decode models of the repository "
                             "disagree; export the repository again with python -m export triton")
        seq = start_logits.shape[1]
        mask = np.zeros((len(table), seq), dtype=bool)
        mask[:, :width] = batch.context_mask
        k = self.top_k * 2 + 10 if self.align_to_words else self.top_k  # as Engine: word snapping merges candidates
        result = span_search(np.ascontiguousarray(start_logits), np.ascontiguousarray(end_logits), mask,
                             max_answer_len=min(self.max_answer_len, seq), top_k=k, return_lse=True,
                             return_null=self.handle_impossible)
        candidates = [Candidates()]
        rows = np.arange(len(table), dtype=np.int64)
        context_pos = np.full(len(table), example.context_pos, dtype=np.int64)
        collect(candidates, table.example, table.start, rows, context_pos, np.asarray(result.spans), np.asarray(result.scores),
                np.asarray(result.start_lse), np.asarray(result.end_lse),
                np.asarray(result.null_scores) if self.handle_impossible else None)
        ranked = finalize(example, candidates[0], top_k=self.top_k, align_to_words=self.align_to_words,
                          handle_impossible=self.handle_impossible, null_threshold=self.null_threshold,
                          backend="triton", precision=self.precision)
        if not ranked:  # no token span has characters: nothing to point at (as Engine answers)
            ranked = [Answer("", 0, 0, 0.0, "triton", self.precision, True,
                             (*example.warnings, "no span of the context could be an answer"))]
        return {name: array[0] for name, array in answer_arrays([ranked]).items()}


class EngineStage:
    """The CPU repository's model: rows of (question, context) plus options -> answers, by one Engine."""

    def __init__(self, bundle_dir: str | Path, params: dict[str, str]) -> None:
        from engine import Engine  # the runtime itself: the answers are Engine.answer_batch's

        threads = int(params["threads"]) if params["threads"] else None
        self.engine = Engine(bundle_dir, backend=params["backend"], precision=params["precision"] or None, threads=threads)
        self.engine.warmup()
        self.defaults: dict[str, Any] = {
            "top_k": int(params["top_k"]), "max_answer_len": int(params["max_answer_len"]),
            "handle_impossible": _flag(params["handle_impossible"]), "null_threshold": float(params["null_threshold"]),
            "doc_stride": int(params["doc_stride"]) if params["doc_stride"] else None,
            "max_question_len": int(params["max_question_len"]), "align_to_words": _flag(params["align_to_words"])}
        self.max_context_bytes = int(params["max_context_bytes"])

    def rows(self, pb: Any, request: Any) -> list[Row]:
        """A request's rows: (question, context, options), the options as a hashable sorted tuple."""
        questions, contexts = _strings(pb, request, "QUESTION"), _strings(pb, request, "CONTEXT")
        if len(questions) != len(contexts):
            raise InvalidInputError(f"QUESTION has {len(questions)} rows but CONTEXT {len(contexts)}; send one per row")
        if not questions:
            raise InvalidInputError("the request has no rows (batch size 0); send at least one question")
        per_row: list[dict[str, Any]] = [dict(self.defaults) for _ in questions]
        for name, option in OPTION_INPUTS.items():
            tensor = pb.get_input_tensor_by_name(request, name)
            if tensor is None:
                continue
            values = tensor.as_numpy().reshape(-1)
            if len(values) != len(questions):
                raise InvalidInputError(f"{name} has {len(values)} values for {len(questions)} rows; send one per row")
            for row, v in zip(per_row, values):
                row[option] = v.item()
        out = []
        for i, (q, c) in enumerate(zip(questions, contexts)):
            if len(c) > self.max_context_bytes:
                raise InvalidInputError(f"CONTEXT row {i} has {len(c)} bytes; this repository answers contexts of at most "
                                        f"{self.max_context_bytes} bytes (export it again with a larger --max-context-bytes, "
                                        "or split the document)")
            out.append((_utf8(q, "QUESTION", i), _utf8(c, "CONTEXT", i), tuple(sorted(per_row[i].items()))))
        return out

    def execute(self, pb: Any, requests: list[Any]) -> list[Any]:
        """Answer every row of every request; rows with equal options go to one Engine.answer_batch call.
        A failing call is answered again request by request, so only the bad request gets the error."""
        errors: dict[int, BaseException] = {}
        rows: dict[int, list[Row]] = {}
        for i, request in enumerate(requests):
            try:
                rows[i] = self.rows(pb, request)
            except Exception as e:  # this request's error, never the others'
                errors[i] = e
        groups: dict[Options, list[tuple[int, int]]] = {}
        for i, request_rows in rows.items():
            for j, (_, _, options) in enumerate(request_rows):
                groups.setdefault(options, []).append((i, j))
        answers: dict[tuple[int, int], list[Answer]] = {}
        for options, members in groups.items():
            try:
                answers.update(self._answer(rows, members, options))
            except Exception:
                for i in sorted({i for i, _ in members}):
                    try:
                        answers.update(self._answer(rows, [(r, j) for r, j in members if r == i], options))
                    except Exception as e:
                        errors[i] = e
        responses = []
        for i in range(len(requests)):
            if i in errors:
                responses.append(error_response(pb, errors[i]))
                continue
            arrays = answer_arrays([answers[(i, j)] for j in range(len(rows[i]))])
            responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(n, a) for n, a in arrays.items()]))
        return responses

    def _answer(self, rows: dict[int, list[Row]], members: list[tuple[int, int]], options: Options
                ) -> dict[tuple[int, int], list[Answer]]:
        """One Engine.answer_batch call for the rows ``members`` (request, row), which share ``options``."""
        ranked = self.engine.answer_batch([rows[i][j][0] for i, j in members], [rows[i][j][1] for i, j in members],
                                          **dict(options))
        return dict(zip(members, ranked))

    def close(self) -> None:
        """Free the Engine."""
        self.engine.close()


def error_response(pb: Any, error: BaseException) -> Any:
    """A request's error response: INVALID_ARG (HTTP 400) for what the caller sent, INTERNAL (500) otherwise."""
    code = pb.TritonError.INVALID_ARG if isinstance(error, InvalidInputError) else pb.TritonError.INTERNAL
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(f"{type(error).__name__}: {error}", code))


def answer_arrays(ranked: list[list[Answer]]) -> dict[str, np.ndarray]:
    """The output tensors of a request: [rows, k] with k the most answers any row has; shorter rows
    are padded with empty answers at START = END = PAD_POSITION and SCORE 0."""
    k = max(len(r) for r in ranked)
    out = {"ANSWER": np.full((len(ranked), k), b"", dtype=np.object_), "SCORE": np.zeros((len(ranked), k), np.float32),
           "START": np.full((len(ranked), k), PAD_POSITION, np.int64), "END": np.full((len(ranked), k), PAD_POSITION, np.int64),
           "IMPOSSIBLE": np.zeros((len(ranked), k), np.bool_)}
    for i, row in enumerate(ranked):
        for j, a in enumerate(row):
            out["ANSWER"][i, j] = a.text.encode("utf-8")
            out["SCORE"][i, j], out["START"][i, j], out["END"][i, j] = a.score, a.start, a.end
            out["IMPOSSIBLE"][i, j] = a.impossible
    return out


def _strings(pb: Any, request: Any, name: str) -> list[bytes]:
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InvalidInputError(f"input {name} is missing")
    return [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in tensor.as_numpy().reshape(-1)]


def _utf8(value: bytes, name: str, row: int) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{name} row {row} is not valid UTF-8 ({e})") from None


def _text(pb: Any, request: Any, name: str) -> str:
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InvalidInputError(f"input {name} is missing")
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise InvalidInputError(f"{name} must hold exactly one string, got {values.size}")
    value = values[0]
    return _utf8(value, name, 0) if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    """The Python-backend entry points: initialize, execute, finalize."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the stage and settings from the model config; load the tokenizer beside this file."""
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}  # "" may be omitted
        self.stage = params.get("spanrt_stage")
        if self.stage not in STAGES:
            raise ValueError(f"config parameter spanrt_stage must be one of {STAGES}, got {self.stage!r}")
        folder = Path(args["model_repository"]) / str(args["model_version"])
        if self.stage == "engine":
            self.engine_stage: EngineStage | None = EngineStage(folder / "bundle", params)
            return
        self.engine_stage = None
        self.stages = QAStages(folder / "tokenizer.json", params)

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request; a request that fails gets its error message, the others their results."""
        pb = _pb_utils()
        if self.engine_stage is not None:
            return self.engine_stage.execute(pb, requests)
        responses = []
        for request in requests:
            try:
                question, context = _text(pb, request, "QUESTION"), _text(pb, request, "CONTEXT")
                if self.stage == "tokenize":
                    arrays = self.stages.tokenize(question, context)
                else:
                    start = pb.get_input_tensor_by_name(request, "start_logits").as_numpy()
                    end = pb.get_input_tensor_by_name(request, "end_logits").as_numpy()
                    arrays = self.stages.decode(question, context, start, end)
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(n, a) for n, a in arrays.items()]))
            except Exception as e:  # returned to the client as this request's error, never dropped
                responses.append(error_response(pb, e))
        return responses

    def finalize(self) -> None:
        """Close the Engine of the CPU repository (the ensemble's stages hold nothing to free)."""
        if self.engine_stage is not None:
            self.engine_stage.close()
