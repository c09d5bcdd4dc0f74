"""The two tiers of page storage.

CPU tier: K and V of every offloaded layer for every engine page, head-major
([L, P, Hkv, S, D]: one (page, head) is a contiguous S×D run), in page-locked host memory of
exactly its size on CUDA machines (`pinned_empty`) and plain memory on the CPU. New KV is
written there straight from the GPU by a store kernel through unified virtual addressing, on a
side stream, so offload overlaps compute; `sync` makes the compute stream wait before the tier
is read.

GPU tier: working-set slots, [L, Hkv, Q + 1, S, D]: slot q of (layer, head) holds one page of
one request; the last slot is scratch. On the CPU it is a bounded pool on the same device, so
the same logic runs.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from spin_ray.kernels.slot_token_store import store_decode_tokens, store_decode_tokens_ref
from spin_ray.kernels.sparse_kv_store import store_kv_head_major, store_kv_head_major_ref
from spin_ray.kernels.uva_gather import (
    MAX_PROGRAMS,
    gather_pages,
    gather_pages_ref,
    uva_device_view,
)


@dataclass(frozen=True)
class PendingRead:
    """K/V pages being read on the host tier's side stream (`HostTier.read_ahead`)."""

    k: torch.Tensor  # [Hkv, n, S, D]
    v: torch.Tensor
    done: torch.cuda.Event | None  # None: already read (CPU)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pages, once the current stream has waited for the read."""
        if self.done is not None:
            stream = torch.cuda.current_stream(self.k.device)
            stream.wait_event(self.done)
            self.k.record_stream(stream)  # used here: not reused before this stream is done
            self.v.record_stream(stream)
        return self.k, self.v


class HostTier:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        num_heads: int,
        page_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.device = device
        self.on_cuda = device.type == "cuda"
        shape = (num_layers, num_pages, num_heads, page_size, head_dim)
        # never zeroed (pinning tens of GB is slow enough): every read is masked to tokens written
        empty = pinned_empty if self.on_cuda else torch.empty
        self.k = empty(shape, dtype=dtype)
        self.v = empty(shape, dtype=dtype)
        # what kernels address: UVA views of the pinned tensors on CUDA, the tensors on the CPU
        self.k_dev = uva_device_view(self.k) if self.on_cuda else self.k
        self.v_dev = uva_device_view(self.v) if self.on_cuda else self.v
        self.side_stream = torch.cuda.Stream(device) if self.on_cuda else None
        self.overlap_programs = (
            torch.cuda.get_device_properties(device).multi_processor_count // 2
            if self.on_cuda
            else MAX_PROGRAMS
        )
        """Programs of a gather that runs beside compute on another stream (`read_ahead`, the
        lookahead's fetch): one per second SM. Waiting on PCIe, a full-width gather (1024
        programs) occupies every SM and the compute queues behind it; on the H200 66 programs
        moved 51.2 GB/s against 51.3 with 1024 (bench/RESULTS.md)."""
        self.page_bytes = 2 * page_size * head_dim * self.k.element_size()
        """Bytes of K + V of one (page, head)."""

    def store(
        self,
        layer: int,
        k: torch.Tensor,  # [N, Hkv, D]
        v: torch.Tensor,  # [N, Hkv, D]
        slot_mapping: torch.Tensor,  # [N] int64  engine page * S + offset
    ) -> None:
        """Write new tokens' K/V (on CUDA asynchronously, on a side stream, except inside a
        CUDA graph capture, where the few decode tokens go on the captured stream)."""
        if not self.on_cuda:
            store_kv_head_major_ref(self.k[layer], self.v[layer], k, v, slot_mapping)
            return
        if torch.cuda.is_current_stream_capturing():  # a CUDA graph: keep it on one stream
            store_kv_head_major(self.k_dev[layer], self.v_dev[layer], k, v, slot_mapping)
            return
        compute = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(compute)
        with torch.cuda.stream(self.side_stream):
            store_kv_head_major(self.k_dev[layer], self.v_dev[layer], k, v, slot_mapping)
        for t in (k, v, slot_mapping):
            t.record_stream(self.side_stream)

    def sync(self) -> None:
        """Order later reads of the tier after every pending store."""
        if self.on_cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.side_stream)

    def read(
        self, layer: int, pages: torch.Tensor, programs: int = MAX_PROGRAMS
    ) -> tuple[torch.Tensor, torch.Tensor]:  # 2 × [Hkv, n, S, D] on the compute device
        """K/V of whole pages (`pages` [n] int64 engine page ids), every head (`programs`:
        `fetch`'s)."""
        _, _, heads, s, d = self.k.shape
        n = pages.numel()
        k = torch.empty((heads, n, s, d), dtype=self.k.dtype, device=self.device)
        v = torch.empty_like(k)
        head = torch.arange(heads, device=self.device).repeat_interleave(n)
        src = pages.to(self.device).long().repeat(heads)
        dst = torch.arange(n, device=self.device).repeat(heads)
        self.fetch(layer, k, v, src, head, dst, programs)
        return k, v

    def read_ahead(self, layer: int, pages: torch.Tensor) -> PendingRead:
        """`read` started on the side stream (after the compute stream's work so far, before
        later stores), so a PCIe read overlaps compute; on the CPU it reads now."""
        if not self.on_cuda:
            return PendingRead(*self.read(layer, pages), None)
        compute = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(compute)
        with torch.cuda.stream(self.side_stream):
            k, v = self.read(layer, pages, self.overlap_programs)
            done = torch.cuda.Event()
            done.record()
        pages.record_stream(self.side_stream)
        return PendingRead(k, v, done)

    def fetch(
        self,
        layer: int,
        dst_k: torch.Tensor,  # [Hkv, Q, S, D]
        dst_v: torch.Tensor,
        src_pages: torch.Tensor,  # [M] int32/int64 engine page ids
        heads: torch.Tensor,  # [M] int64
        dst_slots: torch.Tensor,  # [M] int64
        programs: int = MAX_PROGRAMS,
    ) -> None:
        """One batched gather of (page, head) runs into GPU-tier slots (on CUDA by at most
        `programs` Triton programs: fewer leave SMs to concurrent work)."""
        args = (self.k_dev[layer], self.v_dev[layer], dst_k, dst_v, src_pages, heads, dst_slots)
        if self.on_cuda:
            gather_pages(*args, programs)
        else:
            gather_pages_ref(*args)

    def write_pages(
        self,
        layer: int,
        pages: torch.Tensor,  # [n] int64
        k: torch.Tensor,  # [Hkv, n, S, D]
        v: torch.Tensor,
    ) -> None:
        """Overwrite whole pages (used when an index lays partitions out anew)."""
        dst_k, dst_v = (self.k_dev, self.v_dev) if self.on_cuda else (self.k, self.v)
        idx = pages.to(dst_k.device).long()
        dst_k[layer, idx] = k.transpose(0, 1).to(dst_k.device)
        dst_v[layer, idx] = v.transpose(0, 1).to(dst_v.device)


