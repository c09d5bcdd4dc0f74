"""Where spin-ray keeps the files it makes (spin-tiny, converted GGUF metadata, file checks),
and how a cache folder appears: whole, or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """$SPIN_RAY_CACHE or ~/.cache/spin-ray."""
    return Path(os.environ.get("SPIN_RAY_CACHE") or Path.home() / ".cache" / "spin-ray")


def ensure_folder(final: Path, write: Callable[[Path], None]) -> Path:
    """`final`, written by `write(folder)` on first use. The folder appears atomically (written
    under a temporary name, then renamed), so concurrent first uses are safe: a writer that
    loses the race keeps the winner's folder."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # a failure of our own, not a concurrent writer that won
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
