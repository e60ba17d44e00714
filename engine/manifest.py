"""The bundle manifest (manifest.json, format v1): its one schema, written and read through it.

:class:`Manifest` (with :class:`TokenizerEntry` and :class:`ArtifactEntry`) is what the export
stage (export/pipeline.py, export/tensorrt.py) and the runtime's native bundle
(engine/native_bundle.py) write with ``to_json``, and what the runtime's loader
(engine/bundle.py) reads with ``from_json``. ``from_json`` checks every field the runtime uses for
its type and range (a :class:`engine.errors.BundleError` naming the field and the fix); the loader
then checks the files the manifest names. The records that describe how the bundle was made
(source, versions, verification, export, build, accuracy) and what the export recorded about each
file (an artifact's ``details``: the native encoder's config, a plan's TensorRT version and GPU, a
graph's fusions) are JSON objects kept as written; keys this version does not know are kept too
(``extra``), so reading a manifest and writing it back loses nothing. Stdlib only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import BundleError, brief

FORMAT = "spanrt-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

MODEL_TYPES = ("bert", "distilbert", "roberta", "electra", "xlm-roberta", "camembert", "albert", "mpnet", "deberta-v2", "modernbert")
# "onnx": graphs for ONNX Runtime (may hold com.microsoft fused ops);
# "onnx-trt": standard-op graphs, the inputs `python -m export build-trt` builds plans from;
# "tensorrt": serialized TensorRT engines (.plan), valid for one TensorRT version and one GPU;
# "native": float32 weights (.npz, no pickle) of the native encoder, its config in the entry.
ARTIFACT_FORMATS = ("onnx", "onnx-trt", "tensorrt", "native")
PRECISIONS = ("fp32", "fp16", "int8")
KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("start_logits", "end_logits")
SPECIAL_ROLES = ("cls", "sep", "pad")
PAIR_TEMPLATE_PARTS = ("prefix", "middle", "suffix")
MAX_COUNT = 1 << 31  # any size in a manifest (tokens, vocabulary) is below this
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# The records about how a bundle was made: JSON objects, kept as written.
RECORDS = ("source", "native_encoder", "versions", "verification", "export", "build", "accuracy")


def fix_hint(root: Path | str) -> str:
    """The usual fix for a bad bundle: export it again."""
    return f"export the bundle again: python -m export MODEL_DIR --out {root} --force"


def bundle_error(root: Path | str, what: str, problem: str, fix: str | None = None) -> BundleError:
    """The BundleError of every bundle check: the bundle, the file or field, the problem, the fix."""
    return BundleError(f"bundle {root}: {what}: {problem}. Fix: {fix or fix_hint(root)}")


class _Reader:
    """Typed access to one JSON object of a manifest; every problem is a BundleError naming the key."""

    def __init__(self, root: Path | str, data: dict[str, Any], where: str = "") -> None:
        self.root, self.data, self.where = root, data, where

    def fail(self, problem: str) -> BundleError:
        return bundle_error(self.root, MANIFEST_NAME, problem)

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self.data:
            raise self.fail(f"malformed: missing key {self.where}{key!r}")
        v = self.data[key]
        # bool is an int subclass: a count written as true/false is malformed.
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
            raise self.fail(f"malformed: {self.where}{key!r} is {type(v).__name__}, expected {getattr(kind, '__name__', kind)}")
        return v

    def optional(self, key: str, kind: type | tuple[type, ...]) -> Any:
        return self.get(key, kind) if self.data.get(key) is not None else None

    def positive_int(self, key: str) -> int:
        v = self.get(key, int)
        if not 0 < v < MAX_COUNT:
            raise self.fail(f"malformed: {self.where}{key!r} must be between 1 and {MAX_COUNT - 1}, got {brief(v)}")
        return v

    def optional_positive_int(self, key: str) -> int | None:
        return self.positive_int(key) if self.data.get(key) is not None else None

    def sha256(self, key: str) -> str:
        v = self.get(key, str)
        if not SHA256_HEX.match(v):
            raise self.fail(f"malformed: {self.where}{key} {v!r}")
        return v

    def extra(self, known: tuple[str, ...]) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k not in known}


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` unless ``value`` is None (an absent optional field stays absent)."""
    if value is not None:
        out[key] = value


