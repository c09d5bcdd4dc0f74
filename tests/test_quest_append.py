"""Quest's summary-update kernel against its torch reference (the CPU interpreter, conftest.py
sets TRITON_INTERPRET=1): decode batches, prefill chunks that start and end mid-page, mixed
batches, padding anywhere, pages whose rows hold a freed page's stale keys."""

from __future__ import annotations

import pytest
import torch

from spin_ray.kernels.quest_append import quest_append, quest_append_chunk, quest_append_ref

NUM_PAGES, HKV = 24, 2


def _slots(gen, runs, page_size):
    """Slots of a step holding one run of tokens per request: `runs` lists (start, n), the
    request's first new position and token count; each request owns its own random pages."""
    pages = torch.randperm(NUM_PAGES, generator=gen).tolist()
    slots = []
    for start, n in runs:
        owned = [pages.pop() for _ in range((start + n - 1) // page_size + 1)]
        for t in range(start, start + n):
            slots.append(owned[t // page_size] * page_size + t % page_size)
    return torch.tensor(slots, dtype=torch.int64)


def _assert_kernel_matches_reference(slots, page_size, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_PAGES + 1, HKV, head_dim)  # row NUM_PAGES: the reference's spare
    stale = torch.randn(shape, generator=gen) * 3  # rows of earlier sequences, wider than keys
    kmin, kmax = (stale - 2).to(dtype), (stale + 2).to(dtype)
    qkv = torch.randn(slots.numel(), HKV + 3, head_dim, generator=gen).to(dtype)
    k = qkv[:, 3:]  # [N, Hkv, D], strided like the model's K beside its Q
    k[slots < 0] = 1e4  # a padding token's key must reach no page
    ref_min, ref_max = kmin.clone(), kmax.clone()
    quest_append_ref(ref_min, ref_max, slots, k, page_size)
    quest_append(kmin, kmax, slots, k, page_size)
    assert not torch.equal(ref_min[:NUM_PAGES], (stale - 2).to(dtype)), "the step changes nothing"
    torch.testing.assert_close(kmin[:NUM_PAGES], ref_min[:NUM_PAGES], atol=0, rtol=0)
    torch.testing.assert_close(kmax[:NUM_PAGES], ref_max[:NUM_PAGES], atol=0, rtol=0)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_batch_with_padding(dtype):
    """One token per request, at offset 0 (a fresh page) or mid-page, padding first, between
    and after (page 0 right after padding: -1 // 4 is 0 in Triton's integer division)."""
    page, offset = [0, 5, 7, 3, 9, 2, 11], [2, 0, 3, 1, 0, 3, 1]
    slots = [p * 4 + o for p, o in zip(page, offset)]
    slots = torch.tensor([-1, *slots[:3], -1, *slots[3:5], -1, *slots[5:], -1, -1])
    _assert_kernel_matches_reference(slots, 4, 8, dtype, seed=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start, n", [(0, 16), (3, 10), (5, 2), (4, 13), (6, 1)])
def test_prefill_chunk_starting_and_ending_mid_page(dtype, start, n):
    gen = torch.Generator().manual_seed(start * 31 + n)
    slots = torch.cat([_slots(gen, [(start, n)], page_size=4), torch.tensor([-1])])
    _assert_kernel_matches_reference(slots, 4, 8, dtype, seed=n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size, head_dim", [(4, 12), (8, 8), (1, 4)])
def test_mixed_chunks_and_decodes(dtype, page_size, head_dim):
    """Decodes, then chunks of several requests back to back (a page boundary between two
    requests' runs), then the graph's padding; also a head dim that is no power of two."""
    gen = torch.Generator().manual_seed(page_size + head_dim)
    s = page_size
    runs = [(2 * s + 1, 1), (s, 1), (s - 1, 1), (0, 2 * s + 1), (s + 1, 2 * s), (3, s)]
    slots = torch.cat([_slots(gen, runs, s), torch.full((3,), -1)])
    _assert_kernel_matches_reference(slots, s, head_dim, dtype, seed=7)


def test_empty_step_writes_nothing():
    kmin = torch.randn(NUM_PAGES + 1, HKV, 8)
    kmax = kmin + 1
    before = kmin.clone(), kmax.clone()
    quest_append(kmin, kmax, torch.empty(0, dtype=torch.int64), torch.empty(0, HKV, 8), 4)
    assert torch.equal(kmin, before[0]) and torch.equal(kmax, before[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start, n", [(0, 16), (3, 10), (5, 2), (4, 13), (6, 1), (0, 3), (1, 3)])
def test_whole_page_chunk_fold_matches_reference(dtype, start, n):
    """`quest_append_chunk` (a prefill chunk's pages reduced at once) against the reference:
    chunks starting at a page boundary or mid-page, ending mid-page or on a boundary."""
    gen = torch.Generator().manual_seed(start * 17 + n)
    slots = _slots(gen, [(start, n)], page_size=4)
    stale = torch.randn(NUM_PAGES + 1, HKV, 8, generator=gen) * 3
    kmin, kmax = (stale - 2).to(dtype), (stale + 2).to(dtype)
    k = torch.randn(n, HKV + 3, 8, generator=gen).to(dtype)[:, 3:]
    ref_min, ref_max = kmin.clone(), kmax.clone()
    quest_append_ref(ref_min, ref_max, slots, k, 4)
    quest_append_chunk(kmin, kmax, slots, k, 4, start % 4)
    assert not torch.equal(ref_min, (stale - 2).to(dtype)), "the chunk changes nothing"
    torch.testing.assert_close(kmin[:NUM_PAGES], ref_min[:NUM_PAGES], atol=0, rtol=0)
    torch.testing.assert_close(kmax[:NUM_PAGES], ref_max[:NUM_PAGES], atol=0, rtol=0)
