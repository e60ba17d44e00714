"""A native-only bundle straight from a Hugging Face span checkpoint, without PyTorch.

``build_native_bundle(CHECKPOINT, OUT)`` reads the checkpoint's config.json, its safetensors
weights (``safetensors.numpy``) and its fast tokenizer (``tokenizers``), maps the weights with
:mod:`engine.native_weights` (the same mapping the export stage uses) and writes a bundle holding
tokenizer.json, model.native.npz and manifest.json only, through the shared atomic writer
(:mod:`engine.bundle_writer`), checked by the runtime's own loader before it is moved into place.
It runs on the ``native`` backend; ONNX Runtime, TensorRT and the torch reference need the full
bundle of ``python -m export``. NumPy + safetensors + tokenizers only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import struct
from pathlib import Path
from typing import Any

import numpy as np

from engine.bundle import sha256_file
from engine.bundle_writer import BundleWriter
from engine.errors import BundleError, UnsupportedCheckpointError
from engine.manifest import OUTPUT_NAMES, SPECIAL_ROLES, Manifest
from engine.native_weights import NATIVE_FILE, family_of, native_weights, write_npz

DEFAULT_MAX_SEQ_LEN = 384  # a bundle's longest window unless asked otherwise (python -m export --max-seq-len too)
_MAX_HEADER = 100 << 20  # a safetensors header is JSON of a few KB to a few MB


def read_config(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict (BundleError when missing or unreadable)."""
    path = checkpoint / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{checkpoint}: no config.json; pass a Hugging Face model folder (config, weights, tokenizer)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise BundleError(f"{path}: not a JSON object")
    return config


def weight_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's safetensors files (one, or the shards); a PyTorch pickle needs the export stage."""
    for pattern in ("model.safetensors", "model-*-of-*.safetensors"):
        found = sorted(checkpoint.glob(pattern))
        if found:
            return found
    if any(checkpoint.glob("pytorch_model*.bin")):
        raise UnsupportedCheckpointError(f"{checkpoint}: the weights are a PyTorch pickle (pytorch_model.bin), which only PyTorch "
                                         "reads; save them as safetensors, or build a full bundle: python -m export "
                                         f"{checkpoint} --out BUNDLE")
    raise BundleError(f"{checkpoint}: no weights (model.safetensors)")


