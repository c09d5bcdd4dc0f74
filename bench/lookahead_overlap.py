"""How much of a layer's Quest selection a query predicted one layer early would bring in.

A random-weight Llama (transformers, normal(0, 0.02) like `--model llama-3.1-8b`, scaled down
to run on a CPU) prefills a random prompt and decodes greedily. At each decode step and layer
l >= 2 it selects the top-k pages (Quest: per page, the sum over dimensions of
max(q * key max, q * key min), summed over a KV head's query heads; sink and local pages left
out, as they are always attended) twice: with the layer's real query, and with the query the
layer would compute from layer l - 1's input (what `SparseConfig.lookahead` fetches early).
Printed: the share of the real selection the prediction covers, against the share the previous
decode step's real selection covers (what an LRU buffer of one selection would hit) and the
share a random choice would cover; and, of the predicted pages a buffer holding the previous
step's selection would have to fetch, the share the real selection takes, for the
higher-scored and the lower-scored half of the prediction (would fetching only the surer half
waste less PCIe traffic?).

    python bench/lookahead_overlap.py            # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

HEAD_DIM = 128
SINK_PAGES, LOCAL_PAGES = 4, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--topk-pages", type=int, default=32)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=int(2.75 * args.hidden),
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=HEAD_DIM, vocab_size=2000,
        max_position_embeddings=2 * args.prompt_len, rope_theta=500000.0,
        initializer_range=0.02,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    group = args.heads // args.kv_heads

    def query(layer: int, hidden: torch.Tensor, cos, sin) -> torch.Tensor:  # [Hq, D]
        block = model.model.layers[layer]
        q = block.self_attn.q_proj(block.input_layernorm(hidden))  # [1, 1, Hq * D]
        q = q.view(1, 1, args.heads, HEAD_DIM).transpose(1, 2)  # [1, Hq, 1, D]
        return apply_rotary_pos_emb(q, q, cos, sin)[0][0, :, 0]

    def select(keys: torch.Tensor, q: torch.Tensor) -> list[list[int]]:  # keys [Hkv, T, D]
        """Per KV head, the top-k pages, highest score first."""
        pages = keys.shape[1] // args.page_size
        k = keys[:, : pages * args.page_size].view(args.kv_heads, pages, args.page_size, -1)
        kmax, kmin = k.amax(2), k.amin(2)  # [Hkv, pages, D]
        qg = q.view(args.kv_heads, group, 1, HEAD_DIM)
        scores = torch.maximum(qg * kmax[:, None], qg * kmin[:, None]).sum(-1).sum(1)
        scores[:, :SINK_PAGES] = scores[:, -LOCAL_PAGES:] = float("-inf")
        return [row.tolist() for row in scores.topk(args.topk_pages, -1).indices]

    def covered(a: list[list[int]], b: list[list[int]]) -> float:
        return sum(len(set(x) & set(y)) for x, y in zip(a, b)) / (args.kv_heads * args.topk_pages)

    def precision(real, guess, before) -> tuple[int, int, int, int]:
        """Of the guessed pages not in `before` (the ones a buffer holding the previous step's
        selection would fetch), how many the real selection takes: (taken, guessed) for the
        higher-scored half of the guess and for the lower half."""
        half = args.topk_pages // 2
        counts = [0, 0, 0, 0]
        for r, g, b in zip(real, guess, before):
            r, b = set(r), set(b)
            for i, part in enumerate((g[:half], g[half:])):
                new = [page for page in part if page not in b]
                counts[2 * i] += sum(page in r for page in new)
                counts[2 * i + 1] += len(new)
        return tuple(counts)

    predicted, previous, last = [], [], {}
    fetched = torch.zeros(4, dtype=torch.int64)  # taken / guessed, top half then bottom half
    with torch.no_grad():
        ids = torch.randint(0, config.vocab_size, (1, args.prompt_len))
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for step in range(args.steps):
            pos = torch.tensor([[args.prompt_len + step]])
            out = model(token, past_key_values=cache, position_ids=pos, use_cache=True,
                        output_hidden_states=True)  # fmt: skip
            cache, inputs = out.past_key_values, out.hidden_states  # inputs[l]: layer l's input
            cos, sin = model.model.rotary_emb(inputs[0], pos)
            for layer in range(2, args.layers):
                keys = cache.layers[layer].keys[0]  # [Hkv, T, D] post-RoPE
                real = select(keys, query(layer, inputs[layer], cos, sin))
                guess = select(keys, query(layer, inputs[layer - 1], cos, sin))
                predicted.append(covered(real, guess))
                if layer in last:
                    previous.append(covered(real, last[layer]))
                    fetched += torch.tensor(precision(real, guess, last[layer]))
                last[layer] = real
            token = out.logits[:, -1:].argmax(-1)
    candidates = args.prompt_len // args.page_size - SINK_PAGES - LOCAL_PAGES
    print(
        f"{args.layers} layers, hidden {args.hidden}, {args.prompt_len}-token prompt, "
        f"{args.steps} decode steps, top {args.topk_pages} of {candidates} pages per KV head"
    )
    print(f"predicted one layer early: {sum(predicted) / len(predicted):.1%} of the selection")
    print(f"previous step's selection: {sum(previous) / len(previous):.1%}")
    print(f"random pages:              {args.topk_pages / candidates:.1%}")
    taken_top, guessed_top, taken_bottom, guessed_bottom = fetched.tolist()
    print(
        "predicted pages outside the previous step's selection, taken by the real one: "
        f"higher-scored half {taken_top}/{guessed_top} ({taken_top / guessed_top:.1%}), "
        f"lower half {taken_bottom}/{guessed_bottom} ({taken_bottom / guessed_bottom:.1%})"
    )


if __name__ == "__main__":
    main()
