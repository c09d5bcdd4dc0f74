"""Which aten operations make the host wait for a CUDA device: their result's size or value is
needed on the host (`nonzero`, `item`, boolean-mask indexing, ...). On the CPU nothing waits,
so CPU runs name these to say what the GPU path would do — `bench/sparse_step_profile.py`'s
sync report, and the test that `graph_safe` algorithms never synchronise. (`Tensor.tolist`
waits too but is no aten operation: callers that care watch for it themselves.)"""

from __future__ import annotations

import torch

SYNC_OPS = frozenset({
    "aten.nonzero",
    "aten.nonzero_numpy",
    "aten.item",
    "aten._local_scalar_dense",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.masked_select",
    "aten.is_nonzero",
})  # fmt: skip
"""Operations that always wait."""


def waits_for_device(name: str, args: tuple) -> bool:
    """Whether the aten operation `name` ("aten.nonzero") with these arguments makes the host
    wait: one of `SYNC_OPS`, indexing by a boolean mask, or `repeat_interleave` by a tensor of
    counts (its output size)."""
    if name in SYNC_OPS:
        return True
    if name in ("aten.index", "aten.index_put", "aten.index_put_"):
        indices = args[1] if len(args) > 1 else ()
        return any(t is not None and t.dtype == torch.bool for t in indices)
    return (
        name == "aten.repeat_interleave"
        and isinstance(args[0], torch.Tensor)
        and args[0].dtype in (torch.int64, torch.int32)
        and len(args) == 1
    )
