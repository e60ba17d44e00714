"""Reading and verifying a SpanRT bundle (format v1): manifest.json plus the files it lists.

A bundle is data, never code: only JSON is parsed here (no pickle, no torch), every listed path
must stay inside the bundle folder, and every file is checked against its sha256 before use.
Every problem is a :class:`engine.errors.BundleError` that names the file and the fix.
Stdlib + NumPy only (the runtime must not need torch, transformers or onnx).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from engine.errors import BundleError

FORMAT = "spanrt-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

MODEL_TYPES = ("bert", "distilbert", "roberta", "electra")
# "onnx": graphs for ONNX Runtime (may hold com.microsoft fused ops);
# "onnx-trt": standard-op graphs, the inputs `python -m export build-trt` builds plans from;
# "tensorrt": serialized TensorRT engines (.plan), valid for one TensorRT version and one GPU;
# "native": float32 weights (.npz, no pickle) of the native encoder, its config in the entry.
ARTIFACT_FORMATS = ("onnx", "onnx-trt", "tensorrt", "native")
PRECISIONS = ("fp32", "fp16", "int8")
KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Artifact:
    """One model file of a bundle: where it is, what it is, and its raw manifest entry."""

    path: Path
    format: str
    precision: str
    sha256: str
    info: dict[str, Any] = field(compare=False)


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: the manifest's fields the runtime needs, with absolute paths."""

    root: Path
    manifest: dict[str, Any] = field(compare=False)
    model_type: str
    max_seq_len: int
    vocab_size: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    tokenizer_path: Path
    cls_token_id: int
    sep_token_id: int
    pad_token_id: int
    artifacts: tuple[Artifact, ...]
    do_lower_case: bool | None = None

    def find(self, format: str, precision: str) -> Artifact | None:  # noqa: A002 - spec name
        """The artifact of this format and precision, or None when the bundle has none."""
        for a in self.artifacts:
            if a.format == format and a.precision == precision:
                return a
        return None

    def precisions(self, format: str) -> tuple[str, ...]:  # noqa: A002 - spec name
        """The precisions available in this format, in manifest order."""
        return tuple(a.precision for a in self.artifacts if a.format == format)


def _fix(root: Path) -> str:
    return f"export the bundle again: python -m export MODEL_DIR --out {root} --force"


