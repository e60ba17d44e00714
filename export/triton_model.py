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
  batcher can put windows of different requests into one model batch (it batches equal shapes),
  and the HANDOFF tensors: what decoding needs of the tokenization (windows, token characters);
* ``decode``: CONTEXT, the HANDOFF tensors, start_logits, end_logits -> ANSWER, SCORE, START, END,
  IMPOSSIBLE (best first, up to top_k), with SpanRT's span search and post-processing.

Both stages are thin adapters over SpanRT's answering core (engine.answering: prepare, decode,
rank), the code ``engine.Engine`` answers with, so Triton answers exactly as the Engine does. Each
request is tokenized once; the decode stage checks that the logits it got have the shape the
tokenize stage's windows need.
The Triton server's Python environment needs SpanRT installed (``pip install spanrt``, which also
builds the C++ decoder); nothing here imports torch or transformers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.answering import char_spans, decode, host_arrays, label_for, normalize_inputs, prepare, rank
from engine.errors import InvalidInputError
from engine.options import AnswerOptions
from engine.postprocess import Answer, Candidates, collect
from engine.preprocess import TextEncoder
from engine.windows import WindowTable, build_batch

STAGES = ("tokenize", "decode", "engine")
OUTPUTS = ("ANSWER", "SCORE", "START", "END", "IMPOSSIBLE")
# What the tokenize step hands the decode step besides the model inputs, so that decode never
# tokenizes again: (name, Triton data type, dims); export/triton.py wires them through the ensemble.
HANDOFF = (
    ("WINDOWS", "TYPE_INT64", [-1, 2]),  # each window's context tokens [start, stop)
    ("CONTEXT_POS", "TYPE_INT64", [1]),  # where a window's first context token sits
    ("CHARS", "TYPE_INT64", [-1, 2]),  # each context token's [start, end) characters (its word's with align_to_words)
    ("WARNINGS", "TYPE_STRING", [1]),  # the answers' warnings, one per line ("" for none)
)
OPTION_INPUTS = {"TOP_K": "top_k", "MAX_ANSWER_LEN": "max_answer_len", "HANDLE_IMPOSSIBLE": "handle_impossible"}
PAD_POSITION = -1  # START and END of the padding of a row with fewer than k answers
RowOptions = tuple[tuple[str, Any], ...]  # a row's answering options, sorted by name (hashable: rows group by them)
Row = tuple[str, str, RowOptions]  # question, context, options


def _pb_utils() -> Any:
    """Triton's triton_python_backend_utils (present only inside the server's Python backend)."""
    import triton_python_backend_utils

    return triton_python_backend_utils


