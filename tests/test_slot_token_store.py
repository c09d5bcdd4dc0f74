"""The decode-token store kernel against its torch reference (Triton's interpreter on the CPU),
and the reference against the rows written out by hand."""

from __future__ import annotations

import pytest
import torch

from spin_ray.kernels.slot_token_store import store_decode_tokens, store_decode_tokens_ref


def _case(dtype):
    gen = torch.Generator().manual_seed(7)
    heads, num_slots, page_size, head_dim = 2, 6, 4, 8
    k_slots = torch.randn(heads, num_slots, page_size, head_dim, generator=gen).to(dtype)
    v_slots = torch.randn(heads, num_slots, page_size, head_dim, generator=gen).to(dtype)
    # three rows: sequence 0's last page 5 sits at entry 2 (head 0) / 0 (head 1); sequence 1's
    # last page 3 at entry 1 in both heads; row 2 is padding (last page -2, listed nowhere)
    pages = torch.tensor(
        [[[0, 1, 5], [5, 0, -1]], [[0, 3, -1], [2, 3, 1]], [[-1, -1, -1], [-1, -1, -1]]]
    )
    slots = torch.tensor([[[0, 1, 2], [3, 4, -1]], [[4, 0, -1], [1, 2, 5]], [[-1] * 3] * 2])
    last_page = torch.tensor([5, 3, -2])
    last_offset = torch.tensor([1, 3, 0])
    k = torch.randn(3, heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(3, heads, head_dim, generator=gen).to(dtype)
    return k_slots, v_slots, pages, slots, last_page, last_offset, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_decode_tokens_matches_reference_and_spec(dtype):
    k_slots, v_slots, pages, slots, last_page, last_offset, k, v = _case(dtype)
    scratch = 5
    expected_k, expected_v = k_slots.clone(), v_slots.clone()
    for b, h, slot in [(0, 0, 2), (0, 1, 3), (1, 0, 0), (1, 1, 2), (2, 0, 5), (2, 1, 5)]:
        expected_k[h, slot, last_offset[b]] = k[b, h]
        expected_v[h, slot, last_offset[b]] = v[b, h]
    ref_k, ref_v = k_slots.clone(), v_slots.clone()
    store_decode_tokens_ref(ref_k, ref_v, pages, slots, last_page, last_offset, scratch, k, v)
    assert torch.equal(ref_k, expected_k) and torch.equal(ref_v, expected_v)
    store_decode_tokens(k_slots, v_slots, pages, slots, last_page, last_offset, scratch, k, v)
    assert torch.equal(k_slots, expected_k) and torch.equal(v_slots, expected_v)


def test_store_decode_tokens_reads_strided_tokens():
    """K/V rows sliced out of a wider projection (non-contiguous across heads) are read right."""
    k_slots, v_slots, pages, slots, last_page, last_offset, k, v = _case(torch.float32)
    wide_k = torch.cat([k, torch.zeros_like(k)], dim=-1)[..., : k.shape[-1]]  # strided view
    ref_k, ref_v = k_slots.clone(), v_slots.clone()
    store_decode_tokens_ref(ref_k, ref_v, pages, slots, last_page, last_offset, 5, k, v)
    store_decode_tokens(k_slots, v_slots, pages, slots, last_page, last_offset, 5, wide_k, v)
    assert torch.equal(k_slots, ref_k) and torch.equal(v_slots, ref_v)