def _fail(root: Path, what: str, problem: str, fix: str | None = None) -> BundleError:
    return BundleError(f"bundle {root}: {what}: {problem}. Fix: {fix or _fix(root)}")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def resolve_inside(root: Path, rel: Any, what: str) -> Path:
    """The absolute path of a manifest-relative path; absolute paths and escapes are refused."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise _fail(root, MANIFEST_NAME, f"{what} path {rel!r} is not a non-empty relative path")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise _fail(root, MANIFEST_NAME, f"{what} path {rel!r} is absolute; bundle paths must be relative to the bundle folder")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise _fail(root, MANIFEST_NAME, f"{what} path {rel!r} points outside the bundle folder ('..' is not allowed)")
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise _fail(root, rel, f"{what} resolves to {path}, outside the bundle folder (a link leaving the bundle)")
    return path


def _check_file(root: Path, path: Path, rel: str, expected: str, verify: bool) -> None:
    if not path.is_file():
        raise _fail(root, rel, "file is missing")
    if verify:
        actual = sha256_file(path)
        if actual != expected:
            raise _fail(root, rel, f"sha256 mismatch (file is damaged or was altered: expected {expected[:16]}..., found {actual[:16]}...)")


def _manifest_path(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        return p.resolve(), p.resolve() / MANIFEST_NAME
    if p.name == MANIFEST_NAME:
        return p.parent.resolve(), p.resolve()
    if not p.exists():
        raise BundleError(f"bundle {p}: not found. Fix: pass a bundle folder made by python -m export MODEL_DIR --out {p}")
    raise BundleError(f"bundle {p}: not a bundle folder or {MANIFEST_NAME}. Fix: pass the folder made by python -m export")


def _read_json(root: Path, mpath: Path) -> dict[str, Any]:
    if not mpath.is_file():
        raise _fail(root, MANIFEST_NAME, "file is missing (not a bundle, or an interrupted export)")
    try:
        data = json.loads(mpath.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(root, MANIFEST_NAME, f"malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise _fail(root, MANIFEST_NAME, "malformed: the top level is not a JSON object")
    return data


def _get(root: Path, d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    if key not in d:
        raise _fail(root, MANIFEST_NAME, f"malformed: missing key {where}{key!r}")
    v = d[key]
    # bool is an int subclass: a count written as true/false is malformed.
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
        raise _fail(root, MANIFEST_NAME, f"malformed: {where}{key!r} is {type(v).__name__}, expected {getattr(kind, '__name__', kind)}")
    return v


def _positive_int(root: Path, d: dict[str, Any], key: str, where: str = "") -> int:
    v = _get(root, d, key, int, where)
    if v <= 0:
        raise _fail(root, MANIFEST_NAME, f"malformed: {where}{key!r} must be > 0, got {v}")
    return v


def _check_header(root: Path, m: dict[str, Any]) -> None:
    if m.get("format") != FORMAT:
        raise _fail(root, MANIFEST_NAME, f"not a SpanRT bundle manifest (format {m.get('format')!r}, expected {FORMAT!r})")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(root, MANIFEST_NAME, f"malformed: format_version {version!r}")
    if version > FORMAT_VERSION:
        raise _fail(
            root, MANIFEST_NAME,
            f"bundle format version {version} is newer than this SpanRT reads ({FORMAT_VERSION})",
            f"upgrade spanrt, or {_fix(root)} with this version",
        )


def tokenizer_vocab(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    """Token -> id of a Hugging Face tokenizer.json (model vocabulary plus added tokens)."""
    vocab: dict[str, int] = {}
    model_vocab = tokenizer_json.get("model", {}).get("vocab")
    if isinstance(model_vocab, dict):  # WordPiece, BPE, WordLevel
        vocab.update({str(k): int(v) for k, v in model_vocab.items()})
    elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...], id = position
        vocab.update({str(item[0]): i for i, item in enumerate(model_vocab)})
    for tok in tokenizer_json.get("added_tokens", []) or []:
        vocab[str(tok["content"])] = int(tok["id"])
    return vocab


def _check_tokenizer(root: Path, m: dict[str, Any], tpath: Path, rel: str, vocab_size: int) -> None:
    try:
        tj = json.loads(tpath.read_bytes().decode("utf-8"))
        vocab = tokenizer_vocab(tj)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise _fail(root, rel, f"not a readable tokenizer.json ({type(e).__name__}: {e})") from None
    size = max(vocab.values()) + 1 if vocab else 0
    if size != vocab_size:
        raise _fail(root, rel, f"tokenizer has {size} tokens but the model's vocab_size is {vocab_size} (a tokenizer of another model)")
    tok = m["tokenizer"]
    for role in ("cls", "sep", "pad"):
        token, tid = tok.get(f"{role}_token"), tok[f"{role}_token_id"]
        if not 0 <= tid < vocab_size:
            raise _fail(root, MANIFEST_NAME, f"tokenizer {role}_token_id {tid} is outside the vocabulary (size {vocab_size})")
        if token is not None and vocab.get(token) != tid:
            raise _fail(root, rel, f"{role} token {token!r} has id {vocab.get(token)} in the tokenizer, manifest says {tid}")


def _parse(root: Path, m: dict[str, Any], *, verify: bool) -> Bundle:
    _check_header(root, m)
    model_type = _get(root, m, "model_type", str)
    if model_type not in MODEL_TYPES:
        raise _fail(root, MANIFEST_NAME, f"unsupported model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})")
    max_seq_len = _positive_int(root, m, "max_seq_len")
    vocab_size = _positive_int(root, m, "vocab_size")
    inputs = _get(root, m, "inputs", list)
    if not inputs or any(not isinstance(n, str) or n not in KNOWN_INPUTS for n in inputs) or len(set(inputs)) != len(inputs):
        raise _fail(root, MANIFEST_NAME, f"malformed: inputs {inputs!r} (expected distinct names from {KNOWN_INPUTS})")
    if "input_ids" not in inputs:
        raise _fail(root, MANIFEST_NAME, "malformed: inputs must include 'input_ids'")
    outputs = _get(root, m, "outputs", list)
    if outputs != ["start_logits", "end_logits"]:
        raise _fail(root, MANIFEST_NAME, f"malformed: outputs {outputs!r} (expected ['start_logits', 'end_logits'])")
    do_lower_case = m.get("do_lower_case")
    if do_lower_case is not None and not isinstance(do_lower_case, bool):
        raise _fail(root, MANIFEST_NAME, f"malformed: do_lower_case {do_lower_case!r}")

    tok = _get(root, m, "tokenizer", dict)
    trel = _get(root, tok, "path", str, "tokenizer.")
    tsha = _get(root, tok, "sha256", str, "tokenizer.")
    if not _SHA256.match(tsha):
        raise _fail(root, MANIFEST_NAME, f"malformed: tokenizer.sha256 {tsha!r}")
    ids = {role: _get(root, tok, f"{role}_token_id", int, "tokenizer.") for role in ("cls", "sep", "pad")}
    tpath = resolve_inside(root, trel, "tokenizer")
    _check_file(root, tpath, trel, tsha, verify)
    _check_tokenizer(root, m, tpath, trel, vocab_size)

    entries = _get(root, m, "artifacts", list)
    artifacts: list[Artifact] = []
    seen: set[tuple[str, str]] = set()
    for i, e in enumerate(entries):
        where = f"artifacts[{i}]."
        if not isinstance(e, dict):
            raise _fail(root, MANIFEST_NAME, f"malformed: artifacts[{i}] is not an object")
        rel = _get(root, e, "path", str, where)
        fmt = _get(root, e, "format", str, where)
        prec = _get(root, e, "precision", str, where)
        sha = _get(root, e, "sha256", str, where)
        if fmt not in ARTIFACT_FORMATS or prec not in PRECISIONS:
            raise _fail(root, MANIFEST_NAME, f"{where[:-1]}: unknown format/precision {fmt!r}/{prec!r} (known: {ARTIFACT_FORMATS} x {PRECISIONS})")
        if not _SHA256.match(sha):
            raise _fail(root, MANIFEST_NAME, f"malformed: {where}sha256 {sha!r}")
        if (fmt, prec) in seen:
            raise _fail(root, MANIFEST_NAME, f"two artifacts with format {fmt!r} and precision {prec!r}")
        seen.add((fmt, prec))
        path = resolve_inside(root, rel, f"artifact {fmt}/{prec}")
        _check_file(root, path, rel, sha, verify)
        artifacts.append(Artifact(path=path, format=fmt, precision=prec, sha256=sha, info=e))
    if not artifacts:
        raise _fail(root, MANIFEST_NAME, "the bundle lists no model artifacts")

    return Bundle(
        root=root, manifest=m, model_type=model_type, max_seq_len=max_seq_len, vocab_size=vocab_size,
        input_names=tuple(inputs), output_names=tuple(outputs), tokenizer_path=tpath,
        cls_token_id=ids["cls"], sep_token_id=ids["sep"], pad_token_id=ids["pad"],
        artifacts=tuple(artifacts), do_lower_case=do_lower_case,
    )


def load_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed manifest of a bundle folder (or its manifest.json), validated, every sha256 checked."""
    root, mpath = _manifest_path(path)
    m = _read_json(root, mpath)
    _parse(root, m, verify=True)
    return m


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Load and validate a bundle; ``verify=False`` skips the sha256 of each file (not the checks)."""
    root, mpath = _manifest_path(path)
    return _parse(root, _read_json(root, mpath), verify=verify)


def _version_key(v: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", str(v))
    return tuple(int(n) for n in nums[:3])


def check_tensorrt_plan(artifact: Artifact, *, tensorrt_version: str, compute_capability: str | tuple[int, int]) -> None:
    """Refuse a TensorRT plan built for another TensorRT version (major.minor.patch) or GPU.

    The runtime's TensorRT backend calls this with the installed ``tensorrt.__version__`` and the
    device's compute capability before deserializing the plan.
    """
    if artifact.format != "tensorrt":
        raise ValueError(f"{artifact.path.name} is a {artifact.format} artifact, not a TensorRT plan")
    root = artifact.path.parent
    fix = f"rebuild the plans on this machine: python -m export build-trt {root} --force"
    built_v, built_cc = artifact.info.get("tensorrt_version"), artifact.info.get("compute_capability")
    if not isinstance(built_v, str) or not isinstance(built_cc, str):
        raise _fail(root, artifact.path.name, "manifest entry lacks tensorrt_version / compute_capability", fix)
    cc = compute_capability if isinstance(compute_capability, str) else f"{compute_capability[0]}.{compute_capability[1]}"
    if _version_key(built_v) != _version_key(tensorrt_version):
        raise _fail(root, artifact.path.name, f"plan was built with TensorRT {built_v}, this machine has TensorRT {tensorrt_version}", fix)
    if built_cc != cc:
        raise _fail(root, artifact.path.name, f"plan was built for GPU compute capability {built_cc}, this GPU is {cc}", fix)
