"""Writing bundles: files go to a temporary folder beside the target, then one rename puts the
finished bundle in place, so an interrupted build never leaves a half bundle.

Used by the export stage (export/pipeline.py, with its own error type) and by the runtime's
torch-free native bundle (engine/native_bundle.py). Reading and verification live in
:mod:`engine.bundle`; ``commit`` runs that exact check before the rename. The manifest is written
through its schema (:class:`engine.manifest.Manifest`). Stdlib only (the tokenizer entry: engine.preprocess).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from engine.bundle import load_bundle, sha256_file
from engine.errors import BundleError, SpanRTError
from engine.manifest import FORMAT, MANIFEST_NAME, PAIR_TEMPLATE_PARTS, SPECIAL_ROLES, ArtifactEntry, Manifest, TokenizerEntry


def _is_bundle_or_empty(path: Path) -> bool:
    if not any(path.iterdir()):
        return True
    m = path / MANIFEST_NAME
    if not m.is_file():
        return False
    try:
        return json.loads(m.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        # A damaged manifest of ours is still ours to replace only if the name says so.
        return b'"spanrt-bundle"' in m.read_bytes()


def check_target(out: str | Path, *, force: bool, error: type[SpanRTError] = BundleError) -> Path:
    """Refuse an existing target unless ``force``; with ``force`` only bundles (or empty folders) are replaced."""
    p = Path(out)
    if p.exists() or p.is_symlink():
        if not force:
            raise error(f"{p} already exists; pass --force to replace it")
        if not p.is_dir() or p.is_symlink():
            raise error(f"{p} exists and is not a folder; refusing to replace it even with --force")
        if not _is_bundle_or_empty(p):
            raise error(f"{p} exists and is not a SpanRT bundle; refusing to delete it even with --force (choose another --out)")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


class BundleWriter:
    """Collects files in a temporary folder; ``commit`` validates and renames it into place."""

    error: type[SpanRTError] = BundleError  # what its own refusals raise (the export stage: ExportError)

    def __init__(self, out: str | Path, *, force: bool) -> None:
        self.out = check_target(out, force=force, error=self.error).absolute()
        self.force = force
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a bundle is readable like any folder
        self.artifacts: list[ArtifactEntry] = []

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.abort()

    def path(self, rel: str) -> Path:
        """Where a bundle file is written while the build runs."""
        return self.tmp / rel

    def add_artifact(self, rel: str, *, format: str, precision: str, **details: Any) -> ArtifactEntry:  # noqa: A002
        """Record a written file as an artifact (its sha256 is computed now); ``details``: what to
        record about it (the native encoder's config, a plan's build...)."""
        f = self.path(rel)
        if not f.is_file():
            raise self.error(f"internal: artifact {rel} was not written")
        entry = ArtifactEntry(path=rel, format=format, precision=precision, sha256=sha256_file(f), bytes=f.stat().st_size,
                              details=details)
        self.artifacts = [a for a in self.artifacts if (a.format, a.precision) != (format, precision)]
        self.artifacts.append(entry)
        return entry

    def tokenizer_entry(self, rel: str, tokenizer: Any, special: Mapping[str, Any]) -> TokenizerEntry:
        """The manifest's entry of the tokenizer.json written at ``rel`` (loaded as ``tokenizer``):
        its sha256, the special tokens (``special``: ``{role}_token`` and ``{role}_token_id`` of
        cls, sep and pad) and the ids around a pair, which the runtime checks its tokenizer against."""
        from engine.preprocess import learn_template

        t = learn_template(tokenizer, self.path(rel))
        return TokenizerEntry(path=rel, sha256=sha256_file(self.path(rel)),
                              **{f"{r}_token{s}": special[f"{r}_token{s}"] for r in SPECIAL_ROLES for s in ("", "_id")},
                              pair_template={p: tuple(getattr(t, p).tolist()) for p in PAIR_TEMPLATE_PARTS})

    def commit(self, manifest: Manifest) -> Path:
        """Write manifest.json (with the artifacts added), check the whole bundle with the runtime's
        loader, move it into place."""
        write_manifest(self.tmp, replace(manifest, artifacts=tuple(self.artifacts)))
        load_bundle(self.tmp, verify=True)  # the exact check the runtime will do
        old: Path | None = None
        if self.out.exists():
            check_target(self.out, force=self.force, error=self.error)
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "bundle")
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        """Remove the temporary folder (no-op after commit)."""
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_manifest(root: str | Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically (temporary file + rename)."""
    root = Path(root)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".json", dir=root)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, root / MANIFEST_NAME)
