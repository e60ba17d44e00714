"""Reading and verifying a SpanRT bundle (format v1): manifest.json plus the files it lists.

A bundle is data, never code: only JSON is parsed here (no pickle, no torch), every file that is
read (the manifest and the tokenizer included) must resolve inside the bundle folder, and every
file is checked against its sha256 before use. The JSON is read strictly: NaN/Infinity, integers
beyond Python's digit limit and nesting beyond the parser's depth are refused, and every field is
checked for its type before use. The bundle is also checked against the model it describes: the
tokenizer's vocabulary fits the model's embedding table, max_seq_len its positions, and each ONNX
file is the precision its entry says (a quantized graph for int8, float16 weights for fp16).
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

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB; a bigger one is not ours
MAX_TOKENIZER_BYTES = 256 << 20  # the largest tokenizer.json files (250k-token vocabularies) are ~20 MB
MAX_COUNT = 1 << 31  # any size in a manifest (tokens, vocabulary) is below this


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
    # The special-token ids around a (question, context) pair that the model was exported with:
    # {"prefix": [...], "middle": [...], "suffix": [...]}; None in bundles from before it was recorded.
    pair_template: dict[str, tuple[int, ...]] | None = None

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


def _resolved(root: Path, path: Path, rel: str, what: str) -> Path:
    """``path`` with every link followed, which must stay inside ``root``; a loop is a BundleError."""
    try:
        real = path.resolve()
    except (RuntimeError, OSError) as e:  # RuntimeError: a symlink loop (Python < 3.13), OSError: ELOOP, EACCES
        raise _fail(root, rel, f"{what} cannot be resolved ({type(e).__name__}: {e}; a symlink loop?)") from None
    if not real.is_relative_to(root):
        raise _fail(root, rel, f"{what} resolves to {real}, outside the bundle folder (a link leaving the bundle)")
    return real


def resolve_inside(root: Path, rel: Any, what: str) -> Path:
    """The absolute path of a manifest-relative path; absolute paths and escapes are refused."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise _fail(root, MANIFEST_NAME, f"{what} path {brief(rel)} is not a non-empty relative path")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise _fail(root, MANIFEST_NAME, f"{what} path {rel!r} is absolute; bundle paths must be relative to the bundle folder")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise _fail(root, MANIFEST_NAME, f"{what} path {rel!r} points outside the bundle folder ('..' is not allowed)")
    return _resolved(root, root / rel, rel, what)


def _check_file(root: Path, path: Path, rel: str, expected: str, verify: bool) -> None:
    if not path.is_file():
        raise _fail(root, rel, "file is missing (or not a regular file)")
    if verify:
        try:
            actual = sha256_file(path)
        except OSError as e:
            raise _fail(root, rel, f"cannot be read ({e.strerror or e})") from None
        if actual != expected:
            raise _fail(root, rel, f"sha256 mismatch (file is damaged or was altered: expected {expected[:16]}..., found {actual[:16]}...)")


def _manifest_path(path: str | Path) -> tuple[Path, Path]:
    """(bundle root, manifest path): the root with links followed, the manifest inside it."""
    p = Path(path)
    try:
        if p.is_dir():
            root = p.resolve()
        elif p.name == MANIFEST_NAME and p.parent.is_dir():
            root = p.parent.resolve()
        elif not p.exists() and not p.is_symlink():
            raise BundleError(f"bundle {p}: not found. Fix: pass a bundle folder made by python -m export MODEL_DIR --out {p}")
        else:
            raise BundleError(f"bundle {p}: not a bundle folder or {MANIFEST_NAME}. Fix: pass the folder made by python -m export")
    except (RuntimeError, OSError) as e:  # a loop or an unreadable parent
        raise BundleError(f"bundle {p}: cannot be resolved ({type(e).__name__}: {e}). Fix: pass the folder made by python -m export") from None
    return root, root / MANIFEST_NAME


class _NotPlainJSON(ValueError):
    """A JSON constant (NaN, Infinity) that no bundle file holds."""


def _refuse_constant(name: str) -> Any:
    raise _NotPlainJSON(f"{name} is not a JSON number")


def read_json_file(root: Path, path: Path, rel: str, *, limit: int) -> Any:
    """The parsed JSON of a bundle file: inside the bundle, at most ``limit`` bytes, UTF-8, plain
    JSON (no NaN/Infinity, no integer beyond the digit limit, no nesting beyond the parser's
    depth); anything else is a BundleError naming the file."""
    real = _resolved(root, path, rel, rel)
    try:
        if not real.is_file():
            raise _fail(root, rel, "file is missing or not a regular file (not a bundle, or an interrupted export)")
        size = real.stat().st_size
        if size > limit:
            raise _fail(root, rel, f"file is {size} bytes, more than the {limit} a bundle's {rel} may have")
        raw = real.read_bytes()
    except OSError as e:
        raise _fail(root, rel, f"cannot be read ({e.strerror or e})") from None
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise _fail(root, rel, f"malformed JSON (not UTF-8: {e})") from None
    except json.JSONDecodeError as e:
        raise _fail(root, rel, f"malformed JSON ({e})") from None
    except RecursionError:
        raise _fail(root, rel, "malformed JSON (nested too deeply to be a bundle file)") from None
    except ValueError as e:  # NaN/Infinity, or an integer beyond sys.get_int_max_str_digits()
        raise _fail(root, rel, f"malformed JSON ({brief(str(e), 120)})") from None


