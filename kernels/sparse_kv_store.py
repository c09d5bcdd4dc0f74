"""Store new tokens' K/V into head-major pages ([P, Hkv, S, D]: each (page, head) is one
contiguous run of S*D elements), the layout of spin-ray's CPU tier.

On CUDA the destination may be a device view of pinned host memory (`uva_device_view`), so
the kernel writes straight across PCIe with no staging copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def store_kv_head_major_ref(
    k_pages: torch.Tensor,  # [P, Hkv, S, D]
    v_pages: torch.Tensor,  # [P, Hkv, S, D]
    k: torch.Tensor,  # [N, Hkv, D]
    v: torch.Tensor,  # [N, Hkv, D]
    slot_mapping: torch.Tensor,  # [N] int64  page_id * S + offset; < 0: skip (padding)
) -> None:
    """Write token i's K/V for every head into page slot_mapping[i] // S, row % S; tokens with
    a negative slot are skipped."""
    keep = slot_mapping >= 0
    slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    page_size = k_pages.shape[2]
    page = slot_mapping // page_size
    offset = slot_mapping % page_size
    k_pages[page, :, offset] = k.to(k_pages.dtype)  # advanced indices → [N, Hkv, D]
    v_pages[page, :, offset] = v.to(v_pages.dtype)


@triton.jit
def _store_kernel(
    k_pages_ptr,
    v_pages_ptr,
    k_ptr,
    v_ptr,
    slot_ptr,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    NUM_HEADS: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    d = tl.arange(0, BLOCK_D)
    mask = d < tl.where(slot >= 0, HEAD_DIM, 0)  # a negative slot writes nothing
    dst = ((page * NUM_HEADS + head) * PAGE_SIZE + offset) * HEAD_DIM + d
    k_row = tl.load(k_ptr + token * stride_kn + head * stride_kh + d, mask=mask)
    v_row = tl.load(v_ptr + token * stride_vn + head * stride_vh + d, mask=mask)
    tl.store(k_pages_ptr + dst, k_row.to(k_pages_ptr.dtype.element_ty), mask=mask)
    tl.store(v_pages_ptr + dst, v_row.to(v_pages_ptr.dtype.element_ty), mask=mask)


def store_kv_head_major(
    k_pages: torch.Tensor,  # [P, Hkv, S, D] contiguous (may be a UVA view of pinned memory)
    v_pages: torch.Tensor,  # [P, Hkv, S, D] contiguous
    k: torch.Tensor,  # [N, Hkv, D]  last dim contiguous
    v: torch.Tensor,  # [N, Hkv, D]
    slot_mapping: torch.Tensor,  # [N] int64; < 0: skip
) -> None:
    """Triton version of `store_kv_head_major_ref`."""
    num_pages, num_heads, page_size, head_dim = k_pages.shape
    assert v_pages.shape == k_pages.shape and v_pages.dtype == k_pages.dtype
    assert k_pages.is_contiguous() and v_pages.is_contiguous()
    assert k.shape == v.shape and k.dim() == 3 and k.shape[1:] == (num_heads, head_dim)
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    assert slot_mapping.shape == (k.shape[0],) and slot_mapping.dtype == torch.int64
    if k.shape[0] == 0:
        return
    _store_kernel[(k.shape[0], num_heads)](
        k_pages,
        v_pages,
        k,
        v,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        NUM_HEADS=num_heads,
        PAGE_SIZE=page_size,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
