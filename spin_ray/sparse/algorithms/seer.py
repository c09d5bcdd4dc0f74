"""`seer` (SeerAttention-R's learned block gate, its decode form): partition = block of
`block_size` tokens (whole pages); summary = the block's keys before RoPE pooled three ways
(max, min, mean), kept per page and combined per block at select time. The page summaries are
incremental, as Quest's: every stored key is un-rotated and folded into its page as it is
written (prefill chunk by chunk, then each decode token), so no step reads pages back from the
CPU tier to index them.

Score of block j for KV head h at the query's position p:

    R_p(q̄ W_q[h]) · R_{e_j}(k̃_j W_k[h]) / √Dg

where q̄ is the mean of the group's queries before RoPE, k̃_j = [max_j, min_j, mean_j] ∈ R^{3D}
the block's pooled keys before RoPE, R_x the gate's own RoPE at position x (the model's
frequencies; Dg = D), and e_j the position of the block's last token (where SeerAttention-R's
decode gate rotates a block it has just completed). The top blocks are attended, every page of
a block with its score. The runtime stores keys after RoPE, so stored keys and the query are
un-rotated first (RoPE is a rotation: R_{-x} undoes R_x).

Where it differs from the paper: no RMSNorm on the gate's outputs (the paper's `use_qk_norm`
option, off by default there too); selection by token budget only (not by threshold); the last
(incomplete) block and the local window are attended by the runtime's windows, not scored.

Gate weights come from `gate_path` (safetensors or a torch file, as `spin-ray train-gate`
writes) with, for each offloaded model layer i, `layers.{i}.q_gate` [Hkv, D, D] and
`layers.{i}.k_gate` [Hkv, 3D, D]. Without a file the gate is the deterministic initialisation
W_q = I, W_k = [0; 0; I]: the score is R_p(q̄) · R_{e_j}(mean_j) / √D, the block's mean key
as attention would see it from the query.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from spin_ray.kernels.rope import rope_ref
from spin_ray.sparse.algorithms.base import SparseAlgorithm


def load_gates(path: str, layers: range, heads: int, head_dim: int):
    """(q_gate [L, Hkv, D, Dg], k_gate [L, Hkv, 3D, Dg]) for the model layers in `layers`."""
    if not Path(path).is_file():
        raise ValueError(f"gate_path: no file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        weights = load_file(path)
    else:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    q_gates, k_gates = [], []
    for i in layers:
        q_gate, k_gate = weights.get(f"layers.{i}.q_gate"), weights.get(f"layers.{i}.k_gate")
        if q_gate is None or k_gate is None:
            raise ValueError(f"gate_path: layers.{i}.q_gate / k_gate missing in {path!r}")
        if q_gate.shape[:2] != (heads, head_dim) or k_gate.shape[:2] != (heads, 3 * head_dim):
            raise ValueError(
                f"gate_path: layer {i} gates have shapes {tuple(q_gate.shape)} and "
                f"{tuple(k_gate.shape)}; expected [{heads}, {head_dim}, Dg] and "
                f"[{heads}, {3 * head_dim}, Dg]"
            )
        if q_gate.shape[2] != head_dim or k_gate.shape[2] != head_dim:
            raise ValueError(
                f"gate_path: layer {i} gates project to {q_gate.shape[2]} and "
                f"{k_gate.shape[2]} dimensions; the gate's RoPE needs the head dim {head_dim}"
            )
        q_gates.append(q_gate.float())
        k_gates.append(k_gate.float())
    return torch.stack(q_gates), torch.stack(k_gates)


def default_gates(num_layers: int, heads: int, head_dim: int):
    """The deterministic test gate: W_q = I, W_k = [0; 0; I] (score = q̄ · mean / √D)."""
    eye = torch.eye(head_dim)
    q_gate = eye.expand(num_layers, heads, head_dim, head_dim).clone()
    k_gate = torch.cat([torch.zeros(2 * head_dim, head_dim), eye])
    return q_gate, k_gate.expand(num_layers, heads, 3 * head_dim, head_dim).clone()


def gate_side(
    x: torch.Tensor,  # [N, M, Hkv, E] group-mean queries (E = D) or pooled keys (E = 3D)
    gate: torch.Tensor,  # [Hkv, E, D] the gate's weights for that side
    positions: torch.Tensor,  # [N] int64 where the gate's RoPE puts each of the N
    inv_freq: torch.Tensor,  # [D/2] fp32
) -> torch.Tensor:  # [N, M, Hkv, D]
    """One side of the gate, before RoPE in: through the per-head gate, then rotated by the
    gate's own RoPE (the runtime and `spin-ray train-gate` both score with it)."""
    n, m, hkv, _ = x.shape
    gated = torch.einsum("nmhe,hef->nmhf", x, gate)
    return rope_ref(gated.reshape(n, m * hkv, -1), positions, inv_freq).view(n, m, hkv, -1)


