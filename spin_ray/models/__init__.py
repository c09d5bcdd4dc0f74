"""Llama-family models: architecture description, decoder, checkpoint loading (safetensors and
GGUF), spin-tiny, smollm2-135m and random-weight named shapes."""

from spin_ray.models.arch import ModelArch
from spin_ray.models.llama import CausalLM
from spin_ray.models.loader import load_arch, load_model, load_random_model, resolve_model_path
from spin_ray.models.named_shapes import is_named_shape, named_shape_arch

__all__ = [
    "CausalLM",
    "ModelArch",
    "is_named_shape",
    "load_arch",
    "load_model",
    "load_random_model",
    "named_shape_arch",
    "resolve_model_path",
]
