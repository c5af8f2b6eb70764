"""The resumable sampler and the loader (``pipelines.cases.loader``): resuming mid-epoch continues with the next
batch, through the DataLoader too, and ranks share the epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cases.dataset import CaseDataset
from pipelines.cases.loader import ResumableSampler, build_loader


def test_sampler_resume_continues_with_the_next_batch() -> None:
    full = ResumableSampler(23, batch_size=3, seed=7)
    runs = []
    for epoch in range(3):
        full.set_epoch(epoch)
        runs += list(full)
        full.advance(full.num_samples)
    seq = [runs[i:i + 3] for i in range(0, len(runs), 3)]
    assert len(seq) == 3 * 7 and all(len(b) == 3 for b in seq)

    s = ResumableSampler(23, batch_size=3, seed=7)
    got: list[list[int]] = []
    s.set_epoch(0)
    it = iter(s)
    for _ in range(10):  # stop in epoch 1, after 10 batches
        if s.position >= s.num_samples:
            s.set_epoch(s.epoch + 1)
            it = iter(s)
        got.append([next(it) for _ in range(3)])
        s.advance(3)
    state = json.loads(json.dumps(s.state_dict()))
    r = ResumableSampler(23, batch_size=3, seed=7)
    r.load_state_dict(state)
    assert (r.epoch, r.position) == (1, 9)
    r.set_epoch(1)  # the trainer's loop calls it again: same epoch keeps the position
    for epoch in (1, 2):
        r.set_epoch(epoch)
        rest = list(r)
        got += [rest[i:i + 3] for i in range(0, len(rest), 3)]
        r.advance(len(rest))
    assert got == seq
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(23, batch_size=3, seed=8).load_state_dict(state)


def test_loader_resume_through_the_dataloader(prep: Path, tok) -> None:
    kw = dict(crop_size_zyx=(6, 12, 12), mode="crop", train=True, seed=1)
    ds = CaseDataset(prep, tok, **kw)

    def ids(batches):
        return [b["index"].tolist() + b["image"].flatten()[:5].tolist() for b in batches]

    s = ResumableSampler(len(ds), batch_size=1, seed=2)
    loader = build_loader(ds, s, batch_size=1, workers=0)
    whole = []
    for epoch in range(2):
        s.set_epoch(epoch)
        whole += list(loader)
    s2 = ResumableSampler(len(ds), batch_size=1, seed=2)
    l2 = build_loader(ds, s2, batch_size=1, workers=0)
    first = []
    for batch in l2:  # stop after 3 of 4 batches of epoch 0
        first.append(batch)
        if len(first) == 3:
            break
    state = s2.state_dict()
    assert (state["epoch"], state["position"]) == (0, 3)
    s3 = ResumableSampler(len(ds), batch_size=1, seed=2)
    s3.load_state_dict(state)
    l3 = build_loader(CaseDataset(prep, tok, **kw), s3, batch_size=1, workers=0)
    rest = []
    for epoch in range(2):
        s3.set_epoch(epoch)
        rest += list(l3)
    assert ids(first + rest) == ids(whole)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_get_disjoint_shares_that_cover_the_epoch(drop_last: bool) -> None:
    n, ws, bs = 29, 3, 4
    shares = [ResumableSampler(n, batch_size=bs, seed=5, rank=r, world_size=ws, drop_last=drop_last) for r in range(ws)]
    for epoch in (0, 1):
        got = [s.epoch_indices(epoch) for s in shares]
        assert len({len(g) for g in got}) == 1
        flat = [i for g in got for i in g]
        if drop_last:
            assert len(flat) == len(set(flat)) == (n // (ws * bs)) * ws * bs
        else:
            assert set(flat) == set(range(n)) and len(flat) == ws * -(-n // ws)
    assert shares[0].epoch_indices(0) != shares[0].epoch_indices(1)
    # a position saved on 3 ranks resumes on 1 rank at the same global sample
    s = shares[0]
    s.advance(4)
    one = ResumableSampler(n, batch_size=bs, seed=5, drop_last=drop_last)
    one.load_state_dict(s.state_dict())
    assert one.position == 12
