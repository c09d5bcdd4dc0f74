"""`--modes vllm`: the settings vLLM gets match the spin-ray modes', and a named shape becomes
a weightless checkpoint folder that Hugging Face loaders read (vLLM itself is not installed
here; the bench says so and runs the other modes, tested in test_bench_command.py)."""

import json

from transformers import AutoConfig, AutoTokenizer

from spin_ray.bench.config import BenchConfig
from spin_ray.bench.vllm_engine import named_shape_folder, vllm_llm_kwargs
from spin_ray.models.loader import resolve_model_path
from spin_ray.models.named_shapes import named_shape_config
from spin_ray.sparse import SparseConfig


def test_vllm_gets_the_spin_ray_modes_settings():
    options = dict(device="cpu", page_size=32, max_num_seqs=5, seed=7)
    config = BenchConfig(model="spin-tiny", modes=("dense", "vllm"), engine_options=options,
                         sparse=SparseConfig(gpu_cache_tokens=1000))  # fmt: skip
    folder = resolve_model_path("spin-tiny")
    kwargs = vllm_llm_kwargs(config, 640, folder)
    assert kwargs == dict(
        model=str(folder),
        dtype="float32",  # what "auto" resolves to on the CPU, as for the spin-ray modes
        max_model_len=640,
        block_size=32,
        max_num_seqs=5,
        max_num_batched_tokens=8192,  # spin-ray's default chunk
        enable_chunked_prefill=True,
        enable_prefix_caching=False,
        seed=7,
        enforce_eager=False,
        num_gpu_blocks_override=32,  # ceil(1000 / 32) pages, as dense's pool
    )
    options = dict(device="cpu", dtype="bf16")
    shape = BenchConfig(model="llama-3.1-8b", modes=("vllm",), engine_options=options)
    kwargs = vllm_llm_kwargs(shape, 4096, folder)
    assert kwargs["load_format"] == "dummy" and kwargs["dtype"] == "bfloat16"
    assert "num_gpu_blocks_override" not in kwargs


def test_named_shape_folder_loads_as_a_checkpoint_without_weights(tmp_path):
    folder = named_shape_folder("llama-3.1-8b", tmp_path / "shape")
    assert json.loads((folder / "config.json").read_text()) == named_shape_config("llama-3.1-8b")
    config = AutoConfig.from_pretrained(folder)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (
        4096, 32, 8,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tiny = AutoTokenizer.from_pretrained(resolve_model_path("spin-tiny"))
    assert tokenizer("Hello").input_ids == tiny("Hello").input_ids
    assert max(tokenizer.get_vocab().values()) < config.vocab_size
    assert not list(folder.glob("*.safetensors"))
