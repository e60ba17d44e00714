"""Writing bundles (the writer lives in :mod:`engine.bundle_writer`, shared with the runtime's
native bundle; here its refusals are ExportError). Reading and verification live in
:mod:`engine.bundle` (re-exported here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import bundle_writer
from engine.bundle import (  # noqa: F401 - re-exported for the export side
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Bundle,
    load_bundle,
    load_manifest,
    sha256_file,
)
from engine.bundle_writer import write_manifest  # noqa: F401 - re-exported for the export side
from export.errors import ExportError


def check_target(out: str | Path, *, force: bool) -> Path:
    """Refuse an existing target unless ``force``; with ``force`` only bundles (or empty folders) are replaced."""
    return bundle_writer.check_target(out, force=force, error=ExportError)


class BundleWriter(bundle_writer.BundleWriter):
    """Collects files in a temporary folder; ``commit`` validates and renames it into place."""

    error = ExportError


def record_accuracy(bundle_dir: str | Path, precision: str, figures: dict[str, Any], *, backend: str = "onnxruntime-cpu") -> None:
    """Add measured accuracy (e.g. SQuAD v1.1 dev EM/F1) of one precision to a bundle's manifest."""
    m = load_manifest(bundle_dir)
    m.setdefault("accuracy", {}).setdefault(precision, {})[backend] = figures
    write_manifest(bundle_dir, m)
