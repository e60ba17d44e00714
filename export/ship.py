"""Pack a fine-tuned Hugging Face checkpoint as compact package data (fp16 safetensors).

Used to ship the embedded default model: weights halved to float16 (a BERT span model loses
nothing measurable at inference: the runtime exports from them in float32 again), the config and
the fast tokenizer beside them, and nothing else (no optimizer state, no pickles).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def ship_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write ``src``'s weights as float16 safetensors plus config and tokenizer files into ``dst``."""
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    weights = load_file(src / "model.safetensors")
    dst.mkdir(parents=True, exist_ok=True)
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(half, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = "float32"  # load (and export) in float32; the file stores fp16 to halve its size
    config.pop("_name_or_path", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    return dst
