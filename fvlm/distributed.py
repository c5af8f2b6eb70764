"""Rank helpers and the feature gather used by the contrastive objectives. No model code here.

Everything degrades to the single-process case: with no initialised process group, ``rank() == 0``,
``world_size() == 1``, ``barrier()`` does nothing and both gathers are the identity.

Gradient of the gather (:func:`all_gather_with_grad`)
-----------------------------------------------------
The objectives compute the *same* loss ``L`` on every rank, over the global batch gathered from all ranks
(``G = concat_r x_r``). The backward of the gather is::

    grad(x_r) = slice_r( sum_over_ranks_s dL_s/dG )          # all_reduce(SUM), then the local slice

which is the exact gradient of ``sum_s L_s`` with respect to the local input (each rank's ``L_s`` depends
on ``x_r`` only through ``G``). This is the semantics of ``torch.distributed.nn.all_gather`` and of
open_clip's ``gather_with_grad``. Because every ``L_s`` equals the single-process loss ``L`` here, the
per-rank gradient of the local features is

    grad(x_r) = world_size * dL/dx_r        (the slice of the single-process gradient, times world_size)

and a parameter used directly in the loss (the logit scale) gets ``dL/dtheta`` on every rank. DDP and
DeepSpeed *average* gradients over ranks, so after that mean every parameter gradient equals the
single-process gradient of the loss over the whole global batch, exactly, and the logged loss equals the
single-process loss. We chose the all-reduce over the cheaper "take the local slice, scale the loss by
world_size" because it stays correct when ranks compute different losses from the gathered tensor (e.g.
local rows against gathered columns, where ``L = sum_s L_s``), and does not rely on every rank computing a
bit-identical loss. Its cost is one all-reduce of the gathered gradient, ``(N, A, D)`` floats, per tensor.

No-hang contract (docs/architecture.md#known-defects-of-the-release, "skipping backward when a rank's loss is zero")
------------------------------------------------------------------------------------
The backward all-reduce is a collective: every rank must run the backward of every gather it ran
forward. The objectives therefore gather the same tensors in the same order whatever the data, and always
add ``0 * sum(gathered)`` to their loss so that the backward reaches every gather even when no anatomy is
usable on a rank, or in the whole batch. Ranks may hold different batch sizes (the last, short batch):
sizes are exchanged first and the tensors padded to the largest.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "rank",
    "local_rank",
    "world_size",
    "is_main_process",
    "barrier",
    "init_from_env",
    "destroy",
    "all_gather",
    "all_gather_with_grad",
]

#: dtypes that gloo (and NCCL) cannot all-gather as such; sent as uint8 and cast back.
_SEND_AS_UINT8 = {torch.bool}


def is_distributed() -> bool:
    """True when a default process group is initialised (and has more than zero ranks)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process, 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group, 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank within this node, from ``LOCAL_RANK`` (set by torchrun and the deepspeed launcher), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on global rank 0 (the rank that logs and writes run files)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op when not distributed."""
    if is_distributed():
        dist.barrier()


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from the launcher's env vars, if they are there.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (torchrun, deepspeed launcher).
    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``. Returns True when a group is
    (now) initialised, False when the variables are absent (single process, nothing to do).
    """
    if is_distributed():
        return True
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not; launch with torchrun or the "
            "deepspeed launcher, or set MASTER_ADDR and MASTER_PORT"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def destroy() -> None:
    """Destroy the default process group if one exists (call in the entry point's ``finally``).

    When DeepSpeed's communication layer was set up on it, it is destroyed through DeepSpeed
    (``deepspeed.comm.destroy_process_group``), which also drops DeepSpeed's cached group references: a plain
    ``torch.distributed`` destroy leaves them pointing at the dead group, and the next engine in the same
    process fails with "Group ... is not registered"."""
    if not is_distributed():
        return
    ds = sys.modules.get("deepspeed.comm.comm")
    if ds is not None and getattr(ds, "cdb", None) is not None:
        ds.destroy_process_group()
    else:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- gathers


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's dim-0 size, in rank order."""
    size = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _padded_all_gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather ``x`` (n_r, ...) from every rank, padded to the largest n; returns (sum n_r, ...)."""
    send_dtype = torch.uint8 if x.dtype in _SEND_AS_UINT8 else x.dtype
    longest = max(max(sizes), 1)  # never send an empty tensor
    buf = x.new_zeros((longest, *x.shape[1:]), dtype=send_dtype)  # (n_max, ...)
    buf[: x.shape[0]] = x.to(send_dtype)
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf.contiguous())
    out = torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)  # (N, ...)
    return out.to(x.dtype)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over ranks along dim 0, without gradient. Identity when not distributed.

    Works for any dtype (bool is sent as uint8) and for unequal dim-0 sizes across ranks.
    Shapes: (n_r, ...) on rank r -> (sum_r n_r, ...) on every rank, in rank order.
    """
    if not is_distributed():
        return x
    with torch.no_grad():
        return _padded_all_gather(x.detach(), _gather_sizes(x.shape[0], x.device))


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward = all_reduce(SUM) of the gathered gradient, then the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # x: (n_r, ...)
        sizes = _gather_sizes(x.shape[0], x.device)
        ctx.sizes = sizes
        ctx.rank = rank()
        return _padded_all_gather(x, sizes)  # (N, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # grad: (N, ...)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]  # (n_r, ...)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over ranks along dim 0, with gradients flowing back to the local slice.

    Identity when not distributed. A tensor that does not require grad is gathered without the autograd
    function (no backward collective). Backward: ``grad(x_r) = slice_r(all_reduce_sum(dL/dG))``, i.e.
    ``world_size * dL/dx_r`` when every rank computes the same loss; see the module docstring for why,
    and for what DDP's gradient mean then gives.

    Shapes: (n_r, ...) on rank r -> (sum_r n_r, ...) on every rank, in rank order.
    """
    if not is_distributed():
        return x
    if not (torch.is_grad_enabled() and x.requires_grad):
        return all_gather(x)
    return _AllGatherWithGrad.apply(x)