def _read_json(root: Path, mpath: Path) -> dict[str, Any]:
    data = read_json_file(root, mpath, MANIFEST_NAME, limit=MAX_MANIFEST_BYTES)
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
    if not 0 < v < MAX_COUNT:
        raise _fail(root, MANIFEST_NAME, f"malformed: {where}{key!r} must be between 1 and {MAX_COUNT - 1}, got {brief(v)}")
    return v


def _optional_positive_int(root: Path, d: dict[str, Any], key: str, where: str = "") -> int | None:
    return _positive_int(root, d, key, where) if d.get(key) is not None else None


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


def _token_id(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_COUNT:
        raise ValueError(f"{where} is {brief(value)}, not a token id (an int from 0)")
    return value


def tokenizer_vocab(tokenizer_json: Any) -> dict[str, int]:
    """Token -> id of a Hugging Face tokenizer.json (model vocabulary plus added tokens).

    Every field is checked for its type: a ValueError says which one is wrong."""
    if not isinstance(tokenizer_json, dict):
        raise ValueError(f"the top level is {type(tokenizer_json).__name__}, not an object")
    model = tokenizer_json.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"'model' is {type(model).__name__}, not an object")
    vocab: dict[str, int] = {}
    model_vocab = model.get("vocab")
    if isinstance(model_vocab, dict):  # WordPiece, BPE, WordLevel
        vocab.update({k: _token_id(v, f"model.vocab[{brief(k)}]") for k, v in model_vocab.items()})
    elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...], id = position
        for i, item in enumerate(model_vocab):
            if not isinstance(item, list) or not item or not isinstance(item[0], str):
                raise ValueError(f"model.vocab[{i}] is {brief(item)}, not a [piece, score] pair")
            vocab[item[0]] = i
    elif model_vocab is not None:
        raise ValueError(f"model.vocab is {type(model_vocab).__name__}, not an object or a list")
    added = tokenizer_json.get("added_tokens") or []
    if not isinstance(added, list):
        raise ValueError(f"added_tokens is {type(added).__name__}, not a list")
    for i, tok in enumerate(added):
        if not isinstance(tok, dict) or not isinstance(tok.get("content"), str):
            raise ValueError(f"added_tokens[{i}] is {brief(tok)}, not an object with a string 'content'")
        vocab[tok["content"]] = _token_id(tok.get("id"), f"added_tokens[{i}].id")
    return vocab


def _check_tokenizer(root: Path, m: dict[str, Any], tpath: Path, rel: str, vocab_size: int,
                     model_vocab_size: int | None) -> None:
    tj = read_json_file(root, tpath, rel, limit=MAX_TOKENIZER_BYTES)
    try:
        vocab = tokenizer_vocab(tj)
    except ValueError as e:
        raise _fail(root, rel, f"not a readable tokenizer.json ({e})") from None
    size = max(vocab.values()) + 1 if vocab else 0
    if size != vocab_size:
        raise _fail(root, rel, f"tokenizer has {size} tokens but the model's vocab_size is {vocab_size} (a tokenizer of another model)")
    if model_vocab_size is not None and size > model_vocab_size:
        raise _fail(root, rel, f"tokenizer has {size} tokens but the model's embedding table has {model_vocab_size} rows "
                               "(model_vocab_size): its highest ids would index past the table (a tokenizer of another model)")
    tok = m["tokenizer"]
    for role in ("cls", "sep", "pad"):
        token, tid = tok.get(f"{role}_token"), tok[f"{role}_token_id"]
        if not 0 <= tid < vocab_size:
            raise _fail(root, MANIFEST_NAME, f"tokenizer {role}_token_id {brief(tid)} is outside the vocabulary (size {vocab_size})")
        if token is not None and not isinstance(token, str):
            raise _fail(root, MANIFEST_NAME, f"malformed: tokenizer.{role}_token is {type(token).__name__}, expected str")
        if token is not None and vocab.get(token) != tid:
            raise _fail(root, rel, f"{role} token {brief(token)} has id {vocab.get(token)} in the tokenizer, manifest says {tid}")


def _pair_template(root: Path, value: Any, vocab_size: int) -> dict[str, tuple[int, ...]] | None:
    if value is None:
        return None
    parts = ("prefix", "middle", "suffix")
    if (not isinstance(value, dict) or set(value) != set(parts)
            or not all(isinstance(value[p], list) and len(value[p]) <= 16 for p in parts)
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for p in parts for t in value[p])):
        raise _fail(root, MANIFEST_NAME, f"malformed: tokenizer.pair_template {brief(value, 120)} (expected lists of token ids "
                                         f"under {', '.join(parts)})")
    return {p: tuple(value[p]) for p in parts}


