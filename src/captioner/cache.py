"""The project's cache folder for what it derives from installed models (traced onnxruntime graphs).

``$CAPTIONER_CACHE`` if set, else ``$XDG_CACHE_HOME/captioner``, else ``~/.cache/captioner``. Entries are
written whole or not at all; a cache that cannot be written only makes the next start slower.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("CAPTIONER_CACHE"):
        return Path(os.environ["CAPTIONER_CACHE"]) / "encoders"
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "captioner" / "encoders"


def save(path: Path, data: bytes) -> None:
    """Write `path` via a temporary file renamed into place; an OSError (read-only home) is ignored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        pass
