"""Store each decode token's K/V into the GPU-tier slot that holds its sequence's last page.

A decode sequence b lists, per KV head h, the pages it attends this step (`pages[b, h, :]`)
and the slots holding them (`slots[b, h, :]`); its new token belongs to page `last_page[b]`,
row `last_offset[b]`, which is always listed (it is in the local window). One launch finds the
slot and writes the row for every (sequence, head), instead of a compare, a reduction and two
indexed writes in torch. Rows that list no such page (the padding rows of a CUDA-graph batch)
write into `fallback_slot`, a scratch slot no request owns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def store_decode_tokens_ref(
    k_slots: torch.Tensor,  # [Hkv, Q, S, D]  one layer of the GPU tier
    v_slots: torch.Tensor,  # [Hkv, Q, S, D]
    pages: torch.Tensor,  # [B, Hkv, K] int64  listed logical pages, -1 = unused
    slots: torch.Tensor,  # [B, Hkv, K] int64  their slots
    last_page: torch.Tensor,  # [B] int64  page of each sequence's new token
    last_offset: torch.Tensor,  # [B] int64  its row in that page
    fallback_slot: int,
    k: torch.Tensor,  # [B, Hkv, D]
    v: torch.Tensor,  # [B, Hkv, D]
) -> None:
    """k_slots[h, slot, last_offset[b]] = k[b, h] where slot holds page last_page[b] in row
    (b, h)'s list, or `fallback_slot` if the list does not hold it; the same for V."""
    listed = torch.where(pages == last_page[:, None, None], slots, -1).amax(-1)  # [B, Hkv]
    slot = torch.where(listed >= 0, listed, fallback_slot)
    heads = torch.arange(slot.shape[1], device=slot.device)[None, :]  # [1, Hkv]
    k_slots[heads, slot, last_offset[:, None]] = k.to(k_slots.dtype)
    v_slots[heads, slot, last_offset[:, None]] = v.to(v_slots.dtype)


@triton.jit
def _store_decode_tokens_kernel(
    k_slots_ptr,
    v_slots_ptr,
    pages_ptr,
    slots_ptr,
    last_page_ptr,
    last_offset_ptr,
    k_ptr,
    v_ptr,
    fallback_slot,
    num_entries,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    NUM_HEADS: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.arange(0, BLOCK_K)
    row = (b * NUM_HEADS + h) * num_entries + j
    in_row = j < num_entries
    page = tl.load(pages_ptr + row, mask=in_row, other=-1)
    slot = tl.load(slots_ptr + row, mask=in_row, other=-1)
    last = tl.load(last_page_ptr + b)
    listed = tl.max(tl.where(page == last, slot, -1), axis=0)
    target = tl.where(listed >= 0, listed, fallback_slot).to(tl.int64)
    offset = tl.load(last_offset_ptr + b).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = d < HEAD_DIM
    dst = ((h * NUM_SLOTS + target) * PAGE_SIZE + offset) * HEAD_DIM + d
    k_row = tl.load(k_ptr + b * stride_kb + h * stride_kh + d, mask=mask)
    v_row = tl.load(v_ptr + b * stride_vb + h * stride_vh + d, mask=mask)
    tl.store(k_slots_ptr + dst, k_row.to(k_slots_ptr.dtype.element_ty), mask=mask)
    tl.store(v_slots_ptr + dst, v_row.to(v_slots_ptr.dtype.element_ty), mask=mask)


def store_decode_tokens(
    k_slots: torch.Tensor,  # [Hkv, Q, S, D] contiguous
    v_slots: torch.Tensor,
    pages: torch.Tensor,  # [B, Hkv, K] int64 contiguous
    slots: torch.Tensor,  # [B, Hkv, K] int64 contiguous
    last_page: torch.Tensor,  # [B] int64
    last_offset: torch.Tensor,  # [B] int64
    fallback_slot: int,
    k: torch.Tensor,  # [B, Hkv, D], last dim contiguous
    v: torch.Tensor,
) -> None:
    """Triton version of `store_decode_tokens_ref`: one launch, a program per (b, h)."""
    num_heads, num_slots, page_size, head_dim = k_slots.shape
    b, h, num_entries = pages.shape
    assert k_slots.is_contiguous() and v_slots.is_contiguous() and v_slots.shape == k_slots.shape
    assert h == num_heads and slots.shape == pages.shape
    assert pages.is_contiguous() and slots.is_contiguous()
    assert pages.dtype == slots.dtype == last_page.dtype == last_offset.dtype == torch.int64
    assert last_page.shape == last_offset.shape == (b,)
    assert k.shape == v.shape == (b, h, head_dim) and k.stride(-1) == 1 and v.stride(-1) == 1
    assert 0 <= fallback_slot < num_slots
    if b == 0:
        return
    _store_decode_tokens_kernel[(b, h)](
        k_slots,
        v_slots,
        pages,
        slots,
        last_page,
        last_offset,
        k,
        v,
        fallback_slot,
        num_entries,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        NUM_HEADS=num_heads,
        NUM_SLOTS=num_slots,
        PAGE_SIZE=page_size,
        HEAD_DIM=head_dim,
        BLOCK_K=triton.next_power_of_2(max(num_entries, 1)),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
