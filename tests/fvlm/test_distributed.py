"""Rank helpers and the gather path: two gloo processes on CPU must reproduce one process.

Two spawned processes each hold half of a global batch (or unequal parts), run every registered objective
through a small shared "model" and backward. Checked against one process holding the whole batch:

- the loss is the same on every rank as in one process;
- rank r's gradient of its local embeddings is ``world_size *`` the matching slice of the single-process
  gradient (the gather's backward all-reduces, see ``fvlm.distributed``);
- after a DDP-style mean of the parameter gradients over ranks, every parameter gradient (encoder weights
  and logit scale) equals the single-process one: distributed training takes the same step.

Some scenarios leave one rank (or every rank) without an abnormal or usable anatomy: the run must finish
(a watchdog fails the test instead of hanging) and still match.

The stand-in model also produces the outputs of the related methods' heads (Gaussian log-variances and
second views, label-sentence embeddings, region tokens and text tokens, task logits), so every objective that
reads the global batch is checked; ``entity_mlm`` and ``guided_reconstruction`` are per-token means on each
rank (no gather; DDP's gradient mean combines them) and are left out (``PER_RANK``).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fvlm import distributed as fd
from fvlm.losses import AnatomyContrastive, create_objective, list_objectives

#: objectives without a gather: per-rank token means (see the module docstring)
PER_RANK = ("entity_mlm", "guided_reconstruction")
GATHERED = [n for n in list_objectives() if n not in PER_RANK]
R, L = 2, 3  # region slots, region text tokens

WORLD = 2
A, D, K = 3, 4, 2
WATCHDOG_S = 120.0

#: scenario -> per-rank batch sizes
SCENARIOS = {
    "mixed": (3, 3),
    "rank1_no_abnormal": (3, 3),
    "rank1_no_usable": (3, 3),
    "global_no_abnormal": (3, 3),
    "global_no_usable": (3, 3),
    "unequal_sizes": (4, 2),
}


def make_scenario(name: str) -> tuple[dict, dict, tuple[int, ...]]:
    """Raw per-sample features (inputs of the stand-in model) and batch fields of the global batch."""
    sizes = SCENARIOS[name]
    b = sum(sizes)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    raw = {
        "img": torch.randn(b, A, D, generator=g, dtype=torch.float64),  # (B, A, D)
        "txt": torch.randn(b, A, D, generator=g, dtype=torch.float64),  # (B, A, D)
        "gimg": torch.randn(b, D, generator=g, dtype=torch.float64),  # (B, D)
        "gtxt": torch.randn(b, D, generator=g, dtype=torch.float64),  # (B, D)
        "mask": torch.rand(b, A, generator=g) < 0.85,  # (B, A)
        "img2": torch.randn(b, A, D, generator=g, dtype=torch.float64),  # (B, A, D) a second view
        "txt2": torch.randn(b, A, D, generator=g, dtype=torch.float64),  # (B, A, D) a second phrasing
        "lab": torch.randn(b, A, D, generator=g, dtype=torch.float64),  # (B, A, D) label sentences
        "rtok": torch.randn(b, A, R, D, generator=g, dtype=torch.float64),  # (B, A, R, D) kept regions
        "rtok_mask": torch.rand(b, A, R, generator=g) < 0.8,  # (B, A, R)
        "rtxt": torch.randn(b, A, L, D, generator=g, dtype=torch.float64),  # (B, A, L, D) text tokens
        "rtxt_mask": torch.rand(b, A, L, generator=g) < 0.8,  # (B, A, L)
    }
    normal = torch.rand(b, A, generator=g) < 0.5  # (B, A)
    labels = (torch.rand(b, A, K, generator=g) < 0.5).to(torch.uint8)  # (B, A, K)
    case_id = torch.arange(100, 100 + b)
    case_id[-1] = case_id[0]  # the same case on both ranks: a cross-rank positive
    r1 = slice(sizes[0], b)  # rank 1's part
    if name == "rank1_no_abnormal":
        normal[r1] = True
        normal[0] = False  # rank 0 has abnormal samples of every anatomy
        raw["mask"][0] = True
    elif name == "rank1_no_usable":
        raw["mask"][r1] = False
    elif name == "global_no_abnormal":
        normal[:] = True
    elif name == "global_no_usable":
        raw["mask"][:] = False
    labels[normal] = 0
    has_report = torch.ones(b, dtype=torch.bool)
    has_report[1] = False  # a label-only case (label_unified trains on it; the report-text terms skip it)
    batch = {
        "has_report": has_report,
        "case_id": case_id,
        "text_id": torch.randint(0, 3, (b, A), generator=g),  # (B, A)
        "normal": normal,
        "anatomy_labels": labels,
    }
    return raw, batch, sizes


class Tower(nn.Module):
    """Stand-in model: shared linear maps + normalisation, so parameter gradients can be compared."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.w = nn.ParameterDict(
            {
                k: nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64))
                for k in ("img", "txt", "gimg", "gtxt", "ivar", "tvar", "lab", "reg", "rtx")
            }
        )
        self.cls = nn.Parameter(torch.randn(D, K, generator=g, dtype=torch.float64))  # task_classifier stand-in
        self.logit_scale = nn.Parameter(torch.tensor(3.0, dtype=torch.float64))
        self.region_logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, raw: dict) -> dict:
        w = self.w
        out = {
            "image_emb": F.normalize(raw["img"] @ w["img"], dim=-1),  # (b, A, D)
            "text_emb": F.normalize(raw["txt"] @ w["txt"], dim=-1),  # (b, A, D)
            "global_image_emb": F.normalize(raw["gimg"] @ w["gimg"], dim=-1),  # (b, D)
            "global_text_emb": F.normalize(raw["gtxt"] @ w["gtxt"], dim=-1),  # (b, D)
            # head outputs: uncertainty, prompt_context (label sentences), region
            "image_logvar": 0.3 * torch.tanh(raw["img"] @ w["ivar"]) - 1.0,  # (b, A, D)
            "text_logvar": 0.3 * torch.tanh(raw["txt"] @ w["tvar"]) - 1.0,  # (b, A, D)
            "image_emb_view2": F.normalize(raw["img2"] @ w["img"], dim=-1),  # (b, A, D)
            "image_logvar_view2": 0.3 * torch.tanh(raw["img2"] @ w["ivar"]) - 1.0,  # (b, A, D)
            "text_emb_view2": F.normalize(raw["txt2"] @ w["txt"], dim=-1),  # (b, A, D)
            "text_logvar_view2": 0.3 * torch.tanh(raw["txt2"] @ w["tvar"]) - 1.0,  # (b, A, D)
            "label_text_emb": F.normalize(raw["lab"] @ w["lab"], dim=-1),  # (b, A, D)
            "region_tokens": F.normalize(raw["rtok"] @ w["reg"], dim=-1) * raw["rtok_mask"].unsqueeze(-1),
            "region_text": F.normalize(raw["rtxt"] @ w["rtx"], dim=-1),  # (b, A, L, D)
            "task_logits": raw["img"] @ self.cls,  # (b, A, K) task_classifier head (supervised ceiling)
        }
        for v in out.values():
            v.retain_grad()
        return {**out, "anatomy_mask": raw["mask"], "anatomy_mask_view2": raw["mask"], "logit_scale": self.logit_scale,
                "region_token_mask": raw["rtok_mask"], "region_text_mask": raw["rtxt_mask"],
                "region_logit_scale": self.region_logit_scale,
                "task_mask": torch.tensor([[True, True]] * (A - 1) + [[True, False]]),  # (A, K): one padding column
                "region_temperature": torch.tensor(0.1, dtype=torch.float64)}


