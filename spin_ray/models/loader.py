"""Find a checkpoint and load it into a `CausalLM`.

Weights stream from `*.safetensors` one tensor at a time straight into parameters allocated on
the target device (the module is built on the meta device first), so host memory never holds
a full copy of the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from spin_ray.attention.backend import AttentionBackend
from spin_ray.models.arch import ModelArch
from spin_ray.models.gguf_checkpoint import find_gguf, gguf_sidecar, gguf_tensors, is_gguf
from spin_ray.models.llama import CausalLM
from spin_ray.models.named_shapes import is_named_shape, named_shape_arch

HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
"""Files fetched from the hub: configs, weights and tokenizer files (no .bin/.pth duplicates)."""

SMOLLM2 = "smollm2-135m"
"""The built-in trained model (`spin_ray.models.smollm2`)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Hugging Face name of a per-projection tensor → (our fused parameter, index of its shard).
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def resolve_model_path(model: str) -> Path:
    """A local checkpoint for `model`: a folder (Hugging Face files, or one `.gguf` file), a
    `.gguf` file, "spin-tiny" (created on first use), "smollm2-135m" (the packaged GGUF), or a
    hub id ("org/name") downloaded with huggingface_hub (or found in its cache). A GGUF
    checkpoint resolves to its file."""
    if model == "spin-tiny":
        from spin_ray.models.spin_tiny import ensure_spin_tiny

        return ensure_spin_tiny()
    if model == SMOLLM2:
        from spin_ray.models.smollm2 import smollm2_gguf

        return smollm2_gguf()
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        gguf = find_gguf(path)
        if gguf is None:
            raise ValueError(f"model: folder {model!r} has no config.json and no .gguf file")
        return gguf
    if path.exists():
        if is_gguf(path):
            return path
        raise ValueError(f"model: {model!r} is a file; give the checkpoint folder or a .gguf file")
    if not _HUB_ID.match(model):
        raise ValueError(
            f"model: {model!r} is not an existing folder or .gguf file, 'spin-tiny', "
            f"'{SMOLLM2}', or a Hugging Face hub id (org/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as e:  # no network, unknown repo, gated repo, ...
        raise ValueError(
            f"model: {model!r} not found locally and could not be downloaded: {e}"
        ) from e


def model_arch(model: str) -> ModelArch:
    """The `ModelArch` of what `LLM(model=...)` takes: a checkpoint folder or GGUF file,
    "spin-tiny", "smollm2-135m", a hub id, or a named shape."""
    if is_named_shape(model):
        return named_shape_arch(model)
    return load_arch(resolve_model_path(model))


def load_arch(path: str | Path) -> ModelArch:
    """The `ModelArch` of a checkpoint folder (config.json + generation_config.json) or of a
    GGUF file (its metadata, as config files in its cache folder)."""
    path = Path(path)
    if is_gguf(path):
        path = gguf_sidecar(path)
    cfg = json.loads((path / "config.json").read_text())
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    return ModelArch.from_hf_config(cfg, gen)


def load_model(
    path: str | Path,
    backend: AttentionBackend | None,
    dtype: torch.dtype,
    device: str | torch.device,
    max_model_len: int | None = None,
    progress: bool = True,
) -> CausalLM:
    """Build the model of the checkpoint in `path` on `device` in `dtype`.

    `max_model_len` (default: the checkpoint's max_position_embeddings) is checked against a
    sliding attention window, which the dense engine does not implement.
    """
    path = Path(path)
    arch = load_arch(path)
    check_sliding_window(arch, max_model_len)
    if is_gguf(path):
        tensors, total = gguf_tensors(path, arch)
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"model: no *.safetensors files in {str(path)!r}")
        tensors, total = _safetensors_tensors(files, device)
    model = _empty_model(arch, backend, dtype, device)
    loaded = _fill_parameters(model, tensors, total, progress)
    missing = [
        name if _num_shards(name) == 1 else f"{name}[{shard}]"
        for name, _ in model.named_parameters()
        for shard in range(_num_shards(name))
        if (name, shard) not in loaded
    ]
    if missing:
        raise ValueError(f"model: checkpoint {str(path)!r} lacks weights for {missing[:8]}")
    return model