def weights_sha256(files: list[Path]) -> str:
    """sha256 of the weights: of the file itself, or of the 'name sha256' lines of all shards
    (the export stage records the same)."""
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and where its data starts."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > _MAX_HEADER:
            raise BundleError(f"{path}: not a safetensors file (header of {size} bytes)")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise BundleError(f"{path}: not a safetensors file")
    return header, 8 + size


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a NumPy array; bfloat16 (which NumPy lacks) as float32."""
    from safetensors import safe_open

    try:
        header, base = _header(path)
        bf16 = {k for k, v in header.items() if isinstance(v, dict) and v.get("dtype") == "BF16"}
        out: dict[str, np.ndarray] = {}
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if name not in bf16:
                    out[name] = f.get_tensor(name)
        if bf16:
            raw = np.memmap(path, dtype=np.uint8, mode="r")
            for name in bf16:
                begin, end = header[name]["data_offsets"]
                bits = np.frombuffer(raw[base + begin : base + end], dtype="<u2").astype(np.uint32) << 16
                out[name] = bits.view(np.float32).reshape(header[name]["shape"])
    except (OSError, ValueError, KeyError, struct.error, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not a readable safetensors file ({e})") from None
    return out


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_settings(checkpoint: Path) -> dict[str, Any]:
    """special_tokens_map.json over tokenizer_config.json (as transformers reads them)."""
    settings: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = checkpoint / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BundleError(f"{path}: unreadable ({e})") from None
            if isinstance(data, dict):
                settings.update(data)
    return settings


def write_tokenizer(checkpoint: Path, dst: Path, model_vocab_size: int) -> tuple[Any, dict[str, Any]]:
    """Copy the checkpoint's fast tokenizer to ``dst`` (padding and truncation off: the runtime sets
    them); returns the loaded tokenizer and the manifest's tokenizer fields."""
    from tokenizers import Tokenizer

    src = checkpoint / "tokenizer.json"
    if not src.is_file():
        raise UnsupportedCheckpointError(f"{checkpoint}: no tokenizer.json (a fast tokenizer); python -m export converts a "
                                         f"slow one with transformers: python -m export {checkpoint} --out BUNDLE")
    try:
        tok = Tokenizer.from_file(str(src))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for unreadable files
        raise BundleError(f"{src}: not a readable tokenizer.json ({e})") from None
    tok.no_padding()
    tok.no_truncation()
    tok.save(str(dst))
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > model_vocab_size:
        raise UnsupportedCheckpointError(f"{checkpoint}: tokenizer has {size} tokens but the model embeds only {model_vocab_size}")
    settings = _tokenizer_settings(checkpoint)
    info: dict[str, Any] = {"vocab_size": size}
    for role in SPECIAL_ROLES:
        token = _token_content(settings.get(f"{role}_token"))
        tid = tok.token_to_id(token) if token is not None else None
        if token is None or tid is None:
            raise UnsupportedCheckpointError(f"{checkpoint}: tokenizer has no {role} token (special_tokens_map.json / "
                                             "tokenizer_config.json); a span model needs [CLS]/[SEP]/[PAD]-style tokens")
        info[f"{role}_token"], info[f"{role}_token_id"] = token, int(tid)
    lower = settings.get("do_lower_case")
    info["do_lower_case"] = bool(lower) if lower is not None else None
    return tok, info


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("spanrt", "numpy", "safetensors", "tokenizers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def build_native_bundle(checkpoint: str | Path, out: str | Path, *, max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                        accuracy: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Write a native-only bundle of span checkpoint ``checkpoint`` at ``out``; returns its path.

    ``accuracy``: measured figures to record in the manifest (e.g. from a model card)."""
    ckpt = Path(checkpoint)
    config = read_config(ckpt)
    fam = family_of(config, str(ckpt))
    files = weight_files(ckpt)
    state: dict[str, np.ndarray] = {}
    for f in files:
        state.update(read_safetensors(f))
    encoder, weights = native_weights(state, config)
    del state
    heads, hidden, layers = fam.dims(config)
    model_vocab_size = int(config.get("vocab_size", encoder.vocab_size))
    max_positions = int(config.get("max_position_embeddings", encoder.max_positions)) - fam.position_offset
    if max_seq_len > max_positions:
        raise UnsupportedCheckpointError(f"max_seq_len {max_seq_len} exceeds the model's {max_positions} positions")

    with BundleWriter(out, force=force) as w:
        tokenizer, tok_info = write_tokenizer(ckpt, w.path("tokenizer.json"), model_vocab_size)
        write_npz(weights, w.path(NATIVE_FILE))
        from engine.backends.native import FORMAT as NATIVE_FORMAT

        w.add_artifact(NATIVE_FILE, format=NATIVE_FORMAT, precision="fp32", encoder=encoder.to_json(), computes=["int8", "bf16", "fp32"])
        manifest = Manifest(
            model_type=str(config["model_type"]),
            architecture=fam.architecture,
            source={"path": str(ckpt.resolve()), "weights_sha256": weights_sha256(files), "weights": [f.name for f in files]},
            max_seq_len=max_seq_len,
            vocab_size=tok_info["vocab_size"],
            model_vocab_size=model_vocab_size,
            max_positions=max_positions,
            do_lower_case=tok_info["do_lower_case"],
            inputs=fam.input_names,
            outputs=OUTPUT_NAMES,
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            native_encoder={"written": True},
            tokenizer=w.tokenizer_entry("tokenizer.json", tokenizer, tok_info),
            versions=_versions(),
            # Nothing to compare with here (no PyTorch): the mapping is the export's, tested equal
            # to it tensor for tensor (tests/test_native_weights.py), and the encoder is tested
            # against PyTorch on every path (tests/test_native.py).
            verification={"native": {"checked": False, "reason": "built from the checkpoint's safetensors without PyTorch "
                                                                 "(engine.native_bundle); no reference to compare with"}},
            build={"by": "engine.native_bundle", "max_seq_len": max_seq_len},
            accuracy=accuracy or None,
        )
        return w.commit(manifest)