@dataclass(frozen=True, kw_only=True)
class TokenizerEntry:
    """The manifest's ``tokenizer``: the tokenizer.json file and the model's special tokens."""

    path: str
    sha256: str
    cls_token_id: int
    sep_token_id: int
    pad_token_id: int
    cls_token: str | None = None
    sep_token: str | None = None
    pad_token: str | None = None
    # The special-token ids around a (question, context) pair that the model was exported with;
    # None in bundles from before it was recorded.
    pair_template: dict[str, tuple[int, ...]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def token_id(self, role: str) -> int:
        """The id of the special token of ``role`` (cls, sep or pad)."""
        return int(getattr(self, f"{role}_token_id"))

    def to_json(self) -> dict[str, Any]:
        """The entry as written in manifest.json."""
        out: dict[str, Any] = {"path": self.path, "sha256": self.sha256}
        for role in SPECIAL_ROLES:
            _put(out, f"{role}_token", getattr(self, f"{role}_token"))
            out[f"{role}_token_id"] = self.token_id(role)
        if self.pair_template is not None:
            out["pair_template"] = {p: list(self.pair_template[p]) for p in PAIR_TEMPLATE_PARTS}
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any], *, root: Path | str, vocab_size: int) -> TokenizerEntry:
        """The checked entry (``vocab_size``: the model's, which every special id must be below)."""
        r = _Reader(root, data, "tokenizer.")
        path, sha = r.get("path", str), r.sha256("sha256")
        ids = {role: r.get(f"{role}_token_id", int) for role in SPECIAL_ROLES}
        template = _pair_template(r, data.get("pair_template"), vocab_size)
        tokens: dict[str, str | None] = {}
        for role in SPECIAL_ROLES:
            token = data.get(f"{role}_token")
            if not 0 <= ids[role] < vocab_size:
                raise r.fail(f"tokenizer {role}_token_id {brief(ids[role])} is outside the vocabulary (size {vocab_size})")
            if token is not None and not isinstance(token, str):
                raise r.fail(f"malformed: tokenizer.{role}_token is {type(token).__name__}, expected str")
            tokens[role] = token
        known = ("path", "sha256", "pair_template", *(f"{role}_token{s}" for role in SPECIAL_ROLES for s in ("", "_id")))
        return cls(path=path, sha256=sha, cls_token_id=ids["cls"], sep_token_id=ids["sep"], pad_token_id=ids["pad"],
                   cls_token=tokens["cls"], sep_token=tokens["sep"], pad_token=tokens["pad"], pair_template=template,
                   extra=r.extra(known))


def _pair_template(r: _Reader, value: Any, vocab_size: int) -> dict[str, tuple[int, ...]] | None:
    if value is None:
        return None
    parts = PAIR_TEMPLATE_PARTS
    if (not isinstance(value, dict) or set(value) != set(parts)
            or not all(isinstance(value[p], list) and len(value[p]) <= 16 for p in parts)
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for p in parts for t in value[p])):
        raise r.fail(f"malformed: tokenizer.pair_template {brief(value, 120)} (expected lists of token ids under {', '.join(parts)})")
    return {p: tuple(value[p]) for p in parts}


