"""Batched gather of (page, head) runs from the CPU tier into GPU-tier slots.

Each item copies one contiguous S*D run: `dst[head, dst_slot] = src[src_page, head]`, for K
and V in one launch. On CUDA, `src` is a device view of pinned host memory (see
`uva_device_view`): the kernel reads host memory directly over PCIe through unified virtual
addressing, so one launch moves every miss of a layer with no staging buffer and no per-page
copies.

Items whose `dst_slot` is negative are skipped (inside the kernel), so callers pass fixed-shape
lists — e.g. every selected (sequence, head, page) with -1 where nothing is to be fetched — and
the launch needs no host-side count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<i2", torch.int32: "<i4"}


def uva_device_view(host: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor aliasing the pinned host tensor `host` (same bytes, no copy): kernels and
    torch ops on it read and write host memory through unified virtual addressing."""
    if not host.is_pinned():
        raise ValueError("host: must be a pinned CPU tensor")
    if not host.is_contiguous():
        raise ValueError("host: must be contiguous")

    class _CudaArray:  # exposes the pointer through __cuda_array_interface__ (torch reads it)
        __cuda_array_interface__ = {
            "shape": tuple(host.shape),
            "typestr": _TYPESTR[host.dtype],
            "data": (host.data_ptr(), False),
            "version": 3,
        }

    view = torch.as_tensor(_CudaArray(), device="cuda")
    return view.view(host.dtype) if host.dtype == torch.bfloat16 else view


def gather_pages_ref(
    src_k: torch.Tensor,  # [P, Hkv, S, D]  one layer of the CPU tier
    src_v: torch.Tensor,  # [P, Hkv, S, D]
    dst_k: torch.Tensor,  # [Hkv, Q, S, D]  one layer of the GPU tier
    dst_v: torch.Tensor,  # [Hkv, Q, S, D]
    src_page: torch.Tensor,  # [M] int32/int64
    head: torch.Tensor,  # [M] int64
    dst_slot: torch.Tensor,  # [M] int64, < 0 = skip the item
) -> None:
    """dst[head[i], dst_slot[i]] = src[src_page[i], head[i]] for K and V, where dst_slot[i] >= 0."""
    todo = dst_slot >= 0
    src_page, head, dst_slot = src_page[todo], head[todo], dst_slot[todo]
    dst_k[head, dst_slot] = src_k[src_page, head].to(dst_k.device)
    dst_v[head, dst_slot] = src_v[src_page, head].to(dst_v.device)


@triton.jit
def _gather_kernel(
    src_k_ptr,
    src_v_ptr,
    dst_k_ptr,
    dst_v_ptr,
    src_page_ptr,
    head_ptr,
    dst_slot_ptr,
    num_items,
    NUM_HEADS: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
    RUN: tl.constexpr,  # S * D elements of one (page, head)
    BLOCK: tl.constexpr,
):
    # each program strides over the items: most items of a decode step are hits with nothing to
    # fetch, and skipping one costs a load here rather than a whole program launch
    offs = tl.arange(0, BLOCK)
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        dst_slot = tl.load(dst_slot_ptr + item).to(tl.int64)
        if dst_slot >= 0:
            src_page = tl.load(src_page_ptr + item).to(tl.int64)
            head = tl.load(head_ptr + item).to(tl.int64)
            for start in tl.static_range(0, RUN, BLOCK):
                o = start + offs
                mask = o < RUN
                src = (src_page * NUM_HEADS + head) * RUN + o
                dst = (head * NUM_SLOTS + dst_slot) * RUN + o
                tl.store(dst_k_ptr + dst, tl.load(src_k_ptr + src, mask=mask), mask=mask)
                tl.store(dst_v_ptr + dst, tl.load(src_v_ptr + src, mask=mask), mask=mask)


MAX_PROGRAMS = 1024
"""Programs of one gather launch (each strides over items): enough to keep the copy engine of
the link busy with reads in flight, few enough that idle items cost no launches."""


def gather_pages(
    src_k: torch.Tensor,  # [P, Hkv, S, D] device-addressable (UVA view of pinned memory)
    src_v: torch.Tensor,
    dst_k: torch.Tensor,  # [Hkv, Q, S, D] on the GPU
    dst_v: torch.Tensor,
    src_page: torch.Tensor,  # [M] int32/int64
    head: torch.Tensor,  # [M] int64
    dst_slot: torch.Tensor,  # [M] int64, < 0 = skip
    programs: int = MAX_PROGRAMS,
) -> None:
    """Triton version of `gather_pages_ref`: one launch for every (page, head) of K and V, by at
    most `programs` programs (fewer leave SMs to kernels running beside it on other streams)."""
    num_pages, num_heads, page_size, head_dim = src_k.shape
    assert src_v.shape == src_k.shape and dst_k.shape == dst_v.shape
    assert dst_k.shape[0] == num_heads and dst_k.shape[2:] == (page_size, head_dim)
    assert src_k.dtype == dst_k.dtype == src_v.dtype == dst_v.dtype
    for t in (src_k, src_v, dst_k, dst_v):
        assert t.is_contiguous()
    assert src_page.shape == head.shape == dst_slot.shape and src_page.dim() == 1
    assert src_page.dtype in (torch.int32, torch.int64)
    assert head.dtype == dst_slot.dtype == torch.int64
    if src_page.numel() == 0:
        return
    run = page_size * head_dim
    block = min(triton.next_power_of_2(run), 4096)
    items = src_page.numel()
    _gather_kernel[(min(items, programs),)](
        src_k,
        src_v,
        dst_k,
        dst_v,
        src_page,
        head,
        dst_slot,
        items,
        NUM_HEADS=num_heads,
        NUM_SLOTS=dst_k.shape[1],
        RUN=run,
        BLOCK=block,
    )