def load_random_model(
    arch: ModelArch,
    backend: AttentionBackend | None,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int = 0,
) -> CausalLM:
    """A model of shape `arch` with random weights made directly on `device` (for speed work
    on published shapes without a checkpoint): normal(0, 0.02), norms at 1."""
    model = _empty_model(arch, backend, dtype, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    return model


def check_sliding_window(arch: ModelArch, max_model_len: int | None) -> None:
    """Refuse lengths past the checkpoint's sliding window (dense attention would differ)."""
    length = max_model_len or arch.max_position_embeddings
    if arch.sliding_window is not None and arch.sliding_window < length:
        raise ValueError(
            f"max_model_len: the checkpoint uses sliding-window attention (window "
            f"{arch.sliding_window}), which spin-ray does not implement; it is served exactly "
            f"only up to {arch.sliding_window} tokens, so set max_model_len <= "
            f"{arch.sliding_window} (asked: {length})"
        )


def _safetensors_tensors(
    files: list[Path], device: str | torch.device
) -> tuple[Iterator[tuple[str, Callable[[], torch.Tensor]]], int]:
    """(name, loader of the tensor read straight onto `device`) for every tensor of `files`,
    and how many there are (read from the headers alone)."""
    names_per_file = []
    for file in files:
        with safe_open(file, framework="pt") as f:  # reads only the header
            names_per_file.append(list(f.keys()))

    def tensors():
        for file, names in zip(files, names_per_file):
            with safe_open(file, framework="pt", device=_safetensors_device(device)) as f:
                for name in names:
                    yield name, lambda f=f, name=name: f.get_tensor(name)

    return tensors(), sum(map(len, names_per_file))


def _fill_parameters(
    model: CausalLM,
    tensors: Iterable[tuple[str, Callable[[], torch.Tensor]]],
    total: int | None,
    progress: bool,
) -> set[tuple[str, int]]:
    """Copy every tensor into its parameter, one at a time (each loaded only once its target is
    known); returns the (parameter, shard) pairs filled."""
    params = dict(model.named_parameters())
    loaded = set()
    for hf_name, load in tqdm(
        tensors, total=total, desc="Loading weights", unit="tensor", disable=not progress
    ):
        target = _target(hf_name, model.arch)
        if target is None:
            continue
        name, shard = target
        if name not in params:
            raise ValueError(f"model: unexpected tensor {hf_name!r}")
        _copy_shard(params[name], name, shard, load(), hf_name, model.arch)
        loaded.add(target)
    return loaded


def _empty_model(arch, backend, dtype, device) -> CausalLM:
    """The module with uninitialised parameters allocated once, on `device`, in `dtype`."""
    with torch.device("meta"):
        model = CausalLM(arch, backend)
    model = model.to(dtype).to_empty(device=device)
    model.requires_grad_(False)
    return model


def _target(hf_name: str, arch: ModelArch) -> tuple[str, int] | None:
    """Our (parameter, shard) for a Hugging Face tensor name; None for tensors we skip."""
    if _IGNORED.search(hf_name) or (arch.tie_word_embeddings and hf_name == "lm_head.weight"):
        return None
    for hf_part, (part, shard) in _FUSED.items():
        if f".{hf_part}." in hf_name:
            return hf_name.replace(hf_part, part), shard
    return hf_name, 0


def _num_shards(name: str) -> int:
    if ".qkv_proj." in name:
        return 3
    return 2 if ".gate_up_proj." in name else 1


def _copy_shard(
    param: torch.Tensor, name: str, shard: int, tensor: torch.Tensor, hf_name: str, arch: ModelArch
) -> None:
    """Copy `tensor` into its rows of `param` (all of it when the parameter is not fused)."""
    if ".qkv_proj." in name:
        param = param.split([arch.q_size, arch.kv_size, arch.kv_size], dim=0)[shard]
    elif ".gate_up_proj." in name:
        param = param.split(arch.intermediate_size, dim=0)[shard]
    if param.shape != tensor.shape:
        raise ValueError(
            f"model: tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected "
            f"{tuple(param.shape)} from config.json"
        )
    param.copy_(tensor)


def _safetensors_device(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def load_tokenizer(model: str, tokenizer: str | None = None):
    """The tokenizer served with `model`: `tokenizer` (a folder or hub id) if given, spin-tiny's
    byte-level tokenizer for a named random-weight shape, else the checkpoint's own (a GGUF's
    as converted once into its cache folder)."""
    from transformers import AutoTokenizer

    from spin_ray.models.named_shapes import is_named_shape

    if tokenizer is None:
        path = resolve_model_path("spin-tiny" if is_named_shape(model) else model)
        tokenizer = str(gguf_sidecar(path) if is_gguf(path) else path)
    return AutoTokenizer.from_pretrained(tokenizer)