def _flag(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError(f"expected 'true' or 'false', got {text!r}")
    return text == "true"


def repository_options(params: dict[str, str]) -> AnswerOptions:
    """The answering options a repository was exported with (its config parameters), checked."""
    return AnswerOptions(top_k=int(params["top_k"]), max_answer_len=int(params["max_answer_len"]),
                         handle_impossible=_flag(params["handle_impossible"]), null_threshold=float(params["null_threshold"]),
                         doc_stride=int(params["doc_stride"]) if params["doc_stride"] else None,
                         max_question_len=int(params["max_question_len"]), align_to_words=_flag(params["align_to_words"]))


class QAStages:
    """Tokenize and decode one (question, context) pair with the settings of the repository."""

    def __init__(self, tokenizer_path: str | Path, params: dict[str, str]) -> None:
        self.encoder = TextEncoder(tokenizer_path)
        self.template = self.encoder.template
        self.input_names = tuple(params["input_names"].split(","))
        self.input_dtypes = dict(zip(self.input_names, (np.dtype(t) for t in params["input_dtypes"].split(","))))
        self.pad_token_id = int(params["pad_token_id"])
        self.max_seq_len = int(params["max_seq_len"])
        self.buckets = sorted(int(b) for b in params["length_buckets"].split(","))
        self.max_windows = int(params["max_windows"])
        self.options = repository_options(params).resolve(self.max_seq_len, self.template.num_special)
        self.precision = params["precision"]
        if self.buckets[-1] < self.max_seq_len:
            raise ValueError(f"length_buckets {self.buckets} must reach max_seq_len {self.max_seq_len}")

    def bucket(self, length: int) -> int:
        """The padded length of a request whose longest window has ``length`` tokens."""
        for b in self.buckets:
            if length <= b:
                return b
        raise ValueError(f"window of {length} tokens is longer than the last length bucket {self.buckets[-1]}")

    def tokenize(self, question: str, context: str) -> dict[str, np.ndarray]:
        """The model inputs of the pair's windows, [windows, bucket length], by input name, and the
        HANDOFF tensors the decode step answers from."""
        normalize_inputs(question, context)  # the runtime's own checks and messages
        (example,) = prepare(self.encoder, [question], [context], self.options, label=label_for(True))
        table = WindowTable.from_examples([example], self.template)
        if len(table) > self.max_windows:
            raise InvalidInputError(
                f"the context needs {len(table)} windows of {self.max_seq_len} tokens; this repository's model takes at most "
                f"{self.max_windows} per request (its max_batch_size). Split the context, or export the repository again "
                "with a larger --max-batch-size")
        batch = build_batch([example], table, np.arange(len(table), dtype=np.int64), self.template, self.pad_token_id)
        width = batch.input_ids.shape[1]
        pad = self.bucket(width) - width
        padded = {"input_ids": np.pad(batch.input_ids, ((0, 0), (0, pad)), constant_values=self.pad_token_id),
                  "attention_mask": np.pad(batch.attention_mask, ((0, 0), (0, pad))),
                  "token_type_ids": np.pad(batch.token_type_ids, ((0, 0), (0, pad)))}
        out = {name: np.ascontiguousarray(padded[name], dtype=self.input_dtypes[name]) for name in self.input_names}
        out["WINDOWS"] = np.stack([table.start, table.stop], axis=1)
        out["CONTEXT_POS"] = np.array([example.context_pos], dtype=np.int64)
        out["CHARS"] = np.stack(char_spans(example.context, self.options.align_to_words), axis=1).astype(np.int64)
        out["WARNINGS"] = np.array(["\n".join(example.warnings).encode("utf-8")], dtype=np.object_)
        return out

    def decode(self, context: str, handoff: dict[str, np.ndarray], start_logits: np.ndarray,
               end_logits: np.ndarray) -> dict[str, np.ndarray]:
        """The pair's answers from its windows' logits and the tokenize step's HANDOFF tensors:
        ANSWER/SCORE/START/END/IMPOSSIBLE arrays, best first."""
        windows, chars = handoff["WINDOWS"], handoff["CHARS"]
        context_pos = int(handoff["CONTEXT_POS"].reshape(-1)[0])
        warning_text = handoff["WARNINGS"].reshape(-1)[0]
        warning_text = warning_text.decode("utf-8") if isinstance(warning_text, bytes) else str(warning_text)
        n = len(windows)
        starts, stops = windows[:, 0].astype(np.int64), windows[:, 1].astype(np.int64)
        width = context_pos + int((stops - starts).max()) + len(self.template.suffix) if n else 0
        if n == 0 or start_logits.ndim != 2 or start_logits.shape != end_logits.shape or start_logits.shape[0] != n \
                or start_logits.shape[1] < width or int(stops.max()) > len(chars):
            raise ValueError(f"logits of shape {start_logits.shape} / {end_logits.shape} do not fit this request's "
                             f"{n} windows of up to {width} tokens: the tokenize and decode models of the repository "
                             "disagree; export the repository again with python -m export triton")
        mask = np.zeros(start_logits.shape, dtype=bool)
        for r, (a, z) in enumerate(zip(starts.tolist(), stops.tolist())):
            mask[r, context_pos:context_pos + z - a] = True
        opts = self.options
        result = decode(np.ascontiguousarray(start_logits), np.ascontiguousarray(end_logits), mask, opts)
        candidates = [Candidates()]
        rows = np.arange(n, dtype=np.int64)
        collect(candidates, np.zeros(n, dtype=np.int64), starts, rows, np.full(n, context_pos, dtype=np.int64),
                *host_arrays(result, opts.handle_impossible))
        warnings = tuple(w for w in warning_text.split("\n") if w)
        ranked = rank(candidates[0], context, (chars[:, 0], chars[:, 1]), warnings, opts, backend="triton",
                      precision=self.precision)
        return {name: array[0] for name, array in answer_arrays([ranked]).items()}


class EngineStage:
    """The CPU repository's model: rows of (question, context) plus options -> answers, by one Engine."""

    def __init__(self, bundle_dir: str | Path, params: dict[str, str]) -> None:
        from engine import Engine  # the runtime itself: the answers are Engine.answer_batch's

        threads = int(params["threads"]) if params["threads"] else None
        self.engine = Engine(bundle_dir, backend=params["backend"], precision=params["precision"] or None, threads=threads)
        self.engine.warmup()
        self.defaults: dict[str, Any] = dataclasses.asdict(repository_options(params))
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
        groups: dict[RowOptions, list[tuple[int, int]]] = {}
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

    def _answer(self, rows: dict[int, list[Row]], members: list[tuple[int, int]], options: RowOptions
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


def _array(pb: Any, request: Any, name: str) -> np.ndarray:
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InvalidInputError(f"input {name} is missing")
    return tensor.as_numpy()


def _text(pb: Any, request: Any, name: str) -> str:
    values = _array(pb, request, name).reshape(-1)
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
                if self.stage == "tokenize":
                    arrays = self.stages.tokenize(_text(pb, request, "QUESTION"), _text(pb, request, "CONTEXT"))
                else:
                    handoff = {name: _array(pb, request, name) for name, _, _ in HANDOFF}
                    arrays = self.stages.decode(_text(pb, request, "CONTEXT"), handoff, _array(pb, request, "start_logits"),
                                                _array(pb, request, "end_logits"))
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(n, a) for n, a in arrays.items()]))
            except Exception as e:  # returned to the client as this request's error, never dropped
                responses.append(error_response(pb, e))
        return responses

    def finalize(self) -> None:
        """Close the Engine of the CPU repository (the ensemble's stages hold nothing to free)."""
        if self.engine_stage is not None:
            self.engine_stage.close()