class Seer(SparseAlgorithm):
    name = "seer"
    graph_safe = True

    def __init__(self, geometry, config):
        super().__init__(geometry, config)
        g = geometry
        if g.rope_inv_freq is None:
            raise ValueError("seer: needs the model's RoPE frequencies (SparseGeometry)")
        self.inv_freq = g.rope_inv_freq.to(g.device, torch.float32)  # [D/2]
        self.block_pages = config.block_size // g.page_size
        self.index_unit_pages = self.block_pages
        self.spare = g.num_cpu_pages  # the row padding tokens (slot -1) fold into
        shape = (g.num_layers, g.num_cpu_pages + 1, g.num_kv_heads, g.head_dim)
        self.kmax = torch.zeros(shape, dtype=g.dtype, device=g.device)  # [L, P + 1, Hkv, D]
        self.kmin = torch.zeros(shape, dtype=g.dtype, device=g.device)
        self.ksum = torch.zeros(shape, dtype=torch.float32, device=g.device)
        if config.gate_path is None:
            gates = default_gates(g.num_layers, g.num_kv_heads, g.head_dim)
        else:
            layers = range(g.first_layer, g.first_layer + g.num_layers)
            gates = load_gates(config.gate_path, layers, g.num_kv_heads, g.head_dim)
        self.q_gate, self.k_gate = (w.to(g.device) for w in gates)

    def append_chunk(self, layer, slots, k, v, first_position, positions):
        self.append(layer, slots, k, v, positions)

    def append(self, layer, slots, k, v, positions):
        """Fold the stored keys, un-rotated, into their pages' max, min and sum (on the device,
        no synchronisation: prefill chunks and decode tokens alike, as they are written)."""
        size = self.geometry.page_size
        stored = slots >= 0  # [N]
        pages = torch.where(stored, slots // size, self.spare)  # [N]
        before = rope_ref(k, -positions, self.inv_freq)  # [N, Hkv, D]
        fresh = torch.where(stored & (slots % size == 0), pages, self.spare)  # a page's first token
        self.kmax[layer].index_fill_(0, fresh, -math.inf)
        self.kmin[layer].index_fill_(0, fresh, math.inf)
        self.ksum[layer].index_fill_(0, fresh, 0.0)
        rows = pages[:, None, None].expand_as(before)
        self.kmax[layer].scatter_reduce_(0, rows, before.to(self.kmax.dtype), "amax")
        self.kmin[layer].scatter_reduce_(0, rows, before.to(self.kmin.dtype), "amin")
        self.ksum[layer].index_add_(0, pages, before.float())

    def page_scores(self, layer, q, batch):
        b, hq, d = q.shape
        hkv, bp = self.geometry.num_kv_heads, self.block_pages
        maxp = batch.page_table.shape[1]
        blocks = -(-maxp // bp)
        table = torch.nn.functional.pad(batch.page_table.long(), (0, blocks * bp - maxp))

        def pooled(stat):  # [B, blocks, bp, Hkv, D] in the summary's dtype
            return stat[layer][table].view(b, blocks, bp, hkv, d)

        block_tokens = self.config.block_size
        k_pooled = torch.cat(
            [
                pooled(self.kmax).amax(2).float(),
                pooled(self.kmin).amin(2).float(),
                pooled(self.ksum).sum(2) / block_tokens,
            ],
            -1,
        )  # [B, blocks, Hkv, 3D] fp32
        ends = torch.arange(1, blocks + 1, device=q.device) * block_tokens - 1  # [blocks]
        k_gated = gate_side(k_pooled.transpose(0, 1), self.k_gate[layer], ends, self.inv_freq)
        at = batch.context_lens - 1  # [B] the query's position
        q_before = rope_ref(q.float(), -at, self.inv_freq)  # [B, Hq, D]
        q_mean = q_before.view(b, hkv, hq // hkv, d).mean(2)  # [B, Hkv, D]
        q_gated = gate_side(q_mean[:, None], self.q_gate[layer], at, self.inv_freq)[:, 0]
        score = torch.einsum("bhf,nbhf->bhn", q_gated, k_gated) / math.sqrt(d)
        return score.repeat_interleave(bp, -1)[..., :maxp]
