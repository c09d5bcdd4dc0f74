"""The partition top-k kernel against its torch.topk reference, on the CPU with Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1): the same chosen set up to ties."""

from __future__ import annotations

import pytest
import torch

from spin_ray.kernels.partition_topk import MAX_PARTITIONS, partition_topk, partition_topk_ref


def _scores(gen, b, h, p, holes=0.3, levels=None):
    """Random scores [B, H, P] with about `holes` of them -inf; with `levels`, every score is
    one of that many values (many ties)."""
    if levels is None:
        x = torch.randn(b, h, p, generator=gen)
    else:
        x = torch.randint(0, levels, (b, h, p), generator=gen).float() - levels / 2
    return x.masked_fill(torch.rand(b, h, p, generator=gen) < holes, float("-inf"))


def _assert_same_choice(scores, k, num_out, out, ref):
    """Each row lists min(k, finite scores) distinct valid indices, then -1s, and the multiset
    of their scores is the reference's (so any choice among equal scores passes)."""
    b, h, p = scores.shape
    assert out.shape == ref.shape == (b, h, num_out) and out.dtype == torch.int64
    for i in range(b):
        for j in range(h):
            row = scores[i, j]
            want = min(int(k[i, j]), num_out, int((row > -torch.inf).sum()))
            chosen = out[i, j][out[i, j] >= 0]
            assert len(chosen) == want and (out[i, j, want:] == -1).all()
            assert len(set(chosen.tolist())) == want and (chosen < p).all()
            assert (row[chosen] > -torch.inf).all()
            expected = ref[i, j][ref[i, j] >= 0]
            assert len(expected) == want
            assert row[chosen].sort().values.tolist() == row[expected].sort().values.tolist()


@pytest.mark.parametrize(
    "b,h,p,num_out,levels",
    [
        (2, 3, 37, 8, None),  # P not a power of two
        (3, 2, 100, 1, None),  # k = 1
        (1, 4, 64, 16, 3),  # heavy ties
        (2, 2, 300, 40, 7),  # ties across the k-th value, K > BLOCK of 16
        (1, 1, 5, 5, None),  # K = P
    ],
)
def test_partition_topk_kernel_matches_reference(b, h, p, num_out, levels):
    gen = torch.Generator().manual_seed(b * 1000 + p)
    scores = _scores(gen, b, h, p, levels=levels)
    scores[0, 0, : p // 2] = float("-inf")  # a row with few or no valid partitions
    if h > 1:
        scores[0, 1] = float("-inf")  # a row with none
    k = torch.randint(0, num_out + 1, (b, h), generator=gen)
    k[-1, -1] = num_out
    ref = partition_topk_ref(scores, k, num_out)
    out = partition_topk(scores, k, num_out)
    _assert_same_choice(scores, k, num_out, out, ref)


def test_partition_topk_per_request_k_strided_scores_and_extreme_values():
    """k given per request (an expanded [B]); scores a strided view; ±0, tiny, huge and +inf
    scores order like floats."""
    gen = torch.Generator().manual_seed(7)
    base = _scores(gen, 3, 2, 50, holes=0.2)
    base[1, 0, :6] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3e38, float("inf")])
    base[2, 1, :10] = -3e38
    scores = base.transpose(0, 1).contiguous().transpose(0, 1)  # strides (50, 150, 1)
    k = torch.tensor([3, 6, 12]).expand(2, 3).T  # [B, H] with stride 0 over heads
    ref = partition_topk_ref(scores, k, 12)
    out = partition_topk(scores, k, 12)
    _assert_same_choice(scores, k, 12, out, ref)


