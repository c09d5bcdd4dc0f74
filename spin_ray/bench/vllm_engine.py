"""Real vLLM in `spin-ray bench` (`--modes vllm`): its offline engine, stepped like spin-ray's,
with the settings the spin-ray modes run with, so that the ratios compare like with like.

A named random-weight shape (`--model llama-3.1-8b`) runs in vLLM too: its published
`config.json` and spin-tiny's byte-level tokenizer go into a folder that vLLM loads with
`load_format="dummy"` (random weights, as spin-ray's)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from spin_ray.bench.config import BenchConfig
from spin_ray.bench.engines import free_gpu_memory
from spin_ray.bench.workloads import BenchRequest
from spin_ray.engine.config import DEFAULT_CHUNK_TOKENS, resolve_device, resolve_dtype
from spin_ray.models.loader import resolve_model_path
from spin_ray.models.named_shapes import is_named_shape, named_shape_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def named_shape_folder(name: str, folder: Path) -> Path:
    """A checkpoint folder without weights for the named shape: its config and spin-tiny's
    tokenizer (vLLM then initialises random weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(named_shape_config(name), indent=2))
    tiny = resolve_model_path("spin-tiny")
    for name_ in TOKENIZER_FILES:
        shutil.copy(tiny / name_, folder / name_)
    return folder


def vllm_llm_kwargs(config: BenchConfig, max_model_len: int, model_folder: Path) -> dict:
    """`vllm.LLM(...)` keyword arguments matching what the spin-ray modes get: dtype as they
    resolve it, the same page size, HBM KV capacity (`--gpu-cache-tokens`), batch limits,
    seed and eager/graph choice; no prefix caching (spin-ray has none)."""
    device = resolve_device(config.option("device"))
    dtype = resolve_dtype(config.option("dtype"), device)
    kwargs = dict(
        model=str(model_folder),
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=max_model_len,
        block_size=config.option("page_size"),
        max_num_seqs=config.option("max_num_seqs"),
        max_num_batched_tokens=config.option("max_num_batched_tokens") or DEFAULT_CHUNK_TOKENS,
        enable_chunked_prefill=True,
        enable_prefix_caching=False,
        seed=config.option("seed"),
        enforce_eager=config.option("enforce_eager"),
    )
    hbm_tokens = config.sparse.gpu_cache_tokens
    if hbm_tokens is not None:
        kwargs["num_gpu_blocks_override"] = -(-hbm_tokens // config.option("page_size"))
    if is_named_shape(config.model):
        kwargs["load_format"] = "dummy"
    return kwargs


class VllmBenchEngine:
    """Real vLLM's engine, from its offline `LLM` API, on the same requests."""

    mode = "vllm"

    def __init__(self, config: BenchConfig, max_model_len: int):
        import vllm

        self._vllm = vllm
        self._folder = None
        if is_named_shape(config.model):
            self._folder = tempfile.TemporaryDirectory(prefix="spin-ray-vllm-")
            folder = named_shape_folder(config.model, Path(self._folder.name))
        else:
            folder = resolve_model_path(config.model)
        self.llm = vllm.LLM(**vllm_llm_kwargs(config, max_model_len, folder))
        self.engine = self.llm.llm_engine
        tokenizer = self.llm.get_tokenizer()
        self.vocab_size = min(len(tokenizer), self.engine.model_config.get_vocab_size())
        self.special_token_ids = list(tokenizer.all_special_ids)

    def add(self, request: BenchRequest, arrival_time: float) -> None:
        params = self._vllm.SamplingParams(
            max_tokens=request.output_len, temperature=0.0, ignore_eos=True
        )
        prompt = {"prompt_token_ids": request.prompt_token_ids}
        self.engine.add_request(request.request_id, prompt, params)

    def step(self) -> list:
        return self.engine.step()

    def last_step_tokens(self) -> None:
        return None  # vLLM's offline engine does not report its batch's tokens

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()

    def abort(self, request_id: str) -> None:
        self.engine.abort_request([request_id])

    def kv_stats(self) -> None:
        return None

    def close(self) -> None:
        """Stop vLLM's engine core (a separate process in vLLM V1, which keeps its GPU memory
        until shut down) before the next mode sizes its cache from free memory."""
        core = getattr(self.engine, "engine_core", None)  # V1; older versions have none
        if core is not None:
            core.shutdown()
        del self.engine, self.llm
        if self._folder is not None:
            self._folder.cleanup()
        free_gpu_memory()