def _check_onnx_precision(root: Path, path: Path, rel: str, precision: str) -> None:
    """The ONNX file is what its entry says: int8 has quantized operators, fp16 float16 weights,
    fp32 neither (an int8 entry pointing at the fp32 graph would run fp32 and report int8)."""
    from engine.onnx_graph import NotOnnxError, summarize

    try:
        graph = summarize(path)
    except NotOnnxError as e:
        raise _fail(root, rel, f"not a readable ONNX model ({e})") from None
    except OSError as e:
        raise _fail(root, rel, f"cannot be read ({e.strerror or e})") from None
    quantized, fp16 = sorted(graph.quantized_ops), graph.has_float16
    problem = None
    if precision == "int8" and not quantized:
        problem = "the manifest says int8, but the graph has no quantized operators (an fp32 or fp16 graph)"
    elif precision == "fp16" and (quantized or not fp16):
        problem = ("the manifest says fp16, but the graph " +
                   (f"has quantized operators ({', '.join(quantized)})" if quantized else "has no float16 weights"))
    elif precision == "fp32" and (quantized or fp16):
        problem = ("the manifest says fp32, but the graph " +
                   (f"has quantized operators ({', '.join(quantized)})" if quantized else "has float16 weights"))
    if problem:
        raise _fail(root, rel, problem)


def _check_native_sizes(root: Path, entry: dict[str, Any], where: str, vocab_size: int, max_seq_len: int) -> None:
    """The native weights' real sizes (read off the tensors at export) fit the tokenizer and windows."""
    cfg = entry.get("encoder")
    if not isinstance(cfg, dict):
        return  # the native backend refuses the artifact with its own message when it is asked for
    rows, positions, offset = cfg.get("vocab_size"), cfg.get("max_positions"), cfg.get("position_offset", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_COUNT for v in (rows, positions, offset)):
        raise _fail(root, MANIFEST_NAME, f"malformed: {where}encoder sizes vocab_size/max_positions/position_offset are "
                                         f"{brief(rows)}/{brief(positions)}/{brief(offset)}")
    if vocab_size > rows:
        raise _fail(root, MANIFEST_NAME, f"the tokenizer has {vocab_size} tokens but the native model's embedding table has "
                                         f"{rows} rows: its highest ids would index past the table")
    if max_seq_len > positions - offset:
        raise _fail(root, MANIFEST_NAME, f"max_seq_len {max_seq_len} is above the native model's {positions - offset} positions")


def _parse(root: Path, m: dict[str, Any], *, verify: bool) -> Bundle:
    _check_header(root, m)
    model_type = _get(root, m, "model_type", str)
    if model_type not in MODEL_TYPES:
        raise _fail(root, MANIFEST_NAME, f"unsupported model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})")
    max_seq_len = _positive_int(root, m, "max_seq_len")
    vocab_size = _positive_int(root, m, "vocab_size")
    model_vocab_size = _optional_positive_int(root, m, "model_vocab_size")  # rows of the embedding table
    max_positions = _optional_positive_int(root, m, "max_positions")  # positions the model can embed
    if max_positions is not None and max_seq_len > max_positions:
        raise _fail(root, MANIFEST_NAME, f"max_seq_len {max_seq_len} is above the model's {max_positions} positions "
                                         "(max_positions): longer windows would index past its position table")
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
    pair_template = _pair_template(root, tok.get("pair_template"), vocab_size)
    tpath = resolve_inside(root, trel, "tokenizer")
    _check_file(root, tpath, trel, tsha, verify)
    _check_tokenizer(root, m, tpath, trel, vocab_size, model_vocab_size)

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
        if fmt in ("onnx", "onnx-trt") and verify:
            _check_onnx_precision(root, path, rel, prec)
        elif fmt == "native":
            _check_native_sizes(root, e, where, vocab_size, max_seq_len)
        artifacts.append(Artifact(path=path, format=fmt, precision=prec, sha256=sha, info=e))
    if not artifacts:
        raise _fail(root, MANIFEST_NAME, "the bundle lists no model artifacts")

    return Bundle(
        root=root, manifest=m, model_type=model_type, max_seq_len=max_seq_len, vocab_size=vocab_size,
        input_names=tuple(inputs), output_names=tuple(outputs), tokenizer_path=tpath,
        cls_token_id=ids["cls"], sep_token_id=ids["sep"], pad_token_id=ids["pad"],
        artifacts=tuple(artifacts), do_lower_case=do_lower_case, pair_template=pair_template,
    )


def load_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed manifest of a bundle folder (or its manifest.json), validated, every sha256 checked."""
    root, mpath = _manifest_path(path)
    m = _read_json(root, mpath)
    _parse(root, m, verify=True)
    return m


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Load and validate a bundle; ``verify=False`` skips reading the model files (their sha256 and
    what their graphs hold), not the other checks."""
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
