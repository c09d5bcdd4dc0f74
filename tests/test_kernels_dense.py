"""The dense attention kernels against their torch references, on the CPU with Triton's
interpreter; and the dense backend's routing of decode and prefill sequences."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

from spin_ray.attention.dense import DenseAttentionBackend
from spin_ray.attention.metadata import AttentionMetadata
from spin_ray.cache.kv_cache import KVCache, KVCacheShape
from spin_ray.kernels.paged_attention_ref import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    prefill_attention_ref,
    store_kv_ref,
)
from spin_ray.kernels.paged_prefill_attention import (
    AVOID_RECOMPILE_ENV,
    merge_by_lse,
    paged_prefill_attention,
    prefill_attention,
    reuse_cudnn_plans_across_lengths,
)


@pytest.fixture(scope="module")
def kernels():
    """The Triton kernel modules, decorated for the interpreter (conftest.py sets
    TRITON_INTERPRET=1 before anything imports triton)."""
    decode = importlib.import_module("spin_ray.kernels.paged_decode_attention")
    store = importlib.import_module("spin_ray.kernels.kv_store")
    split_merge = importlib.import_module("spin_ray.kernels.split_merge")
    assert split_merge.INTERPRETED, "TRITON_INTERPRET=1 was not set before triton was imported"
    return decode, store


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "output has NaN (unwritten or poisoned reads)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _paged_batch(gen, context_lens, page_size, num_kv_heads, head_dim, dtype, spare_pages=3):
    """K/V caches whose pages are dealt to the sequences in a shuffled order. Every slot that
    no sequence owns (spare pages, the tail of each last page) holds NaN, and each page table
    row is padded with spare pages, so any read past a context shows up as NaN."""
    pages_per_seq = [-(-n // page_size) for n in context_lens]
    num_pages = sum(pages_per_seq) + spare_pages
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    order = torch.randperm(num_pages, generator=gen)
    spare = order[sum(pages_per_seq) :]
    pad = torch.randint(spare_pages, (len(context_lens), max(pages_per_seq)), generator=gen)
    page_table = spare[pad]  # [B, max_pages]
    k_slots = k_cache.view(-1, num_kv_heads, head_dim)  # [P * S, Hkv, D]
    v_slots = v_cache.view(-1, num_kv_heads, head_dim)
    used = 0
    for b, (n, p) in enumerate(zip(context_lens, pages_per_seq, strict=True)):
        page_table[b, :p] = order[used : used + p]
        used += p
        tok = torch.arange(n)
        slots = page_table[b, tok // page_size] * page_size + tok % page_size
        k_slots[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_slots[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    return k_cache, v_cache, page_table.to(torch.int32)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_matches_reference_fp32(kernels, group, page_size, num_splits):
    decode = kernels[0]
    gen = torch.Generator().manual_seed(group * 100 + page_size + (num_splits or 0))
    context_lens = [1, 37, 16, 90]  # one token, a non-multiple, exactly one page, several blocks
    num_kv_heads, head_dim = 2, 32
    k_cache, v_cache, page_table = _paged_batch(
        gen, context_lens, page_size, num_kv_heads, head_dim, torch.float32
    )
    q = torch.randn(len(context_lens), num_kv_heads * group, head_dim, generator=gen)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    decode.paged_decode_attention(
        q,
        k_cache,
        v_cache,
        page_table,
        lens,
        0.17,
        num_splits=num_splits,
        out=out,
        config=decode.DecodeKernelConfig(block_n=16),
    )
    ref = paged_decode_attention_ref(q, k_cache, v_cache, page_table, lens, 0.17)
    assert _rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_matches_reference_half(kernels, dtype):
    decode = kernels[0]
    gen = torch.Generator().manual_seed(7)
    context_lens = [5, 70, 33]
    k_cache, v_cache, page_table = _paged_batch(gen, context_lens, 16, 2, 64, dtype)
    q = torch.randn(3, 8, 64, generator=gen).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    out = decode.paged_decode_attention(q, k_cache, v_cache, page_table, lens, 0.125, num_splits=2)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, page_table, lens, 0.125)
    assert out.dtype == dtype
    assert _rel_err(out, ref) < 1e-2


def test_decode_odd_head_dim_and_more_splits_than_blocks(kernels):
    """head_dim 40 (padded to 64 inside) and 8 splits for 1-3 blocks: empty splits must merge
    away."""
    decode = kernels[0]
    gen = torch.Generator().manual_seed(3)
    context_lens = [3, 40]
    k_cache, v_cache, page_table = _paged_batch(gen, context_lens, 4, 1, 40, torch.float32)
    q = torch.randn(2, 3, 40, generator=gen)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    out = decode.paged_decode_attention(
        q,
        k_cache,
        v_cache,
        page_table,
        lens,
        0.3,
        num_splits=8,
        config=decode.DecodeKernelConfig(block_n=16),
    )
    ref = paged_decode_attention_ref(q, k_cache, v_cache, page_table, lens, 0.3)
    assert _rel_err(out, ref) < 1e-4


def test_decode_rejects_bad_input(kernels):
    decode = kernels[0]
    q = torch.randn(2, 4, 16)
    cache = torch.randn(6, 4, 2, 16)
    table = torch.zeros(2, 3, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="page_table"):
        decode.paged_decode_attention(q, cache, cache, table.long(), lens, 1.0)
    with pytest.raises(ValueError, match="context_lens"):
        decode.paged_decode_attention(q, cache, cache, table, lens[:1], 1.0)
    with pytest.raises(ValueError, match="KV heads"):
        decode.paged_decode_attention(torch.randn(2, 3, 16), cache, cache, table, lens, 1.0)
    with pytest.raises(ValueError, match="share one of"):
        decode.paged_decode_attention(q.half(), cache, cache, table, lens, 1.0)
    with pytest.raises(ValueError, match="block_n"):
        decode.DecodeKernelConfig(block_n=24)


def test_num_splits_heuristic(kernels):
    decode = kernels[0]
    config = decode.DecodeKernelConfig(block_n=64, programs_per_sm=4, min_blocks_per_split=4)
    # 16 x 8 = 128 programs per split, 132 x 4 = 528 slots: 4 splits fill one wave exactly
    assert decode.choose_num_splits(16, 8, 32768, 132, config) == 4
    # a short context caps it: 256 tokens = 4 blocks = one split's minimum
    assert decode.choose_num_splits(16, 8, 256, 132, config) == 1
    # a big batch fills the GPU by itself
    assert decode.choose_num_splits(64, 8, 32768, 132, config) == 1
    # one long sequence: as many splits as allowed
    assert decode.choose_num_splits(1, 8, 131072, 132, config) == config.max_splits


def test_store_kv_skips_negative_slots(kernels):
    """Padded rows of a CUDA-graph batch carry slot -1: nothing of theirs is written."""
    store = kernels[1]
    gen = torch.Generator().manual_seed(12)
    shape = (3, 4, 2, 8)  # [P, S, Hkv, D]
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    k, v = torch.randn(4, 2, 8, generator=gen), torch.randn(4, 2, 8, generator=gen)
    slots = torch.tensor([5, -1, 9, -1])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k.view(-1, 2, 8)[[5, 9]] = k[[0, 2]]  # the written-out result
    expected_v.view(-1, 2, 8)[[5, 9]] = v[[0, 2]]
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    store_kv_ref(ref_k, ref_v, k, v, slots)
    store.store_kv(k_cache, v_cache, k, v, slots)
    for got in ((ref_k, ref_v), (k_cache, v_cache)):
        assert torch.equal(got[0], expected_k) and torch.equal(got[1], expected_v)


@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
    ],
)
def test_store_kv_matches_reference(kernels, dtype, cache_dtype):
    store = kernels[1]
    gen = torch.Generator().manual_seed(11)
    num_pages, page_size, num_kv_heads, head_dim = 5, 4, 3, 24
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    v_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:7]
    qkv = torch.randn(7, 2 * num_kv_heads + 1, head_dim, generator=gen).to(dtype)
    k, v = qkv[:, :num_kv_heads], qkv[:, num_kv_heads : 2 * num_kv_heads]  # strided views
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k_ref, v_ref, k, v, slots)
    store.store_kv(k_cache, v_cache, k, v, slots)
    if dtype == cache_dtype:
        assert torch.equal(k_cache, k_ref)
        assert torch.equal(v_cache, v_ref)
    else:  # the interpreter rounds fp32 -> bf16 differently from torch (by up to one ulp)
        torch.testing.assert_close(k_cache, k_ref, rtol=2**-7, atol=0)
        torch.testing.assert_close(v_cache, v_ref, rtol=2**-7, atol=0)


def test_store_kv_rejects_bad_input(kernels):
    store = kernels[1]
    cache = torch.zeros(2, 4, 2, 8)
    k = torch.zeros(3, 2, 8)
    with pytest.raises(ValueError, match="slot_mapping"):
        store.store_kv(cache, cache, k, k, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="k and v"):
        store.store_kv(cache, cache, k, k[:, :1], torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize(("n", "context_len"), [(9, 9), (6, 23), (1, 5)])
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_matches_reference(n, context_len, group):
    gen = torch.Generator().manual_seed(n * 31 + context_len + group)
    k_cache, v_cache, page_table = _paged_batch(gen, [context_len], 4, 2, 16, torch.float32)
    pages = page_table[0, : -(-context_len // 4)]
    q = torch.randn(n, 2 * group, 16, generator=gen)
    k_all = k_cache[pages.long()].flatten(0, 1)[:context_len]  # [T, Hkv, D]
    v_all = v_cache[pages.long()].flatten(0, 1)[:context_len]
    out = paged_prefill_attention(
        q, k_cache, v_cache, pages, context_len, 0.2, k_all[-n:], v_all[-n:]
    )
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, pages, context_len, 0.2)
    assert _rel_err(out, ref) < 1e-5
    # the same context handed over gathered, as [Hkv, T, D] views (the SPIN cache's prefill slots)
    head_major = prefill_attention(q, k_all.transpose(0, 1), v_all.transpose(0, 1), 0.2)
    assert _rel_err(head_major, ref) < 1e-5
    ref_head_major = prefill_attention_ref(q, k_all.transpose(0, 1), v_all.transpose(0, 1), 0.2)
    assert _rel_err(ref_head_major, ref) < 1e-6


class _SDPALayouts(TorchFunctionMode):
    """Records, for every SDPA call inside it, whether q, k and v are BSHD-contiguous."""

    def __init__(self):
        super().__init__()
        self.bshd: list[tuple[bool, bool, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.bshd.append(tuple(x.transpose(1, 2).is_contiguous() for x in args[:3]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("prefix", [0, 7])
def test_prefill_hands_sdpa_token_major_views(prefix):
    """q, k and v reach SDPA as views of contiguous [1, L, H, D] tensors even when they are
    views of a fused QKV projection (the model's): cuDNN's plan reuse across lengths
    (TORCH_CUDNN_SDPA_AVOID_RECOMPILE) takes no other layout. The result stays the reference's."""
    gen = torch.Generator().manual_seed(5 + prefix)
    n, hq, hkv, d = 6, 4, 2, 16
    fused = torch.randn(n, (hq + 2 * hkv) * d, generator=gen)  # one [n, (Hq + 2 Hkv) D] matmul
    q, k_new, v_new = fused.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k_new, v_new = q.view(n, hq, d), k_new.view(n, hkv, d), v_new.view(n, hkv, d)
    k_prefix = torch.randn(prefix, hkv, d, generator=gen)
    v_prefix = torch.randn(prefix, hkv, d, generator=gen)
    k = torch.cat([k_prefix, k_new]).transpose(0, 1) if prefix else k_new.transpose(0, 1)
    v = torch.cat([v_prefix, v_new]).transpose(0, 1) if prefix else v_new.transpose(0, 1)
    with _SDPALayouts() as layouts:
        out = prefill_attention(q, k, v, 0.3)
    assert layouts.bshd == [(True, True, True)]
    assert _rel_err(out, prefill_attention_ref(q, k, v, 0.3)) < 1e-5


@pytest.mark.parametrize(("preset", "after"), [(None, "1"), ("0", "0"), ("1", "1")])
def test_cudnn_plan_reuse_is_on_unless_the_environment_says(monkeypatch, preset, after):
    if preset is None:
        monkeypatch.delenv(AVOID_RECOMPILE_ENV, raising=False)
    else:
        monkeypatch.setenv(AVOID_RECOMPILE_ENV, preset)
    reuse_cudnn_plans_across_lengths()
    assert os.environ[AVOID_RECOMPILE_ENV] == after


def test_merge_by_lse_equals_attention_over_all_keys():
    """Attention over two disjoint key sets, merged by their log-sum-exps (the GPU prefill's
    prefix + chunk split) equals attention over all keys at once."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 5, 8, generator=gen)  # [H, n, D]
    k = torch.randn(3, 11, 8, generator=gen)  # [H, T, D]
    v = torch.randn(3, 11, 8, generator=gen)
    scores = q @ k.transpose(1, 2) * 0.4  # [H, n, T]
    parts = []
    for keys in (slice(0, 7), slice(7, 11)):
        s = scores[..., keys]
        parts += [s.softmax(-1) @ v[:, keys], s.logsumexp(-1)]
    merged = merge_by_lse(*parts)
    torch.testing.assert_close(merged, scores.softmax(-1) @ v, rtol=1e-5, atol=1e-6)


def _mixed_step(gen, page_size=4, num_kv_heads=2, num_heads=4, head_dim=16):
    """A step with decode and prefill sequences interleaved, over a cache already holding each
    sequence's prefix; returns the cache, metadata, and the step's q/k/v."""
    query_lens = [1, 6, 1, 5, 1]
    context_lens = [9, 6, 1, 14, 17]
    pages_per_seq = [-(-c // page_size) for c in context_lens]
    num_pages = sum(pages_per_seq) + 2
    kv_cache = KVCache(
        KVCacheShape(1, num_pages, page_size, num_kv_heads, head_dim), torch.float32, "cpu"
    )
    kv_cache.k[0].normal_(generator=gen)
    kv_cache.v[0].normal_(generator=gen)
    order = torch.randperm(num_pages, generator=gen).tolist()
    tables, slots, used = [], [], 0
    for n, c, p in zip(query_lens, context_lens, pages_per_seq, strict=True):
        table = order[used : used + p]
        used += p
        tables.append(table + [0] * (max(pages_per_seq) - p))
        slots += [table[t // page_size] * page_size + t % page_size for t in range(c - n, c)]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        page_table=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_lens_cpu=tuple(query_lens),
        context_lens_cpu=tuple(context_lens),
        page_size=page_size,
    )
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    return kv_cache, meta, q, k, v


@pytest.mark.parametrize("gpu_path", [False, True])
def test_dense_backend_mixed_step(kernels, gpu_path):
    """Decode and prefill sequences in one step, each against the per-sequence reference;
    gpu_path runs the CUDA branch (Triton kernels interpreted, SDPA prefill) on the CPU."""
    gen = torch.Generator().manual_seed(5)
    kv_cache, meta, q, k, v = _mixed_step(gen)
    k_ref, v_ref = kv_cache.k[0].clone(), kv_cache.v[0].clone()
    store_kv_ref(k_ref, v_ref, k, v, meta.slot_mapping)
    starts = meta.query_start_loc.tolist()[:-1]
    expected = torch.cat(
        [
            paged_prefill_attention_ref(
                q[start : start + n], k_ref, v_ref, meta.page_table[b, : -(-c // 4)], c, 0.25
            )
            for b, (start, n, c) in enumerate(
                zip(starts, meta.query_lens_cpu, meta.context_lens_cpu, strict=True)
            )
        ]
    )
    backend = DenseAttentionBackend(kv_cache)
    backend.on_cuda = gpu_path
    backend.plan(meta)
    out = backend.forward(0, q, k, v, 0.25)
    assert torch.equal(kv_cache.k[0], k_ref)
    assert _rel_err(out, expected) < 1e-5
