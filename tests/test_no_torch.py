"""The runtime needs no torch, transformers or onnx: engine/ never imports export/, and the default
model answers in a fresh virtual environment holding only the runtime's dependencies (numpy,
tokenizers, onnxruntime, safetensors), as after ``pip install spanrt``."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import default_model as dm

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_DEPENDENCIES = ("numpy", "tokenizers", "onnxruntime", "safetensors")  # pyproject.toml's [project] dependencies
EXPORT_ONLY = ("torch", "transformers", "onnx")

CHILD = r"""
import importlib.util, json, sys, time
absent = [m for m in %(banned)r if importlib.util.find_spec(m) is None]
t = time.perf_counter()
import engine
a = engine.answer("Where was Marie Curie born?", "Marie Curie was born in Warsaw in 1867.")
first = time.perf_counter() - t
print(json.dumps({"text": a.text, "backend": a.backend, "precision": a.precision, "first_call_s": first, "absent": absent,
                  "imported": sorted(m for m in (*%(banned)r, "export") if m in sys.modules)}))
"""


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_engine_never_imports_export() -> None:
    files = sorted((ROOT / "engine").rglob("*.py"))
    assert len(files) > 10
    offenders = {str(f.relative_to(ROOT)): n for f in files for n in _imports(f) if n == "export" or n.startswith("export.")}
    assert offenders == {}, "engine/ must not import export/ (the runtime has no torch): run python -m export in a subprocess"


def test_the_import_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from export.pipeline import export_bundle\n    import export.onnx as o\n")
    assert _imports(f) == ["export.pipeline", "export.onnx"]


@pytest.mark.slow
def test_the_default_model_answers_in_a_venv_without_torch(tmp_path: Path) -> None:
    if not dm.uses_native_bundle("auto", None):
        pytest.skip("auto does not use the native encoder on this machine (no tuned path, or a GPU backend is installed): "
                    "the default model needs its ONNX bundle, built with the export extras")
    try:
        pins = [f"{d}=={importlib.metadata.version(d)}" for d in RUNTIME_DEPENDENCIES]
    except importlib.metadata.PackageNotFoundError as e:
        pytest.skip(f"a runtime dependency is not installed here to pin from: {e}")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)  # no system site-packages
    python = venv / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check", *pins],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        pytest.skip(f"pip could not install {' '.join(pins)} (no package registry or cache reachable): {pip.stderr[-500:]}")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONNOUSERSITE": "1", "PYTHONPATH": str(ROOT),
           "SPANRT_CACHE_DIR": str(tmp_path / "cache")}
    if os.environ.get("SPANRT_CPU_ISA"):
        env["SPANRT_CPU_ISA"] = os.environ["SPANRT_CPU_ISA"]
    child = subprocess.run([str(python), "-c", CHILD % {"banned": EXPORT_ONLY}], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["absent"] == list(EXPORT_ONLY), "the venv must not hold torch, transformers or onnx"
    assert result["imported"] == []
    assert (result["text"], result["backend"], result["precision"]) == ("Warsaw", "native", "int8"), result
    built = sorted(p.name for p in (tmp_path / "cache" / "bundles").iterdir())
    assert built == [f"{dm.DEFAULT_MODEL_NAME}-{dm.checkpoint_sha256(dm.CHECKPOINT_DIR)[:16]}-native-r{dm.NATIVE_RECIPE}"]
    print(f"first call in a torch-free venv (builds the native bundle): {result['first_call_s']:.2f} s")
