"""Writing bundles (the writer lives in :mod:`engine.bundle_writer`, shared with the runtime's
native bundle; here its refusals are ExportError). The manifest's schema is
:mod:`engine.manifest`; reading and verification live in :mod:`engine.bundle`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from engine import bundle_writer
from engine.bundle import load_manifest
from engine.bundle_writer import write_manifest
from export.errors import ExportError


class BundleWriter(bundle_writer.BundleWriter):
    """Collects files in a temporary folder; ``commit`` validates and renames it into place."""

    error = ExportError


def record_accuracy(bundle_dir: str | Path, precision: str, figures: dict[str, Any], *, backend: str = "onnxruntime-cpu") -> None:
    """Add measured accuracy (e.g. SQuAD v1.1 dev EM/F1) of one precision to a bundle's manifest."""
    m = load_manifest(bundle_dir)
    accuracy = dict(m.accuracy or {})
    accuracy[precision] = {**accuracy.get(precision, {}), backend: figures}
    write_manifest(bundle_dir, replace(m, accuracy=accuracy))
