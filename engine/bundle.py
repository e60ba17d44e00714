"""Reading and verifying a SpanRT bundle (format v1): manifest.json plus the files it lists.

The manifest is read through its schema (:mod:`engine.manifest`, which checks every field); this
module checks the files it names and gives the runtime its view of them (:class:`Bundle`).

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
from engine.manifest import MANIFEST_NAME, MAX_COUNT, PRECISIONS, SPECIAL_ROLES, Manifest, TokenizerEntry, bundle_error

__all__ = ["PRECISIONS", "Artifact", "Bundle", "check_tensorrt_plan", "load_bundle", "load_manifest", "read_json_file",
           "resolve_inside", "sha256_file", "tokenizer_vocab"]

_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB; a bigger one is not ours
MAX_TOKENIZER_BYTES = 256 << 20  # the largest tokenizer.json files (250k-token vocabularies) are ~20 MB


@dataclass(frozen=True)
class Artifact:
    """One model file of a bundle: where it is (absolute), what it is, and what the export recorded
    about it (its manifest entry's ``details``: the native encoder's config, a plan's build)."""

    path: Path
    format: str
    precision: str
    sha256: str
    info: dict[str, Any] = field(compare=False)


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: the manifest's fields the runtime needs, with absolute paths."""

    root: Path
    manifest: Manifest = field(compare=False)
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
        raise bundle_error(root, rel, f"{what} cannot be resolved ({type(e).__name__}: {e}; a symlink loop?)") from None
    if not real.is_relative_to(root):
        raise bundle_error(root, rel, f"{what} resolves to {real}, outside the bundle folder (a link leaving the bundle)")
    return real


def resolve_inside(root: Path, rel: Any, what: str) -> Path:
    """The absolute path of a manifest-relative path; absolute paths and escapes are refused."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise bundle_error(root, MANIFEST_NAME, f"{what} path {brief(rel)} is not a non-empty relative path")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise bundle_error(root, MANIFEST_NAME, f"{what} path {rel!r} is absolute; bundle paths must be relative to the bundle folder")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise bundle_error(root, MANIFEST_NAME, f"{what} path {rel!r} points outside the bundle folder ('..' is not allowed)")
    return _resolved(root, root / rel, rel, what)


def _check_file(root: Path, path: Path, rel: str, expected: str, verify: bool) -> None:
    if not path.is_file():
        raise bundle_error(root, rel, "file is missing (or not a regular file)")
    if verify:
        try:
            actual = sha256_file(path)
        except OSError as e:
            raise bundle_error(root, rel, f"cannot be read ({e.strerror or e})") from None
        if actual != expected:
            raise bundle_error(root, rel, f"sha256 mismatch (file is damaged or was altered: expected {expected[:16]}..., found {actual[:16]}...)")


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
            raise bundle_error(root, rel, "file is missing or not a regular file (not a bundle, or an interrupted export)")
        size = real.stat().st_size
        if size > limit:
            raise bundle_error(root, rel, f"file is {size} bytes, more than the {limit} a bundle's {rel} may have")
        raw = real.read_bytes()
    except OSError as e:
        raise bundle_error(root, rel, f"cannot be read ({e.strerror or e})") from None
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise bundle_error(root, rel, f"malformed JSON (not UTF-8: {e})") from None
    except json.JSONDecodeError as e:
        raise bundle_error(root, rel, f"malformed JSON ({e})") from None
    except RecursionError:
        raise bundle_error(root, rel, "malformed JSON (nested too deeply to be a bundle file)") from None
    except ValueError as e:  # NaN/Infinity, or an integer beyond sys.get_int_max_str_digits()
        raise bundle_error(root, rel, f"malformed JSON ({brief(str(e), 120)})") from None


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


def _check_tokenizer(root: Path, tok: TokenizerEntry, tpath: Path, vocab_size: int, model_vocab_size: int | None) -> None:
    """tokenizer.json fits the manifest: its size, the embedding table, and each special token's id."""
    rel = tok.path
    tj = read_json_file(root, tpath, rel, limit=MAX_TOKENIZER_BYTES)
    try:
        vocab = tokenizer_vocab(tj)
    except ValueError as e:
        raise bundle_error(root, rel, f"not a readable tokenizer.json ({e})") from None
    size = max(vocab.values()) + 1 if vocab else 0
    if size != vocab_size:
        raise bundle_error(root, rel, f"tokenizer has {size} tokens but the model's vocab_size is {vocab_size} (a tokenizer of another model)")
    if model_vocab_size is not None and size > model_vocab_size:
        raise bundle_error(root, rel, f"tokenizer has {size} tokens but the model's embedding table has {model_vocab_size} rows "
                                      "(model_vocab_size): its highest ids would index past the table (a tokenizer of another model)")
    for role in SPECIAL_ROLES:
        token, tid = getattr(tok, f"{role}_token"), tok.token_id(role)
        if token is not None and vocab.get(token) != tid:
            raise bundle_error(root, rel, f"{role} token {brief(token)} has id {vocab.get(token)} in the tokenizer, manifest says {tid}")


def _check_onnx_precision(root: Path, path: Path, rel: str, precision: str) -> None:
    """The ONNX file is what its entry says: int8 has quantized operators, fp16 float16 weights,
    fp32 neither (an int8 entry pointing at the fp32 graph would run fp32 and report int8)."""
    from engine.onnx_graph import NotOnnxError, summarize

    try:
        graph = summarize(path)
    except NotOnnxError as e:
        raise bundle_error(root, rel, f"not a readable ONNX model ({e})") from None
    except OSError as e:
        raise bundle_error(root, rel, f"cannot be read ({e.strerror or e})") from None
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
        raise bundle_error(root, rel, problem)


def _check_native_sizes(root: Path, details: dict[str, Any], where: str, vocab_size: int, max_seq_len: int) -> None:
    """The native weights' real sizes (read off the tensors at export) fit the tokenizer and windows."""
    cfg = details.get("encoder")
    if not isinstance(cfg, dict):
        return  # the native backend refuses the artifact with its own message when it is asked for
    rows, positions, offset = cfg.get("vocab_size"), cfg.get("max_positions"), cfg.get("position_offset", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_COUNT for v in (rows, positions, offset)):
        raise bundle_error(root, MANIFEST_NAME, f"malformed: {where}encoder sizes vocab_size/max_positions/position_offset are "
                                                f"{brief(rows)}/{brief(positions)}/{brief(offset)}")
    if vocab_size > rows:
        raise bundle_error(root, MANIFEST_NAME, f"the tokenizer has {vocab_size} tokens but the native model's embedding table has "
                                                f"{rows} rows: its highest ids would index past the table")
    if max_seq_len > positions - offset:
        raise bundle_error(root, MANIFEST_NAME, f"max_seq_len {max_seq_len} is above the native model's {positions - offset} positions")


def _load(root: Path, data: Any, *, verify: bool) -> Bundle:
    """The bundle of manifest JSON ``data``: the manifest checked by its schema, then the files it names."""
    m = Manifest.from_json(data, root=root)
    tok = m.tokenizer
    tpath = resolve_inside(root, tok.path, "tokenizer")
    _check_file(root, tpath, tok.path, tok.sha256, verify)
    _check_tokenizer(root, tok, tpath, m.vocab_size, m.model_vocab_size)
    artifacts: list[Artifact] = []
    for i, e in enumerate(m.artifacts):
        path = resolve_inside(root, e.path, f"artifact {e.format}/{e.precision}")
        _check_file(root, path, e.path, e.sha256, verify)
        if e.format in ("onnx", "onnx-trt") and verify:
            _check_onnx_precision(root, path, e.path, e.precision)
        elif e.format == "native":
            _check_native_sizes(root, e.details, f"artifacts[{i}].", m.vocab_size, m.max_seq_len)
        artifacts.append(Artifact(path=path, format=e.format, precision=e.precision, sha256=e.sha256, info=e.details))
    return Bundle(
        root=root, manifest=m, model_type=m.model_type, max_seq_len=m.max_seq_len, vocab_size=m.vocab_size,
        input_names=m.inputs, output_names=m.outputs, tokenizer_path=tpath,
        cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
        artifacts=tuple(artifacts), do_lower_case=m.do_lower_case, pair_template=tok.pair_template,
    )


def load_manifest(path: str | Path) -> Manifest:
    """The manifest of a bundle folder (or its manifest.json), validated, every sha256 checked."""
    return load_bundle(path, verify=True).manifest


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Load and validate a bundle; ``verify=False`` skips reading the model files (their sha256 and
    what their graphs hold), not the other checks."""
    root, mpath = _manifest_path(path)
    return _load(root, read_json_file(root, mpath, MANIFEST_NAME, limit=MAX_MANIFEST_BYTES), verify=verify)


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
        raise bundle_error(root, artifact.path.name, "manifest entry lacks tensorrt_version / compute_capability", fix)
    cc = compute_capability if isinstance(compute_capability, str) else f"{compute_capability[0]}.{compute_capability[1]}"
    if _version_key(built_v) != _version_key(tensorrt_version):
        raise bundle_error(root, artifact.path.name, f"plan was built with TensorRT {built_v}, this machine has TensorRT {tensorrt_version}", fix)
    if built_cc != cc:
        raise bundle_error(root, artifact.path.name, f"plan was built for GPU compute capability {built_cc}, this GPU is {cc}", fix)