EMB_KEYS = ("image_emb", "text_emb", "global_image_emb", "global_text_emb", "image_logvar", "text_logvar",
            "image_emb_view2", "text_emb_view2", "label_text_emb", "region_tokens", "region_text", "task_logits")


def train_step(name: str, raw: dict, batch: dict) -> dict:
    """Forward + backward of objective ``name``; returns loss, embedding grads and parameter grads."""
    tower = Tower()
    out = tower(raw)
    loss = sum(create_objective(name)(**out, **batch).values())  # every term of the objective
    loss.backward()
    emb = {k: out[k].grad for k in EMB_KEYS}
    params = {n: p.grad for n, p in tower.named_parameters()}
    return {"loss": loss.detach(), "emb": emb, "params": params}


def local_part(tree: dict, start: int, n: int) -> dict:
    return {k: v[start : start + n] for k, v in tree.items()}


# --------------------------------------------------------------------------------------- the workers


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        res: dict = {"helpers": (fd.is_distributed(), fd.rank(), fd.world_size(), fd.is_main_process())}
        fd.barrier()

        # The gather's backward: each rank weights the gathered tensor differently; the local gradient
        # must be the local slice of the SUM of all ranks' weights. Unequal sizes: 2 rows on rank 0, 1 on rank 1.
        n_local = 2 - rank
        x = (torch.arange(n_local * 3, dtype=torch.float64).view(n_local, 3) + 10 * rank).requires_grad_(True)
        gathered = fd.all_gather_with_grad(x)  # (3, 3)
        w = torch.arange(9, dtype=torch.float64).view(3, 3) * (rank + 1)
        (gathered * w).sum().backward()
        res["gather"] = {"gathered": gathered.detach(), "grad": x.grad}
        res["bool_gather"] = fd.all_gather(torch.tensor([True, False][: n_local]))

        for scenario in SCENARIOS:
            raw, batch, sizes = make_scenario(scenario)
            start = sum(sizes[:rank])
            raw_r, batch_r = local_part(raw, start, sizes[rank]), local_part(batch, start, sizes[rank])
            for name in GATHERED:
                step = train_step(name, raw_r, batch_r)
                for g in step["params"].values():  # what DDP / DeepSpeed do: mean over ranks
                    if g is None:  # a parameter this objective does not use (same on every rank)
                        continue
                    dist.all_reduce(g, op=dist.ReduceOp.SUM)
                    g /= world
                res[(scenario, name)] = step
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run the two-process job once (with a watchdog) and return each rank's results."""
    out_dir = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(
        _worker, args=(WORLD, _free_port(), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + WATCHDOG_S
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"two-process run did not finish within {WATCHDOG_S:.0f} s: a rank hangs in a collective")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ------------------------------------------------------------------------------------------ the tests


@pytest.mark.slow
def test_rank_helpers_inside_a_group(ranks) -> None:
    assert [r["helpers"] for r in ranks] == [(True, 0, 2, True), (True, 1, 2, False)]


@pytest.mark.slow
def test_gather_forward_and_backward(ranks) -> None:
    """Forward: rank-ordered concatenation (unequal sizes); backward: local slice of the rank-sum."""
    x0 = torch.arange(6, dtype=torch.float64).view(2, 3)
    x1 = torch.arange(3, dtype=torch.float64).view(1, 3) + 10
    w_sum = torch.arange(9, dtype=torch.float64).view(3, 3) * (1 + 2)
    for r, res in enumerate(ranks):
        assert torch.equal(res["gather"]["gathered"], torch.cat([x0, x1]))
        assert torch.equal(res["gather"]["grad"], w_sum[:2] if r == 0 else w_sum[2:])
        assert torch.equal(res["bool_gather"], torch.tensor([True, False, True]))


def test_every_registered_objective_is_covered() -> None:
    assert set(GATHERED) | set(PER_RANK) == set(list_objectives())
    assert {"uncertainty_contrastive", "label_unified", "region_contrastive"} <= set(GATHERED)


@pytest.mark.slow
@pytest.mark.parametrize("name", GATHERED)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_match_one_process(ranks, scenario: str, name: str) -> None:
    raw, batch, sizes = make_scenario(scenario)
    single = train_step(name, raw, batch)
    for r, res in enumerate(ranks):
        got = res[(scenario, name)]
        # the loss: every rank computes the global loss
        assert torch.allclose(got["loss"], single["loss"], atol=1e-12), (r, got["loss"], single["loss"])
        # local embeddings: world_size x the single-process slice
        start = sum(sizes[:r])
        for k, g in got["emb"].items():
            want = single["emb"][k]
            if want is None:  # this objective does not use that embedding
                assert g is None, k
                continue
            assert torch.allclose(g, WORLD * want[start : start + sizes[r]], atol=1e-12), (r, k)
        # parameters after the DDP mean: exactly the single-process gradients
        for k, g in got["params"].items():
            want = single["params"][k]
            if want is None:
                assert g is None, k
                continue
            assert torch.allclose(g, want, atol=1e-12), (r, k)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["global_no_abnormal", "global_no_usable"])
