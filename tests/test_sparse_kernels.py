"""The sparse path's Triton kernels against their torch references, on the CPU with Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1), plus the references against plain specs."""

from __future__ import annotations

import pytest
import torch

from spin_ray.kernels.lru_victims import lru_victims, lru_victims_ref
from spin_ray.kernels.quest_page_scores import quest_page_scores, quest_page_scores_ref
from spin_ray.kernels.residency_ref import lookup_ref
from spin_ray.kernels.sparse_decode_attention import (
    sparse_decode_attention,
    sparse_decode_attention_ref,
)
from spin_ray.kernels.sparse_kv_store import store_kv_head_major, store_kv_head_major_ref
from spin_ray.kernels.spin_retrieve import spin_retrieve, spin_retrieve_ref
from spin_ray.kernels.uva_gather import gather_pages, gather_pages_ref
from spin_ray.sparse.residency import ResidencyTable


def _sparse_lists(gen, batch, hkv, page_size, entries, num_slots):
    """Per-(b, h) lists of logical pages (-1 = unused, about a quarter; the context's partial
    last page always listed; some pages past the context) with distinct GPU slots, context
    lengths, and each listed page's valid tokens written out: clamp(ctx - page·S, 0, S). The last
    sequence lists nothing (a padding row of a CUDA-graph batch)."""
    context_lens = torch.randint(1, entries * page_size, (batch,), generator=gen)
    context_lens[0] = entries * page_size - page_size // 2  # partial last page
    num_pages = -(-context_lens // page_size)  # [B]
    pages = torch.stack(
        [torch.randint(0, int(n) + 2, (hkv, entries), generator=gen) for n in num_pages]
    )  # [B, Hkv, K]
    pages[torch.rand(pages.shape, generator=gen) < 0.25] = -1
    pages[:, :, 0] = (num_pages - 1)[:, None]
    pages[-1] = -1
    slots = torch.randperm(num_slots, generator=gen)[: pages.numel()].view(pages.shape)
    slots = torch.where(pages >= 0, slots, -1)
    left = context_lens[:, None, None] - pages * page_size
    counts = torch.where(pages >= 0, left.clamp(0, page_size), 0)
    return pages, slots, context_lens, counts


def _nan_slots(gen, heads, num_slots, page_size, head_dim, slots, counts, dtype):
    """GPU-tier K/V that are NaN everywhere except the valid tokens of the listed slots."""
    k = torch.full((heads, num_slots, page_size, head_dim), float("nan"), dtype=dtype)
    v = torch.full_like(k, float("nan"))
    b, h, j = (slots >= 0).nonzero(as_tuple=True)
    for bi, hi, ji in zip(b.tolist(), h.tolist(), j.tolist()):
        n = int(counts[bi, hi, ji])
        k[hi, slots[bi, hi, ji], :n] = torch.randn(n, head_dim, generator=gen).to(dtype)
        v[hi, slots[bi, hi, ji], :n] = torch.randn(n, head_dim, generator=gen).to(dtype)
    return k, v


@pytest.mark.parametrize(
    "batch,hq,hkv,head_dim,page_size,entries,split",
    [
        (3, 4, 2, 16, 16, 9, 4),
        (3, 6, 3, 8, 4, 7, 16),
        (2, 8, 1, 32, 16, 33, 8),
        (2, 2, 1, 16, 4, 5, 1),
    ],
)
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_attention_matches_reference(
    batch, hq, hkv, head_dim, page_size, entries, split, with_extra, dtype
):
    gen = torch.Generator().manual_seed(batch * 100 + entries)
    num_slots = batch * hkv * entries + 2
    pages, slots, context_lens, counts = _sparse_lists(
        gen, batch, hkv, page_size, entries, num_slots
    )
    assert ((pages >= 0) & (counts == 0)).any(), "a listed page past the context"
    assert ((counts > 0) & (counts < page_size)).any(), "a partial page"
    k, v = _nan_slots(gen, hkv, num_slots, page_size, head_dim, slots, counts, dtype)
    q = torch.randn(batch, hq, head_dim, generator=gen).to(dtype)
    extra = None
    if with_extra:
        extra = (
            torch.randn(batch, hq, generator=gen),
            torch.rand(batch, hq, generator=gen) + 0.5,
            torch.randn(batch, hq, head_dim, generator=gen),
        )
        extra[0][0, 0] = float("-inf")  # an empty extra partial
    ref = sparse_decode_attention_ref(q, k, v, slots, pages, context_lens, 0.25, extra)
    out = sparse_decode_attention(
        q, k, v, slots, pages, context_lens, 0.25, extra, entries_per_split=split
    )
    assert not ref.isnan().any() and not out.isnan().any()
    assert out.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    if with_extra:  # the row listing nothing attends the extra partial alone
        _, el, eacc = extra
        torch.testing.assert_close(ref[-1].float(), eacc[-1] / el[-1, :, None], atol=tol, rtol=tol)
    else:
        assert out[-1].eq(0).all() and ref[-1].eq(0).all(), "a row attending nothing gets 0"


def test_sparse_decode_reference_is_softmax_attention():
    """The reference equals softmax(q·kᵀ·scale)·v over the valid tokens of the listed pages,
    written out (the last page partial, a page past the context read as empty), and the extra
    partial is merged as if its (m, l, acc) were more keys."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4, generator=gen)  # Hq = 2, one KV head (GQA group of 2)
    k = torch.randn(1, 3, 2, 4, generator=gen)  # 3 slots of 2 tokens
    v = torch.randn(1, 3, 2, 4, generator=gen)
    context_lens = torch.tensor([3])  # page 0 full, page 1 holds one token, page 2 none
    pages = torch.tensor([[[0, -1, 1, 2]]])
    slots = torch.tensor([[[2, -1, 0, 1]]])
    keys = torch.cat([k[0, 2], k[0, 0, :1]])  # [3, 4]
    values = torch.cat([v[0, 2], v[0, 0, :1]])
    expected = torch.softmax(q[0] @ keys.T * 0.5, -1) @ values  # [2, 4]
    out = sparse_decode_attention_ref(q, k, v, slots, pages, context_lens, 0.5)
    torch.testing.assert_close(out[0], expected)
    # an extra partial built from one more key e with value w must equal attending to it too
    e, w = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    logit = q[0] @ e * 0.5  # [2]
    extra = (logit[None], torch.ones(1, 2), w.expand(1, 2, 4))
    expected = torch.softmax(q[0] @ torch.cat([keys, e[None]]).T * 0.5, -1) @ torch.cat(
        [values, w[None]]
    )
    torch.testing.assert_close(
        sparse_decode_attention_ref(q, k, v, slots, pages, context_lens, 0.5, extra)[0], expected
    )
    # nothing listed: 0
    nothing = torch.full_like(pages, -1)
    assert sparse_decode_attention_ref(q, k, v, nothing, nothing, context_lens, 0.5).eq(0).all()


def test_lru_victims_kernel_and_reference_match_the_sort_spec():
    """Victims are the `need` smallest keys of a row, ties taken lowest index first."""
    gen = torch.Generator().manual_seed(1)
    num_keys = 9
    keys = torch.randint(0, num_keys, (12, 37), generator=gen, dtype=torch.uint8)
    need = torch.randint(0, 38, (12,), generator=gen)
    for r in range(12):  # the spec, plainly: stable sort by key, take the first need[r]
        order = sorted(range(37), key=lambda j: (int(keys[r, j]), j))
        spec = torch.zeros(37, dtype=torch.bool)
        spec[order[: int(need[r])]] = True
        assert torch.equal(lru_victims_ref(keys, need, num_keys)[r], spec)
    assert torch.equal(lru_victims(keys, need, num_keys), lru_victims_ref(keys, need, num_keys))


@pytest.mark.parametrize("block_pages", [32, 8])
def test_quest_page_scores_kernel_matches_reference(block_pages):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 8, 16, generator=gen)
    kmin = torch.randn(40, 2, 16, generator=gen)
    kmax = kmin + torch.rand(40, 2, 16, generator=gen)
    table = torch.randint(0, 40, (3, 45), generator=gen, dtype=torch.int32)
    ref = quest_page_scores_ref(q, kmin, kmax, table)
    torch.testing.assert_close(quest_page_scores(q, kmin, kmax, table, None, block_pages), ref)
    # the formula written out for one (sequence, head, page): max over the group's heads
    s = max(float(torch.maximum(q[1, g] * kmax[table[1, 7], 1], q[1, g] * kmin[table[1, 7], 1])
                  .sum()) for g in (4, 5, 6, 7))  # fmt: skip
    assert float(ref[1, 1, 7]) == pytest.approx(s, rel=1e-5)
    # sequences of 45, 12 and 0 pages in one table: past its end a sequence's pages are -inf
    # (and unread: a table entry there may name any page)
    num_pages = torch.tensor([45, 12, 0])
    ragged = table.clone()
    ragged[1, 12:] = 10**6
    ragged[2] = 10**6
    got = quest_page_scores(q, kmin, kmax, ragged, num_pages, block_pages)
    torch.testing.assert_close(got, quest_page_scores_ref(q, kmin, kmax, table, num_pages))
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1, :, :12], ref[1, :, :12])
    assert torch.isneginf(got[1, :, 12:]).all() and torch.isneginf(got[2]).all()


def test_head_major_store_kernel_matches_reference():
    gen = torch.Generator().manual_seed(3)
    pages, heads, page_size, head_dim, n = 6, 3, 4, 8, 11
    ref_k = torch.zeros(pages, heads, page_size, head_dim)
    ref_v = torch.zeros_like(ref_k)
    out_k, out_v = ref_k.clone(), ref_v.clone()
    k = torch.randn(n, heads, head_dim, generator=gen)
    v = torch.randn(n, heads, head_dim, generator=gen)
    slot_mapping = torch.randperm(pages * page_size, generator=gen)[:n]
    store_kv_head_major_ref(ref_k, ref_v, k, v, slot_mapping)
    store_kv_head_major(out_k, out_v, k, v, slot_mapping)
    assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)
    page, offset = slot_mapping // page_size, slot_mapping % page_size  # the layout, plainly
    assert torch.equal(ref_k[page[4], 2, offset[4]], k[4, 2])


def test_head_major_store_skips_negative_slots():
    """Padded rows of a CUDA-graph batch carry slot -1: nothing of theirs is written."""
    gen = torch.Generator().manual_seed(4)
    k_pages = torch.randn(3, 2, 4, 8, generator=gen)  # [P, Hkv, S, D]
    v_pages = torch.randn(3, 2, 4, 8, generator=gen)
    k, v = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 8, generator=gen)
    slots = torch.tensor([-1, 6, -1])  # page 1, row 2
    expected_k, expected_v = k_pages.clone(), v_pages.clone()
    expected_k[1, :, 2], expected_v[1, :, 2] = k[1], v[1]
    ref_k, ref_v = k_pages.clone(), v_pages.clone()
    store_kv_head_major_ref(ref_k, ref_v, k, v, slots)
    store_kv_head_major(k_pages, v_pages, k, v, slots)
    for got_k, got_v in ((ref_k, ref_v), (k_pages, v_pages)):
        assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)


@pytest.mark.parametrize("programs", [1024, 2])  # 2: each program strides over several items
@pytest.mark.parametrize("page_dtype", [torch.int64, torch.int32])  # int32: a page table's
def test_gather_kernel_matches_reference(page_dtype, programs):
    gen = torch.Generator().manual_seed(4)
    src_k = torch.randn(7, 2, 4, 8, generator=gen)
    src_v = torch.randn(7, 2, 4, 8, generator=gen)
    ref_k, ref_v = torch.zeros(2, 5, 4, 8), torch.zeros(2, 5, 4, 8)
    out_k, out_v = ref_k.clone(), ref_v.clone()
    src = torch.tensor([6, 0, 3, 3, 5], dtype=page_dtype)
    head = torch.tensor([1, 0, 0, 1, 1])
    dst = torch.tensor([4, 4, 0, 2, -1])  # -1: skipped
    gather_pages_ref(src_k, src_v, ref_k, ref_v, src, head, dst)
    gather_pages(src_k, src_v, out_k, out_v, src, head, dst, programs)
    assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)
    assert torch.equal(ref_k[1, 4], src_k[6, 1]) and torch.equal(ref_v[0, 0], src_v[3, 0])
    assert ref_k[1, [0, 1, 3]].eq(0).all() and ref_k[0, [1, 2, 3]].eq(0).all(), "-1 skipped"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spin_retrieve_kernels_match_their_reference(seed):
    """One layer's fused retrieval against `spin_retrieve_ref` on a random buffer: three
    requests owning 5, 9 and 14 slots (-1 padded lists, then a padding row listing nothing),
    all but one slot of each (layer, head) holding a page of random recency, each (request,
    head) selecting up to 5 distinct pages, some resident. The same slots and fetch
    destinations, slot contents, recency, free-segment count and counters, and the same slot
    for every page of every (request, layer, head) (which free segment a directory entry takes
    may differ: the kernel's programs pop the stack in any order)."""
    gen = torch.Generator().manual_seed(seed)
    layers, heads, seg, buckets, num_pages = 2, 2, 4, 8, 24
    owned = [5, 9, 14]
    table = ResidencyTable(layers, heads, sum(owned), seg, buckets, "cpu")
    table.ensure_rows(len(owned))
    table.ensure_pages(num_pages)
    starts = [sum(owned[:r]) for r in range(len(owned))]
    cand = torch.full((len(owned) + 1, 16), -1, dtype=torch.int64)  # the last row: padding
    for r, (start, n) in enumerate(zip(starts, owned, strict=True)):
        table.assign_slots(list(range(start, start + n)), r)
        cand[r, :n] = torch.arange(start, start + n)
        for layer in range(layers):
            for h in range(heads):
                held = torch.randperm(n, generator=gen)[: n - 1] + start
                pages = torch.randperm(num_pages, generator=gen)[: held.numel()]
                table.insert(layer, torch.full_like(held, h), held, pages)
    table.slot_bucket.copy_(torch.randint(0, buckets - 1, table.slot_bucket.shape, generator=gen))
    k = 5  # pages a row selects: at most the fewest slots a request owns
    pages = torch.stack([torch.randperm(num_pages, generator=gen)[:k] for _ in range(8)])
    pages = pages.view(4, heads, k)
    pages[torch.rand(pages.shape, generator=gen) < 0.2] = -1
    pages[-1] = -1
    rows = torch.tensor([0, 1, 2, 0])
    cand_len = torch.tensor([*owned, 0])
    table.reserve(4 * heads * k)
    layer = 1
    every_page = torch.arange(num_pages).expand(len(owned), heads, -1)
    runs = []
    for retrieve in (spin_retrieve_ref, spin_retrieve):
        maps = [t.clone() for t in (table.directory, table.segments, table.seg_count,
                                    table.seg_home, table.free_stack, table.free_top)]  # fmt: skip
        slot_page, slot_bucket = table.slot_page[layer].clone(), table.slot_bucket[layer].clone()
        counters = torch.zeros(4, dtype=torch.int64)
        slots, dst = retrieve(pages, rows, cand, cand_len, layer, *maps, slot_page, slot_bucket,
                              counters, buckets + 2, buckets - 1, 64)  # fmt: skip
        found = lookup_ref(maps[0], maps[1], torch.arange(len(owned)), layer, every_page)
        runs.append([slots, dst, slot_page, slot_bucket, maps[5], counters, found])
    ref, got = runs
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)
    counters = ref[5]
    assert counters[2] > 0 and 0 < counters[1] < counters[0], "the case hits and evicts"
