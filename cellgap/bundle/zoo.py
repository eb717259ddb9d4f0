"""The model-zoo export: a self-contained bundle archive with the cellgap library vendored into ``scripts/``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..encoders import EncoderSpec, get_encoder_spec
from .json_layout import json_text
from .naming import BUNDLE_VERSION, bundle_name
from .render import render_bundle

VENDORED = "scripts.cellgap"


def _vendor_strings(obj):
    """Point every config string at the vendored copy (``cellgap.x`` → ``scripts.cellgap.x``)."""
    if isinstance(obj, dict):
        return {k: _vendor_strings(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_vendor_strings(v) for v in obj]
    if isinstance(obj, str):
        return obj.replace("cellgap.", VENDORED + ".") if "cellgap." in obj else obj
    return obj


def export_bundle(spec: EncoderSpec | str, out_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
    """Write ``<out_dir>/<bundle>_v<version>.zip``: the bundle with the cellgap library copied into its
    ``scripts/`` (configs pointing at ``scripts.cellgap``), so that it runs with ``python -m monai.bundle run``
    from its folder on a machine without cellgap.  ``checkpoint``: a trained ``models/model.pt`` to include.

    The library uses relative imports internally, so the copy needs no rewriting."""
    import shutil
    import tempfile
    import zipfile

    spec = get_encoder_spec(spec)
    name = bundle_name(spec)
    library = Path(__file__).resolve().parents[1]  # the whole cellgap package, nested packages included
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / name
        for rel, text in render_bundle(spec).items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".json") and rel != "configs/metadata.json":
                text = json_text(_vendor_strings(json.loads(text)))
            elif rel == "configs/metadata.json":  # cellgap is vendored in scripts/; no package index has it
                meta = json.loads(text)
                meta["required_packages_version"].pop("cellgap", None)
                text = json_text(meta)
            path.write_text(text, encoding="utf-8")
        shutil.copytree(library, root / "scripts" / "cellgap", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (root / "scripts" / "__init__.py").write_text('"""Custom code of this bundle: a copy of the cellgap library."""\n')
        if checkpoint is not None:
            (root / "models").mkdir()
            shutil.copy(checkpoint, root / "models" / "model.pt")
        archive = out_dir / f"{name}_v{BUNDLE_VERSION}.zip"
        partial = archive.with_name(archive.name + ".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                info = zipfile.ZipInfo(str(path.relative_to(root.parent)), date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())  # fixed timestamps: the same bundle gives the same archive
        os.replace(partial, archive)
    return archive