@pytest.mark.parametrize("poison", [-7, 123456])
def test_partition_topk_writes_every_output_slot(monkeypatch, poison):
    """The output buffer is allocated poisoned; every slot comes back an index or -1."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(poison))
    gen = torch.Generator().manual_seed(3)
    scores = _scores(gen, 2, 2, 33)
    k = torch.tensor([[5, 0], [33, 2]])
    out = partition_topk(scores, k, 40)
    monkeypatch.undo()
    assert ((out >= -1) & (out < 33)).all()
    _assert_same_choice(scores, k, 40, out, partition_topk_ref(scores, k, 40))


def test_partition_topk_falls_back_above_the_row_limit(monkeypatch):
    import spin_ray.kernels.partition_topk as module

    def no_kernel(*args, **kwargs):
        raise AssertionError("a row this long must not reach the kernel")

    monkeypatch.setattr(module, "_partition_topk_kernel", no_kernel)
    gen = torch.Generator().manual_seed(4)
    scores = _scores(gen, 1, 1, MAX_PARTITIONS + 3)  # distinct finite values (normal draws)
    out = partition_topk(scores, torch.tensor([[20]]), 20)
    best = scores[0, 0].sort(descending=True).indices[:20]  # the 20 highest, written out
    assert set(out[0, 0].tolist()) == set(best.tolist())


def test_select_pages_with_the_kernel_chooses_what_the_reference_chooses(monkeypatch):
    """select_pages (sink + top-k + local) picks the same pages up to ties whether the kernel
    (used on CUDA) or the reference does the top-k."""
    from spin_ray.sparse import selection
    from spin_ray.sparse.budget import PageBudget

    budget = PageBudget(
        page_size=4,
        token_budget=48,
        sink_tokens=5,
        local_tokens=9,
        max_unindexed_tokens=6,
        attend_all=False,
        retains=True,
        buffer_ratio=1.0,
        min_buffer_ratio=1.0,
    )
    contexts, indexed = [30, 97, 61], [6, 23, 14]
    windows = selection.DecodeWindows.build(budget, contexts, indexed, torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 4, (3, 2, 25), generator=gen).float()  # ties
    ref = selection.select_pages(scores, windows)
    monkeypatch.setattr(selection, "partition_topk_ref", partition_topk)
    out = selection.select_pages(scores, windows)
    assert windows.topk.tolist() == [3, 7, 7]  # all of row 0; a real choice in rows 1, 2
    for b in range(3):
        for h in range(2):
            start = int(windows.local_start[b])  # the sink is pages 0 and 1
            got, want = set(out[b, h].tolist()) - {-1}, set(ref[b, h].tolist()) - {-1}
            assert len(got) == len(want) == int((out[b, h] >= 0).sum())
            middle_got = {p for p in got if 2 <= p < start}
            middle_want = {p for p in want if 2 <= p < start}
            assert got - middle_got == want - middle_want  # sink and local tail
            assert sorted(scores[b, h, p].item() for p in middle_got) == sorted(
                scores[b, h, p].item() for p in middle_want
            )


def test_partition_topk_rows_end_at_their_lengths():
    """With per-row lengths, a row's partitions at or past its length are never chosen (their
    scores here are finite and large) and the rest are chosen as torch.topk over the row's
    own length chooses: rows of 100, 400 and 1000 of 1000 run in the 128-, 512- and 1024-wide
    blocks the kernel picks at run time."""
    gen = torch.Generator().manual_seed(11)
    scores = _scores(gen, 3, 2, 1000, holes=0.1)
    lengths = torch.tensor([100, 400, 1000])
    for b, n in enumerate(lengths.tolist()):
        scores[b, :, n:] = 1e6  # would win if read
    k = torch.tensor([[30, 100], [64, 5], [64, 0]])
    out = partition_topk(scores, k, 64, lengths)
    for b, n in enumerate(lengths.tolist()):
        own = scores[b : b + 1, :, :n]
        _assert_same_choice(
            own, k[b : b + 1], 64, out[b : b + 1], partition_topk_ref(own, k[b : b + 1], 64)
        )
    ref = partition_topk_ref(scores, k, 64, lengths)  # the reference masks the same way
    _assert_same_choice(scores.masked_fill(scores == 1e6, float("-inf")), k, 64, out, ref)


def test_partition_topk_rows_begin_at_their_starts():
    """With per-row starts (and lengths) a row selects in [start, length): the partitions
    before its start score highest here and are never chosen; the rest are chosen as
    torch.topk over that range chooses."""
    gen = torch.Generator().manual_seed(12)
    scores = _scores(gen, 3, 2, 300, holes=0.1)
    starts, lengths = torch.tensor([0, 5, 40]), torch.tensor([300, 120, 200])
    for b, (a, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        scores[b, :, :a] = 1e6  # would win if read
        scores[b, :, n:] = 1e6
    k = torch.tensor([[20, 3], [50, 10], [64, 1]])
    out = partition_topk(scores, k, 64, lengths, starts)
    for b, (a, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        assert ((out[b] == -1) | ((out[b] >= a) & (out[b] < n))).all()
        own = scores[b : b + 1, :, a:n]
        want = partition_topk_ref(own, k[b : b + 1], 64)
        got = torch.where(out[b : b + 1] >= 0, out[b : b + 1] - a, -1)  # indices within range
        _assert_same_choice(own, k[b : b + 1], 64, got, want)
