"""`spin-ray train-gate`: distil a Seer gate (spin_ray/sparse/algorithms/seer.py) for a
checkpoint from its own block attention mass, as SeerAttention-R trains its gates by
self-distillation with the model frozen.

One dense forward over offline text keeps every layer's queries and keys; for sampled query
positions t the target is the attention mass of each complete block before t (averaged over the
KV head's query group, renormalised over those blocks), and the gate's scores over the same
blocks are fitted to it by KL divergence (Adam; the model is never changed). The first
three quarters of the positions train, the last quarter measures recall: the share of the
`top_blocks` blocks of largest true mass that the gate's top blocks contain, trained and
untrained (the identity gate Seer uses without a file).

Text: the last `tokens` tokens of Python's help() topics (pydoc_data, shipped with every
CPython), so the accuracy sweep (`spin-ray eval`, which reads the first tokens) does not score
text the gate was fitted on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from spin_ray.attention.whole_sequence import capture_layers
from spin_ray.engine.config import resolve_device
from spin_ray.kernels.rope import rope_ref
from spin_ray.models.llama import CausalLM
from spin_ray.models.loader import load_model, load_tokenizer, resolve_model_path
from spin_ray.models.named_shapes import is_named_shape
from spin_ray.sparse.algorithms.seer import default_gates, gate_side

TRAIN_SHARE = 0.75
"""Query positions (in order) that train; the rest measure recall."""


@dataclass(frozen=True)
class GateTrainingConfig:
    """One distillation of a Seer gate."""

    model: str = "smollm2-135m"
    """Checkpoint (any `--model` value but the random-weight shapes, whose attention teaches
    nothing)."""
    block_size: int = 64
    """Tokens per gated block: the `SeerConfig.block_size` the gate is for."""
    tokens: int = 2048
    """Tokens of text in the forward pass (blocks = tokens / block_size)."""
    queries: int = 384
    """Query positions sampled, evenly, after the first two blocks."""
    steps: int = 200
    """Adam steps."""
    learning_rate: float = 3e-3
    """Adam's step size."""
    top_blocks: int = 4
    """Recall is measured over this many blocks of largest true mass."""
    device: str = "auto"
    """auto, cpu or cuda[:N]: where the forward pass and the fit run."""
    output: str | None = None
    """Where to write the gate; None: `seer_gate.safetensors` beside the checkpoint."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: must be a power of two, got {self.block_size}")
        if self.tokens < 4 * self.block_size:
            raise ValueError(f"tokens: need at least 4 blocks ({4 * self.block_size} tokens)")
        for name in ("queries", "steps", "top_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if is_named_shape(self.model):
            raise ValueError(
                f"model: {self.model!r} has random weights; a gate needs a trained model"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")


@dataclass(frozen=True)
class GateReport:
    path: Path
    layers: int
    recall_trained: float
    """Held-out recall of the true top blocks, averaged over layers, heads and positions."""
    recall_untrained: float
    """The same for the identity gate (Seer's default without a file)."""
    seconds: float


def train_seer_gate(config: GateTrainingConfig, progress: bool = True) -> GateReport:
    """Distil a gate for every layer, write it, and report its held-out recall."""
    start = time.monotonic()
    path = resolve_model_path(config.model)
    device = resolve_device(config.device)
    model = load_model(path, None, torch.float32, device, progress=progress)
    ids = _text_ids(load_tokenizer(path), config.tokens)
    q_post, k_post = _capture(model, ids)  # [L, T, Hq, D], [L, T, Hkv, D]
    inv_freq = model.rope.inv_freq.float().cpu()  # [D/2]
    positions = _query_positions(config)
    target = _block_mass(q_post, k_post, positions, config.block_size)  # [L, Q, Hkv, nb]
    gate_in = _gate_inputs(q_post, k_post, positions, config.block_size, inv_freq)
    layers, heads, dim = k_post.shape[0], k_post.shape[2], k_post.shape[3]
    q_gate, k_gate = (w.clone() for w in default_gates(layers, heads, dim))
    untrained = _recall(_scores(q_gate, k_gate, *gate_in), target, config.top_blocks)
    q_gate.requires_grad_(True)
    k_gate.requires_grad_(True)
    optimizer = torch.optim.Adam([q_gate, k_gate], lr=config.learning_rate)
    train = slice(0, int(len(positions) * TRAIN_SHARE))
    for _ in tqdm(range(config.steps), desc="train-gate", disable=not progress):
        logits = _scores(q_gate, k_gate, *gate_in)  # [L, Q, Hkv, nb]
        loss = _kl(target[:, train], logits[:, train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        trained = _recall(_scores(q_gate, k_gate, *gate_in), target, config.top_blocks)
    out = Path(config.output) if config.output else _beside(path)
    weights = {}
    for layer in range(layers):
        weights[f"layers.{layer}.q_gate"] = q_gate[layer].detach().contiguous()
        weights[f"layers.{layer}.k_gate"] = k_gate[layer].detach().contiguous()
    metadata = {"model": config.model, "block_size": str(config.block_size)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata=metadata)
    return GateReport(out, layers, trained, untrained, time.monotonic() - start)


def _text_ids(tokenizer, tokens: int) -> list[int]:
    """The last `tokens` tokens of Python's help() topics."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"tokens: the text has {len(ids)} tokens, fewer than {tokens}")
    return ids[-tokens:]


def _capture(model: CausalLM, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    kept = capture_layers(model, ids, keep=("q", "k"))
    q, k = (torch.stack(kept[name]).float().cpu() for name in ("q", "k"))
    return q, k  # [L, T, Hq, D], [L, T, Hkv, D]


def _query_positions(config: GateTrainingConfig) -> torch.Tensor:  # [Q] int64
    """Evenly spaced after the first two blocks (so every query has complete blocks before it)."""
    first = 2 * config.block_size
    count = min(config.queries, config.tokens - first)
    return torch.linspace(first, config.tokens - 1, count).round().long().unique()


def _block_mass(q_post, k_post, positions, block_size) -> torch.Tensor:
    """[L, Q, Hkv, nb]: each complete block's share of the attention mass that the complete
    blocks before the query get, averaged over the query group; 0 for the other blocks."""
    tokens, hq, dim = q_post.shape[1:]
    hkv = k_post.shape[2]
    blocks = tokens // block_size
    causal = torch.arange(tokens)[None, :] <= positions[:, None]  # [Q, T]
    complete = _complete(positions, blocks, block_size)[:, None]  # [Q, 1, nb]
    masses = []
    for q_layer, k_layer in zip(q_post, k_post):  # one layer at a time: [T, Hq, D], [T, Hkv, D]
        k = k_layer.repeat_interleave(hq // hkv, dim=1)  # [T, Hq, D]
        logits = torch.einsum("qhd,thd->qht", q_layer[positions], k) / math.sqrt(dim)
        probs = logits.masked_fill(~causal[:, None], -math.inf).softmax(-1)  # [Q, Hq, T]
        mass = probs[..., : blocks * block_size].unflatten(-1, (blocks, block_size)).sum(-1)
        mass = mass.unflatten(1, (hkv, hq // hkv)).mean(2) * complete  # [Q, Hkv, nb]
        masses.append(mass / mass.sum(-1, keepdim=True))
    return torch.stack(masses)


def _complete(positions, blocks, block_size) -> torch.Tensor:  # [Q, nb] bool
    """Blocks that end before the query."""
    ends = (torch.arange(blocks) + 1) * block_size  # [nb]
    return ends[None, :] <= positions[:, None]


def _gate_inputs(q_post, k_post, positions, block_size, inv_freq):
    """What the gate reads, as Seer computes it: the group-mean query before RoPE [L, Q, Hkv,
    D], the blocks' pooled keys before RoPE [L, nb, Hkv, 3D], and the positions."""
    layers, tokens, hq, dim = q_post.shape
    hkv = k_post.shape[2]
    blocks = tokens // block_size
    at = torch.arange(tokens)
    k_pre = rope_ref(k_post.transpose(0, 1).reshape(tokens, layers * hkv, dim), -at, inv_freq)
    k_pre = k_pre.view(tokens, layers, hkv, dim).transpose(0, 1)[:, : blocks * block_size]
    k_blocks = k_pre.unflatten(1, (blocks, block_size))  # [L, nb, bs, Hkv, D]
    pooled = torch.cat([k_blocks.amax(2), k_blocks.amin(2), k_blocks.mean(2)], -1)
    q = q_post[:, positions].transpose(0, 1).reshape(len(positions), layers * hq, dim)
    q_pre = rope_ref(q, -positions, inv_freq).view(len(positions), layers, hq, dim)
    q_mean = q_pre.transpose(0, 1).unflatten(2, (hkv, hq // hkv)).mean(3)  # [L, Q, Hkv, D]
    ends = (torch.arange(blocks) + 1) * block_size - 1  # [nb]
    return q_mean, pooled, positions, ends, _complete(positions, blocks, block_size), inv_freq


def _scores(q_gate, k_gate, q_mean, pooled, positions, ends, complete, inv_freq):
    """[L, Q, Hkv, nb]: Seer's block scores (seer.py's formula), -inf for incomplete blocks."""
    scores = []
    for layer in range(q_mean.shape[0]):
        q = gate_side(q_mean[layer][:, None], q_gate[layer], positions, inv_freq)[:, 0]
        k = gate_side(pooled[layer][:, None], k_gate[layer], ends, inv_freq)[:, 0]
        scores.append(torch.einsum("qhf,nhf->qhn", q, k) / math.sqrt(q.shape[-1]))
    return torch.stack(scores).masked_fill(~complete[None, :, None], -math.inf)


def _kl(target, logits) -> torch.Tensor:
    """KL(target || softmax(logits)) summed over blocks, averaged over the rest."""
    log_p = torch.log_softmax(logits, -1).masked_fill(target == 0, 0.0)
    log_t = torch.log(target.clamp_min(1e-12)).masked_fill(target == 0, 0.0)
    return (target * (log_t - log_p)).sum(-1).mean()


def _recall(scores, target, top: int) -> float:
    """Held-out positions: the share of the `top` true blocks among the gate's `top`."""
    held = slice(int(scores.shape[1] * TRAIN_SHARE), None)
    scores, target = scores[:, held], target[:, held]
    k = min(top, scores.shape[-1])
    true_top = target.topk(k, -1).indices
    gate_top = scores.topk(k, -1).indices
    hits = (true_top[..., :, None] == gate_top[..., None, :]).any(-1).float()
    return hits.mean().item()


def _beside(checkpoint: Path) -> Path:
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return folder / "seer_gate.safetensors"