def test_no_usable_anatomy_anywhere_is_a_zero_on_every_rank(ranks, scenario: str) -> None:
    for name in GATHERED:
        obj = create_objective(name)
        if not isinstance(obj, AnatomyContrastive):
            continue
        for res in ranks:
            step = res[(scenario, name)]
            assert step["loss"].item() == 0.0
            used = [g for g in step["params"].values() if g is not None]
            assert used and all(torch.equal(g, torch.zeros_like(g)) for g in used)


@pytest.mark.slow
def test_rank1_without_usable_anatomy_still_learns(ranks) -> None:
    """Rank 1 has nothing usable, yet its loss is the global (non-zero) loss and it ran backward."""
    for name in GATHERED:
        step = ranks[1][("rank1_no_usable", name)]
        assert step["loss"].item() > 0, name
        assert any(g is not None for g in step["emb"].values()), name


# ------------------------------------------------------------------------- single process, no group


def test_helpers_without_a_process_group(monkeypatch) -> None:
    assert not fd.is_distributed()
    assert (fd.rank(), fd.world_size(), fd.is_main_process()) == (0, 1, True)
    fd.barrier()
    fd.destroy()
    x = torch.randn(3, 2, requires_grad=True)
    assert fd.all_gather_with_grad(x) is x
    assert fd.all_gather(x) is x
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert fd.init_from_env() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        fd.init_from_env()


@pytest.mark.parametrize("name", GATHERED)
def test_collective_sequence_does_not_depend_on_the_data(name: str) -> None:
    """The no-hang contract: an objective gathers the same tensors, in the same order, whatever the batch
    holds, and every gathered tensor that needs a gradient receives one (its backward collective runs)."""
    sequences = []
    for scenario in ("mixed", "global_no_abnormal", "global_no_usable"):
        raw, batch, _ = make_scenario(scenario)
        calls: list = []

        def gather(t: torch.Tensor) -> torch.Tensor:
            calls.append((tuple(t.shape), t.dtype, t.requires_grad))
            if t.requires_grad:
                t = t * 1.0  # a node of our own: its grad must exist after backward
                t.retain_grad()
                grads.append(t)
            return t

        grads: list = []
        out = Tower()(raw)
        loss = sum(create_objective(name, gather=gather)(**out, **batch).values())
        loss.backward()
        assert all(t.grad is not None for t in grads), scenario
        sequences.append(calls)
    assert sequences[0] == sequences[1] == sequences[2]