_HOST_REGISTER_PORTABLE_MAPPED = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised host tensor in page-locked memory of exactly its size, which kernels
    reach through unified virtual addressing (`uva_device_view`).

    `torch.empty(..., pin_memory=True)` rounds every allocation up to a power of two (ATen's
    CachingHostAllocator, to reuse blocks), so a 30 GiB K or V tier took 32 GiB and a 33.75
    GiB one asked for 64 GiB: on the 128 GB H200 machine a 72.5 GB tier could not be pinned.
    Plain memory registered with CUDA instead (portable, mapped: on a UVA system its device
    address is its host address) pins what is used; it is unregistered when the tensor is
    freed. Raises RuntimeError ("out of memory") when the registration fails."""
    host = torch.empty(shape, dtype=dtype)
    nbytes = host.numel() * host.element_size()
    cudart = torch.cuda.cudart()
    error = int(cudart.cudaHostRegister(host.data_ptr(), nbytes, _HOST_REGISTER_PORTABLE_MAPPED))
    if error:
        raise RuntimeError(
            f"pinning {nbytes / 2**30:.1f} GiB of host memory failed (cudaHostRegister: "
            f"cudaError {error}): out of memory"
        )
    weakref.finalize(host, cudart.cudaHostUnregister, host.data_ptr())
    return host


class DeviceTier:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_heads: int,
        page_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_layers, num_heads, num_slots + 1, page_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, Hkv, Q + 1, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.scratch_slot = num_slots
        """A slot no request owns: padding rows of a CUDA-graph batch store their token here."""

    def store_tokens(
        self,
        layer: int,
        pages: torch.Tensor,  # [B, Hkv, K] int64  pages listed this step, -1 = unused
        slots: torch.Tensor,  # [B, Hkv, K] int64  their slots
        last_page: torch.Tensor,  # [B] int64  page of each sequence's new token
        last_offset: torch.Tensor,  # [B] int64  its row in that page
        k: torch.Tensor,  # [B, Hkv, D]
        v: torch.Tensor,
    ) -> None:
        """Write each decode token's K/V into the slot of its (resident, listed) last page;
        rows that list no such page (CUDA-graph padding) write into the scratch slot."""
        store = store_decode_tokens if self.k.is_cuda else store_decode_tokens_ref
        store(
            self.k[layer], self.v[layer], pages, slots, last_page, last_offset,
            self.scratch_slot, k, v,
        )  # fmt: skip