@dataclass(frozen=True, kw_only=True)
class ArtifactEntry:
    """One model file in the manifest's ``artifacts``: where, what, its sha256, and what the export
    recorded about it (``details``: ``encoder`` for a native one, the build of a TensorRT plan,
    a graph's optimizer and quantization)."""

    path: str
    format: str
    precision: str
    sha256: str
    bytes: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The entry as written in manifest.json."""
        out: dict[str, Any] = {"path": self.path, "format": self.format, "precision": self.precision, "sha256": self.sha256}
        _put(out, "bytes", self.bytes)
        return {**out, **self.details}

    @classmethod
    def from_json(cls, data: Any, *, root: Path | str, index: int) -> ArtifactEntry:
        """The checked entry at ``artifacts[index]``."""
        if not isinstance(data, dict):
            raise bundle_error(root, MANIFEST_NAME, f"malformed: artifacts[{index}] is not an object")
        where = f"artifacts[{index}]."
        r = _Reader(root, data, where)
        path, fmt, prec, sha = r.get("path", str), r.get("format", str), r.get("precision", str), r.get("sha256", str)
        if fmt not in ARTIFACT_FORMATS or prec not in PRECISIONS:
            raise r.fail(f"{where[:-1]}: unknown format/precision {fmt!r}/{prec!r} (known: {ARTIFACT_FORMATS} x {PRECISIONS})")
        sha = r.sha256("sha256")
        size = data.get("bytes")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise r.fail(f"malformed: {where}'bytes' is {brief(size)}, expected a file size")
        return cls(path=path, format=fmt, precision=prec, sha256=sha, bytes=size,
                   details=r.extra(("path", "format", "precision", "sha256", "bytes")))


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A bundle's manifest.json: the model it holds, its tokenizer, its files, and how it was made.

    Fields left None are absent from the JSON (``do_lower_case`` is written as null: unknown)."""

    model_type: str
    max_seq_len: int
    vocab_size: int  # tokens of the tokenizer
    inputs: tuple[str, ...]
    tokenizer: TokenizerEntry
    outputs: tuple[str, ...] = OUTPUT_NAMES
    artifacts: tuple[ArtifactEntry, ...] = ()
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    architecture: str | None = None  # the span-head class, e.g. BertForQuestionAnswering
    model_vocab_size: int | None = None  # rows of the model's embedding table
    max_positions: int | None = None  # positions the model can embed
    do_lower_case: bool | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    source: dict[str, Any] | None = None  # the checkpoint: path, weights_sha256, weights
    native_encoder: dict[str, Any] | None = None  # whether the native weights were written, and why not
    versions: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None
    export: dict[str, Any] | None = None  # python -m export's options and timings
    build: dict[str, Any] | None = None  # engine.native_bundle's
    accuracy: dict[str, Any] | None = None  # measured figures (e.g. SQuAD dev EM/F1)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as written

    def to_json(self) -> dict[str, Any]:
        """The manifest as written in manifest.json (the export's key order)."""
        out: dict[str, Any] = {"format": self.format, "format_version": self.format_version, "model_type": self.model_type}
        _put(out, "architecture", self.architecture)
        _put(out, "source", self.source)
        out.update(max_seq_len=self.max_seq_len, vocab_size=self.vocab_size)
        _put(out, "model_vocab_size", self.model_vocab_size)
        _put(out, "max_positions", self.max_positions)
        out.update(do_lower_case=self.do_lower_case, inputs=list(self.inputs), outputs=list(self.outputs))
        for key in ("num_layers", "hidden_size", "num_heads", "native_encoder"):
            _put(out, key, getattr(self, key))
        out["tokenizer"] = self.tokenizer.to_json()
        for key in ("versions", "verification", "export", "build", "accuracy"):
            _put(out, key, getattr(self, key))
        out["artifacts"] = [a.to_json() for a in self.artifacts]
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Any, *, root: Path | str) -> Manifest:
        """The checked manifest of bundle ``root`` (named in the messages); a BundleError says what is wrong."""
        if not isinstance(data, dict):
            raise bundle_error(root, MANIFEST_NAME, "malformed: the top level is not a JSON object")
        r = _Reader(root, data)
        _check_header(r)
        model_type = r.get("model_type", str)
        if model_type not in MODEL_TYPES:
            raise r.fail(f"unsupported model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})")
        max_seq_len, vocab_size = r.positive_int("max_seq_len"), r.positive_int("vocab_size")
        model_vocab_size, max_positions = r.optional_positive_int("model_vocab_size"), r.optional_positive_int("max_positions")
        if max_positions is not None and max_seq_len > max_positions:
            raise r.fail(f"max_seq_len {max_seq_len} is above the model's {max_positions} positions "
                         "(max_positions): longer windows would index past its position table")
        inputs = r.get("inputs", list)
        if not inputs or any(not isinstance(n, str) or n not in KNOWN_INPUTS for n in inputs) or len(set(inputs)) != len(inputs):
            raise r.fail(f"malformed: inputs {inputs!r} (expected distinct names from {KNOWN_INPUTS})")
        if "input_ids" not in inputs:
            raise r.fail("malformed: inputs must include 'input_ids'")
        outputs = r.get("outputs", list)
        if outputs != list(OUTPUT_NAMES):
            raise r.fail(f"malformed: outputs {outputs!r} (expected {list(OUTPUT_NAMES)})")
        do_lower_case = data.get("do_lower_case")
        if do_lower_case is not None and not isinstance(do_lower_case, bool):
            raise r.fail(f"malformed: do_lower_case {do_lower_case!r}")
        tokenizer = TokenizerEntry.from_json(r.get("tokenizer", dict), root=root, vocab_size=vocab_size)
        artifacts = tuple(ArtifactEntry.from_json(e, root=root, index=i) for i, e in enumerate(r.get("artifacts", list)))
        seen: set[tuple[str, str]] = set()
        for a in artifacts:
            if (a.format, a.precision) in seen:
                raise r.fail(f"two artifacts with format {a.format!r} and precision {a.precision!r}")
            seen.add((a.format, a.precision))
        if not artifacts:
            raise r.fail("the bundle lists no model artifacts")
        sizes = {k: r.optional(k, int) for k in ("num_layers", "hidden_size", "num_heads")}
        records = {k: r.optional(k, dict) for k in RECORDS}
        known = ("format", "format_version", "model_type", "architecture", "max_seq_len", "vocab_size", "model_vocab_size",
                 "max_positions", "do_lower_case", "inputs", "outputs", "tokenizer", "artifacts", *sizes, *records)
        return cls(model_type=model_type, max_seq_len=max_seq_len, vocab_size=vocab_size, inputs=tuple(inputs),
                   outputs=tuple(outputs), tokenizer=tokenizer, artifacts=artifacts, format_version=data["format_version"],
                   architecture=r.optional("architecture", str), model_vocab_size=model_vocab_size, max_positions=max_positions,
                   do_lower_case=do_lower_case, **sizes, **records, extra=r.extra(known))

    def find(self, format: str, precision: str) -> ArtifactEntry | None:  # noqa: A002 - spec name
        """The entry of this format and precision, or None."""
        return next((a for a in self.artifacts if (a.format, a.precision) == (format, precision)), None)


def _check_header(r: _Reader) -> None:
    m = r.data
    if m.get("format") != FORMAT:
        raise r.fail(f"not a SpanRT bundle manifest (format {m.get('format')!r}, expected {FORMAT!r})")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise r.fail(f"malformed: format_version {version!r}")
    if version > FORMAT_VERSION:
        raise bundle_error(r.root, MANIFEST_NAME, f"bundle format version {version} is newer than this SpanRT reads ({FORMAT_VERSION})",
                           f"upgrade spanrt, or {fix_hint(r.root)} with this version")
