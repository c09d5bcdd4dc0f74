"""spin-ray: long-context LLM serving with dynamic sparse attention over a hierarchical KV cache."""

from spin_ray.outputs import CompletionOutput, RequestMetrics, RequestOutput
from spin_ray.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `LLM` pulls in torch models and transformers; import it on first use.
    if name == "LLM":
        from spin_ray.llm import LLM

        return LLM
    raise AttributeError(f"module 'spin_ray' has no attribute {name!r}")
