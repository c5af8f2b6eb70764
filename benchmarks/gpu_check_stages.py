"""The measurements of ``benchmarks.gpu_check``, one function per stage, run inside its worker process.

Each stage takes a :class:`StageContext` (the recipe, the run profile, a scratch folder, its deadline and a
``report`` callback) and returns a dict of what it measured; it calls ``report(**fields)`` as figures come
in, so that a stage stopped at its budget still leaves what it had measured. Every stage goes through the
project's own code: the recipe loader and ``model_config_for`` (configs/train), the model registry, the
DeepSpeed ``Trainer``, the training loader (``build_data``), the evaluation scoring (``eval_dataset``,
``score_windows``) and the ``fvlm predict`` entry point.

Vision-tower FLOPs (:func:`vision_flops`), model FLOPs counted from the architecture, 2 FLOPs per
multiply-add; norms, GELU, softmax, the position-embedding interpolation and the anatomy pooling are left
out (a few FLOPs per element against thousands per token). For an input of C x Z x Y x X voxels, patch
(pz, py, px), N = (Z / pz)(Y / py)(X / px) tokens, width W, depth L, MLP hidden M = round(W * mlp_ratio)::

    stem (linear)   F_stem = 2 N (C pz py px) W            (conv stem: ConvStem.flops_per_voxel() * Z Y X)
    one block       F_blk  = 2 N W (3 W)                   q, k, v projection
                           + 2 N^2 W + 2 N^2 W             q k^T and softmax(.) v over all heads (h * d = W)
                           + 2 N W^2                       output projection
                           + 4 N W M                       MLP, two linear maps
                           = 8 N W^2 + 4 N W M + 4 N^2 W
    forward         F_fwd   = F_stem + L F_blk
    training step   F_train = 3 F_fwd - F_in = 3 L F_blk + 3 F_stem - F_in

The backward pass costs twice the forward (gradients of the inputs and of the weights) except in the stem's
first layer, whose input, the image, needs no gradient: F_in, that layer's forward, is saved once. Linear
stem: F_in = F_stem, so F_train = 3 L F_blk + 2 F_stem. Conv stem (:class:`~fvlm.model.vision.ConvStem`):
F_in = 2 prod(s_1 + 2) C_0 C_1 / prod(s_1) FLOPs per input voxel, the first convolution.

Base model (112 x 256 x 352, patch 16 x 16 x 32: N = 7 x 16 x 11 = 1,232, W 768, M 3,072, L 12,
C pz py px = 8,192): F_blk = 22.1 GFLOP, F_stem = 15.5 GFLOP, F_fwd = 0.281 TFLOP, F_train = 0.827 TFLOP
per volume.

Model FLOP utilisation (Chowdhery et al., "PaLM", 2022, appendix B): MFU = F_train x samples/s / peak, with
the device's dense bf16 tensor peak (:func:`peak_bf16_tflops`). Activation checkpointing recomputes each
block's forward in backward; that is hardware work, not model FLOPs, and is not counted, so checkpointing
lowers the MFU. The formula is checked against ``torch.utils.flop_counter.FlopCounterMode`` on the real
tower in every run (``mfu.flops_counter_ratio``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

#: Dense bf16 tensor-core peak in TFLOP/s (vendor data sheets, no sparsity), first matching pattern wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0), (r"H100.*NVL", 835.0), (r"GH200|H200|H100|H800", 989.4),
    (r"B200", 2250.0), (r"A100|A800", 312.0), (r"L40S", 362.1), (r"L40\b", 181.0), (r"A10G", 70.0),
    (r"A10\b", 125.0), (r"L4\b", 121.0), (r"RTX 4090", 165.2), (r"A6000", 154.8),
)


def peak_bf16_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """The device's dense bf16 peak (TFLOP/s) and where it came from; ``None`` for an unknown device."""
    if override:
        return float(override), "--peak-tflops"
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name or ""):
            return tflops, f"data sheet ({pattern})"
    return None, f"unknown device {device_name!r}: pass --peak-tflops"


def vision_flops(vcfg: Any, crop_zyx: tuple[int, int, int]) -> dict[str, float]:
    """Forward and training-step FLOPs of one volume through the vision tower (module docstring)."""
    from fvlm.model.vision import ConvStem, token_grid

    grid = token_grid(tuple(crop_zyx), tuple(vcfg.patch_size))
    n, w, depth = math.prod(grid), vcfg.width, vcfg.depth
    m = int(round(w * vcfg.mlp_ratio))
    voxels = math.prod(crop_zyx)
    if vcfg.stem == "conv":
        conv = ConvStem(vcfg)
        stem = conv.flops_per_voxel() * voxels
        s1 = conv.strides[0]
        first = 2.0 * math.prod(k + 2 for k in s1) * conv.channels[0] * conv.channels[1] / math.prod(s1) * voxels
    else:
        stem = first = 2.0 * n * vcfg.stem_in_channels * math.prod(vcfg.patch_size) * w
    block = 8.0 * n * w * w + 4.0 * n * w * m + 4.0 * n * n * w
    forward = stem + depth * block
    return {"tokens": n, "stem": stem, "block": block, "forward": forward, "train": 3.0 * forward - first}


@dataclass
class Profile:
    """What a run measures: the GPU check at the recipe's geometry, or the tiny CPU dry run."""

    dry: bool
    sets: list[str]
    """Recipe overrides of the profile (before the command line's ``--set``)."""
    warmup: int
    steps: int
    mfu_iters: int
    max_probe_batch: int
    """Largest batch the largest-batch search tries."""
    loader_batch: int
    loader_workers: list[int] | None
    """None: the recipe's ``data.workers`` and this machine's usable cores."""
    zeroshot_cases: int
    predict_runs: int
    cohort_workers: int | None
    """Processes making the synthetic cohort; None: the usable cores."""
    min_stage_s: float
    """A search step or an optional measurement starts only with this much of the stage's budget left."""


GPU = Profile(dry=False, sets=[], warmup=3, steps=6, mfu_iters=10, max_probe_batch=512, loader_batch=2,
              loader_workers=None, zeroshot_cases=8, predict_runs=2, cohort_workers=None, min_stage_s=20.0)
DRY = Profile(dry=True, sets=["model.preset=tiny", "data.crop_size=[32, 64, 64]", "data.batch_size=2"], warmup=1,
              steps=2, mfu_iters=2, max_probe_batch=3, loader_batch=1, loader_workers=[0, 1], zeroshot_cases=1,
              predict_runs=1, cohort_workers=1, min_stage_s=2.0)


@dataclass
class StageContext:
    """What a stage gets from the worker."""

    recipe_name: str
    sets: list[str]
    profile: Profile
    work: Path
    """Scratch folder shared by the stages of one check (the synthetic cohort, run folders, the export)."""
    deadline: float
    """``time.time()`` at which the stage's budget ends."""
    report: Callable[..., None]
    peak_tflops: float | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.time()

    def recipe(self, extra: list[str] | None = None) -> Any:
        from pipelines.config.recipe import load_recipe

        return load_recipe(self.recipe_name, [*self.profile.sets, *self.sets, *(extra or [])])


def _device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mib(n: float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Memory:
    """Peak memory of this process: the CUDA caching allocator's on a GPU; on the CPU the resident set's
    high-water mark (VmHWM, reset through /proc/self/clear_refs where the kernel allows it)."""

    def __init__(self, device) -> None:
        self.device = device

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")

    def _status(self, key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1]) * 1024
        return float("nan")

    def peak(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device))
        return self._status("VmHWM")

    def peak_reserved(self) -> float | None:
        import torch

        return float(torch.cuda.max_memory_reserved(self.device)) if self.device.type == "cuda" else None

    def current(self) -> float:
        import torch

        if self.device.type == "cuda":
            return float(torch.cuda.memory_allocated(self.device))
        return self._status("VmRSS")

    def capacity(self) -> float:
        import torch

        if self.device.type == "cuda":
            return float(torch.cuda.mem_get_info(self.device)[1])
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
        return float("nan")


def is_oom(e: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(e, oom) or "out of memory" in str(e).lower()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ environment
def sdpa_kernels(module: Any, x: Any) -> dict[str, Any]:
    """Which scaled-dot-product-attention kernel ``module`` (a vision tower) takes on input ``x``: the aten
    ops a forward + backward runs, read with the torch profiler; and, per SDPA backend, whether it accepts
    the tower's attention shape (torch.nn.attention.sdpa_kernel forcing that backend alone)."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from fvlm.model.vision import token_grid

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=acts) as prof:
        out = module(x)
        sum(f.float().mean() for f in out.features).backward()
    _sync(x.device)
    ops = sorted({e.name for e in prof.events() if "attention" in e.name.lower() and e.name.startswith("aten::")})
    joined = " ".join(ops)
    kernel = ("cudnn" if "cudnn" in joined else "flash" if "flash" in joined else
              "memory-efficient" if "efficient" in joined else "math" if ops else "none seen")
    backends: dict[str, str] = {}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        blk = module.blocks[0].attn
        n = math.prod(token_grid(tuple(x.shape[2:]), module.patch_size))
        d = module.width // blk.heads
        q = torch.randn(1, blk.heads, n, d, device=x.device, dtype=x.dtype, requires_grad=True)
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                continue
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, q, q).sum().backward()
                backends[name.lower()] = "ok"
            except RuntimeError as e:
                backends[name.lower()] = "unavailable: " + str(e).strip().splitlines()[0][:160]
    except ImportError as e:  # torch without torch.nn.attention
        backends["error"] = str(e)
    return {"kernel": kernel, "aten_ops": ops, "backends": backends}


def stage_env(ctx: StageContext) -> dict[str, Any]:
    """Versions, device, bf16 support, peak FLOP/s, and the SDPA kernel of the vision tower's attention."""
    import platform

    import torch

    from fvlm.model.registry import create_vision_encoder
    from pipelines.train.trainer import model_config_for

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                           "cpu_cores": os.cpu_count(), "usable_cores": usable_cores()}
    for mod in ("deepspeed", "transformers", "numpy", "SimpleITK"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # a missing package is a finding, not a failure of this stage
            env[mod] = f"not importable: {type(e).__name__}: {e}"[:200]
    device = _device()
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
        env.update(device=torch.cuda.get_device_name(device), capability=f"{p.major}.{p.minor}",
                   multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   bf16=bool(torch.cuda.is_bf16_supported()),
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl)
    else:
        env.update(device="cpu", bf16=False)
    peak, source = peak_bf16_tflops(env["device"], ctx.peak_tflops)
    env.update(peak_bf16_tflops=peak, peak_source=source)
    ctx.report(**env)
    model_cfg = model_config_for(ctx.recipe())
    crop = tuple(ctx.recipe().data.crop_size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as the DeepSpeed engine runs it
    vision = create_vision_encoder(model_cfg.vision).to(device=device, dtype=dtype).train()
    x = torch.rand((1, model_cfg.vision.stem_in_channels, *crop), device=device, dtype=dtype)
    sdpa = sdpa_kernels(vision, x)
    sdpa["dtype"] = str(dtype).replace("torch.", "")
    sdpa["shape"] = f"(B, {model_cfg.vision.heads} heads, {vision_flops(model_cfg.vision, crop)['tokens']} tokens, " \
                    f"{model_cfg.vision.width // model_cfg.vision.heads})"
    ctx.report(sdpa=sdpa)
    return {**env, "sdpa": sdpa}


# ------------------------------------------------------------------------------------------ vision MFU
def count_flops(module: Any, x: Any) -> float:
    """FLOPs of one forward + backward of ``module`` on ``x`` as torch's FlopCounterMode counts them; the
    attention runs on the math SDPA backend here (its matmuls are counted whatever fused kernel training
    takes, and the counter does not know every fused kernel, e.g. the CPU flash kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]):
        out = module(x)
        sum(f.float().mean() for f in out.features).backward()
    module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def stage_mfu(ctx: StageContext) -> dict[str, Any]:
    """The vision tower alone, forward + backward at the recipe's batch, in the engine's dtype (bf16 on a
    GPU): seconds per iteration, achieved TFLOP/s and MFU, with and without activation checkpointing."""
    import torch

    from fvlm.model.registry import create_vision_encoder
    from pipelines.train.trainer import model_config_for

    cfg = ctx.recipe()
    model_cfg = model_config_for(cfg)
    crop, batch = tuple(cfg.data.crop_size), cfg.data.batch_size
    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flops = vision_flops(model_cfg.vision, crop)
    vision = create_vision_encoder(model_cfg.vision).to(device=device, dtype=dtype).train()
    x = torch.rand((batch, model_cfg.vision.stem_in_channels, *crop), device=device, dtype=dtype)
    counted = count_flops(vision, x[:1])
    res: dict[str, Any] = {"batch": batch, "crop": list(crop), "dtype": str(dtype).replace("torch.", ""),
                           "tokens": flops["tokens"], "gflop_forward_per_sample": flops["forward"] / 1e9,
                           "tflop_train_per_sample": flops["train"] / 1e12,
                           "flops_counter_ratio": counted / flops["train"], "peak_bf16_tflops": ctx.peak_tflops,
                           "runs": []}
    ctx.report(**res)
    for ckpt in (False, True):
        if ckpt and ctx.left() < ctx.profile.min_stage_s:
            break
        vision.grad_checkpointing = ckpt

        def step() -> None:
            out = vision(x)
            sum(f.float().mean() for f in out.features).backward()
            vision.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        _sync(device)
        t0, n = time.perf_counter(), 0
        while n < ctx.profile.mfu_iters and (n == 0 or ctx.left() > ctx.profile.min_stage_s / 2):
            step()
            n += 1
        _sync(device)
        s = (time.perf_counter() - t0) / n
        tflops = flops["train"] * batch / s / 1e12
        res["runs"].append({"grad_checkpointing": ckpt, "iters": n, "s_per_iter": s, "samples_per_s": batch / s,
                            "achieved_tflops": tflops,
                            "mfu": tflops / ctx.peak_tflops if ctx.peak_tflops else None})
        ctx.report(runs=res["runs"])
    return res


# ------------------------------------------------------------------------------------------ training
class _Repeat:
    """``n`` cases drawn from ``base`` (index modulo its length), so a large batch needs no more memory."""

    def __init__(self, base: Any, n: int) -> None:
        self.base, self.n = base, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item):
        i = int(item[1]) if isinstance(item, tuple) else int(item)
        return self.base[i % len(self.base)]


def _grow(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """A batch of ``size`` samples made by repeating ``batch``'s along dim 0 (on its device)."""
    import torch

    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            reps = -(-size // v.shape[0])
            out[k] = v.repeat(reps, *([1] * (v.dim() - 1)))[:size]
        else:
            out[k] = v
    return out


def stage_train(ctx: StageContext, zero: str, ckpt: bool) -> dict[str, Any]:
    """The recipe through the real ``Trainer`` (DeepSpeed engine, objectives, backward, clipping, AdamW,
    schedule) on in-memory synthetic cases of the full crop (``benchmarks.train_speed.Cases``), one process.

    1. ``warmup + steps`` optimizer steps at the recipe's batch B0 through ``Trainer.train``; samples/s over
       the timed steps (the trainer's per-step wall time), peak memory over the run.
    2. Largest batch: peak memory p(B) = s + m B is fitted through B0 and B0 / 2 (one optimizer step each,
       exactly what ``Trainer.train`` runs per step: ``_micro_step``, ``engine.backward``, ``engine.step``),
       B* = floor((0.92 capacity - s) / m) is predicted and tried (two steps, the second timed); on
       out-of-memory the trainer is rebuilt and 0.85 B* tried, at most three tries in the budget.
    """
    import torch

    from benchmarks.train_speed import Cases
    from fvlm.model import count_parameters, train_wordpiece
    from pipelines.cases.loader import ResumableSampler, build_loader, collate
    from pipelines.train.engine import setup_distributed
    from pipelines.train.run_log import read_metrics
    from pipelines.train.trainer import DataSource, Trainer, model_config_for

    setup_distributed()
    device, prof = _device(), ctx.profile
    mem = Memory(device)
    b0 = ctx.recipe().data.batch_size
    tok = train_wordpiece([f"word{i} lung normal" for i in range(60)], vocab_size=100, min_frequency=1)
    built = {"n": 0}
    flops = None

    def build(batch: int, steps: int):
        nonlocal flops
        cfg = ctx.recipe([f"data.batch_size={batch}", "data.workers=0", f"optim.max_steps={steps}",
                          "logging.every=1", "logging.progress=false", "logging.tensorboard=false",
                          "checkpoint.every=1000000000"])
        model_cfg = model_config_for(cfg)
        if ckpt:
            model_cfg = model_cfg.replace(vision={"grad_checkpointing": True}, text={"grad_checkpointing": True})
        crop = tuple(cfg.data.crop_size)
        flops = vision_flops(model_cfg.vision, crop)
        length = cfg.data.max_text_len or model_cfg.text.max_length
        cases = Cases(min(batch, 4), crop, length, model_cfg.text.vocab_size)
        if model_cfg.vision.in_channels > 1:
            cases.images = cases.images.repeat(1, model_cfg.vision.in_channels, 1, 1, 1)
        built["n"] += 1
        run = ctx.work / f"train-{zero}{'-ckpt' if ckpt else ''}-{built['n']}"
        trainer = Trainer(cfg, run, data=DataSource(_Repeat(cases, batch), ResumableSampler, build_loader),
                          tokenizer=tok, model_config=model_cfg, deepspeed=zero, workers=0)
        trainer.save = lambda: None  # disk speed is not training speed
        trainer.export = lambda: None
        return trainer, cases, run

    def step(trainer, batch) -> None:  # one optimizer step as Trainer.train runs it (grad_accum 1)
        loss, _ = trainer._micro_step(batch)
        trainer.engine.backward(loss)
        trainer.engine.step()

    res: dict[str, Any] = {"zero": zero, "grad_checkpointing": ckpt, "batch": b0, "tries": []}
    t0 = time.perf_counter()
    free_memory()
    res["memory_before_build_mib"] = _mib(mem.current())  # left over from earlier stages of this worker
    mem.reset()
    trainer, cases, run = build(b0, prof.warmup + prof.steps)
    res.update(build_s=time.perf_counter() - t0, params=count_parameters(trainer.engine.module)["total"],
               dtype="bf16" if trainer.engine.bfloat16_enabled() else "fp32",
               memory_after_build_mib=_mib(mem.current()), capacity_mib=_mib(mem.capacity()))
    ctx.report(**res)
    try:
        mem.reset()
        try:
            trainer.train()
        except Exception as e:
            if not is_oom(e):
                raise
            res["recipe_batch_fits"] = False
            res["error_at_recipe_batch"] = str(e).splitlines()[0][:300]
            ctx.report(**res)
            return res
        records = read_metrics(run / "metrics.jsonl")
        timed = records[prof.warmup:]
        secs = [b0 / r["samples_per_s"] for r in timed]
        peak0 = mem.peak()
        res.update(recipe_batch_fits=True, timed_steps=len(timed), samples_per_s=b0 * len(secs) / sum(secs),
                   samples_per_s_median=b0 / statistics.median(secs), s_per_step=sum(secs) / len(secs),
                   loss_first=records[0]["loss"], loss_last=records[-1]["loss"], peak_mib=_mib(peak0),
                   peak_reserved_mib=_mib(mem.peak_reserved()),
                   vision_tflop_train_per_sample=flops["train"] / 1e12)
        if ctx.peak_tflops:
            res["vision_mfu_in_step"] = flops["train"] * res["samples_per_s"] / (ctx.peak_tflops * 1e12)
        ctx.report(**res)

        # What the host spends per step making a batch (workers 0: in the training process).
        th = time.perf_counter()
        host = collate([cases[i % len(cases)] for i in range(b0)])
        dev = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in host.items()}
        _sync(device)
        res["host_batch_s"] = time.perf_counter() - th
        model_s = res["s_per_step"] - res["host_batch_s"]
        res["samples_per_s_model_only"] = b0 / model_s if model_s > 0 else None
        ctx.report(**res)

        # Largest batch: two points of peak(B), a prediction, then a verified try.
        b1 = b0 // 2 if b0 > 1 else 2
        mem.reset()
        step(trainer, _grow(dev, b1))
        peak1 = mem.peak()
        slope = (peak0 - peak1) / (b0 - b1)
        static = peak0 - slope * b0
        usable = 0.92 * mem.capacity()
        predicted = int((usable - static) // slope) if slope > 0 else None
        res.update(probe_batch=b1, probe_peak_mib=_mib(peak1), per_sample_mib=_mib(slope), static_mib=_mib(static),
                   predicted_max_batch=predicted, largest_batch=b0, largest_batch_peak_mib=_mib(peak0),
                   largest_batch_samples_per_s=res["samples_per_s"])
        ctx.report(**res)
        candidate = min(prof.max_probe_batch, predicted if predicted is not None else prof.max_probe_batch)
        while candidate > res["largest_batch"] and len(res["tries"]) < 3 and ctx.left() > prof.min_stage_s:
            try:
                mem.reset()
                big = _grow(dev, candidate)
                step(trainer, big)
                _sync(device)
                ts = time.perf_counter()
                step(trainer, big)
                _sync(device)
                dt = time.perf_counter() - ts
                peak = mem.peak()
                del big
                res["tries"].append({"batch": candidate, "fits": True, "peak_mib": _mib(peak)})
                res.update(largest_batch=candidate, largest_batch_peak_mib=_mib(peak),
                           largest_batch_samples_per_s=candidate / dt)
                ctx.report(**res)
                break
            except Exception as e:
                if not is_oom(e):
                    raise
                res["tries"].append({"batch": candidate, "fits": False, "error": str(e).splitlines()[0][:200]})
                ctx.report(**res)
            big = None
            trainer.close()
            del trainer
            free_memory()
            candidate = max(res["largest_batch"], int(candidate * 0.85))
            if candidate <= res["largest_batch"] or ctx.left() < 2 * prof.min_stage_s:
                trainer = None
                break
            trainer, cases, run = build(b0, 1)
        res["largest_batch_note"] = ("verified" if len(res["tries"]) and res["tries"][-1]["fits"] else
                                     "recipe batch (no larger batch verified)")
        if res["largest_batch"] >= prof.max_probe_batch:
            res["largest_batch_note"] += f"; capped at the profile's {prof.max_probe_batch}"
        return res
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        free_memory()


# ------------------------------------------------------------------------------------------ data
def cohort(ctx: StageContext, cases: int) -> tuple[Path, Path]:
    """A synthetic cohort (``fvlm synth``, small NIfTI cases) and its ``fvlm preprocess`` output at the
    default preset (1 x 1 x 3 mm, padded to at least 112 x 256 x 352), made once per check (a READY file
    marks a finished one; an unfinished one, left by a stopped stage, is made again)."""
    from pipelines.preprocess.run import PreprocessConfig, run as run_preprocess
    from pipelines.preprocess.tables import TableSpec
    from pipelines.synth.cohort import SynthConfig, make_cohort

    root = ctx.work / f"cohort-{cases}"
    synth, prep = root / "synth", root / "prep"
    if (root / "READY").is_file():
        return synth, prep
    shutil.rmtree(root, ignore_errors=True)
    workers = ctx.profile.cohort_workers or max(1, min(usable_cores(), cases))
    t0 = time.perf_counter()
    make_cohort(synth, SynthConfig(cases=cases, seed=0, format="nifti", normal_share=0.25, workers=workers))
    run_preprocess(PreprocessConfig(
        input=synth / "images", out=prep, segmenter="masks", segmenter_options={"path": synth / "segmentations"},
        reports=TableSpec(synth / "reports.csv"), labels=TableSpec(synth / "labels.csv"), case_id="key",
        progress=False, workers=workers))
    (root / "READY").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return synth, prep


def _cohort_cases(ctx: StageContext) -> int:
    workers = _loader_workers(ctx, None)
    return max(ctx.profile.zeroshot_cases, 2 * ctx.profile.loader_batch,
               min(64, 2 * ctx.profile.loader_batch * max(workers)))


def _loader_workers(ctx: StageContext, cfg: Any) -> list[int]:
    if ctx.profile.loader_workers is not None:
        return list(ctx.profile.loader_workers)
    recipe_workers = (cfg or ctx.recipe()).data.workers
    return sorted({recipe_workers, usable_cores()})


def stage_loader(ctx: StageContext) -> dict[str, Any]:
    """Cases/s of the training loader (``build_data``: CaseDataset in train mode at the recipe's crop, the
    ResumableSampler, ``build_loader``) with the recipe's worker count and with every usable core: one
    warm-up pass (worker start, page cache), then timed passes over the preprocessed synthetic cohort."""
    from fvlm.model import train_wordpiece
    from fvlm.model.heads import data_extras_for
    from pipelines.cases.format import corpus_texts
    from pipelines.train.trainer import build_data, model_config_for

    cfg = ctx.recipe()
    model_cfg = model_config_for(cfg)
    t0 = time.perf_counter()
    _, prep = cohort(ctx, _cohort_cases(ctx))
    tok = train_wordpiece(corpus_texts(prep), vocab_size=2000, max_length=model_cfg.text.max_length)
    data = build_data(cfg, prep, tok, cfg.data.max_text_len or model_cfg.text.max_length,
                      extras=data_extras_for(model_cfg), windows_hu=model_cfg.vision.input_windows_hu)
    res: dict[str, Any] = {"cohort_s": time.perf_counter() - t0, "cases": len(data.dataset),
                           "crop": list(cfg.data.crop_size), "mode": cfg.data.mode, "batch": ctx.profile.loader_batch,
                           "runs": []}
    ctx.report(**res)
    b = ctx.profile.loader_batch
    for workers in _loader_workers(ctx, cfg):
        if ctx.left() < ctx.profile.min_stage_s / 2:
            break
        sampler = data.make_sampler(len(data.dataset), batch_size=b, seed=0, rank=0, world_size=1)
        loader = data.make_loader(data.dataset, sampler, batch_size=b, workers=workers)
        try:
            for _ in loader:  # warm-up pass
                pass
            n, t = 0, time.perf_counter()
            while n < max(4 * b * max(workers, 1), 2 * len(data.dataset)) and time.perf_counter() - t < 15:
                for batch in loader:
                    n += int(batch["index"].shape[0])
            dt = time.perf_counter() - t
            res["runs"].append({"workers": workers, "cases": n, "seconds": dt, "cases_per_s": n / dt,
                                "cases_per_s_per_worker": n / dt / max(workers, 1)})
        except Exception as e:  # e.g. a too small /dev/shm for the worker processes: record it, go on
            res["runs"].append({"workers": workers, "error": f"{type(e).__name__}: {e}"[:300]})
        finally:
            del loader
            gc.collect()
        ctx.report(runs=res["runs"])
    return res


# ------------------------------------------------------------------------------------------ zero-shot
def _model_for(ctx: StageContext, prep: Path, model_cfg: Any):
    from fvlm.model import create_model, train_wordpiece
    from pipelines.cases.format import corpus_texts, read_run

    import torch

    tok = train_wordpiece(corpus_texts(prep), vocab_size=400, min_frequency=1)
    run = read_run(prep)
    names = tuple(run["anatomies"][str(i)] for i in range(1, model_cfg.num_anatomies + 1))
    torch.manual_seed(0)
    return create_model(model_cfg, anatomy_names=names, text={"vocab_size": len(tok)}).eval(), tok


def stage_zeroshot(ctx: StageContext) -> dict[str, Any]:
    """Windows/s of zero-shot scoring as ``fvlm evaluate`` scores (``eval_dataset`` view of the recipe,
    ``score_windows``: one window per anatomy-centred origin), after ``encode_prompts`` of the fvlm54
    catalog; on the GPU (bf16 autocast) and on the CPU, where ``fvlm evaluate`` runs its model today."""
    import torch

    from anatomy.catalog import load_task_catalog
    from fvlm.zeroshot import encode_prompts
    from pipelines.evaluate.run import score_windows
    from pipelines.inference.model import eval_dataset
    from pipelines.train.trainer import model_config_for

    cfg = ctx.recipe()
    model_cfg = model_config_for(cfg)
    _, prep = cohort(ctx, _cohort_cases(ctx))
    model, tok = _model_for(ctx, prep, model_cfg)
    view = {"mode": cfg.data.mode, "crop_size_zyx": list(cfg.data.crop_size)}
    ds = eval_dataset(prep, tok, model, view, seed=0, min_inside=0.5)
    catalog = load_task_catalog("fvlm54")
    res: dict[str, Any] = {"view": view, "runs": []}
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    for dev in devices:
        n = ctx.profile.zeroshot_cases if dev == "cuda" or ctx.profile.dry else 1
        if len(res["runs"]) and ctx.left() < 2 * ctx.profile.min_stage_s:
            res["runs"].append({"device": dev, "skipped": "stage budget"})
            break
        model.to(dev)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else contextlib.nullcontext()
        with torch.no_grad(), amp:
            t = time.perf_counter()
            bank = encode_prompts(model, tok, catalog)
            prompts_s = time.perf_counter() - t
            first = copy.copy(ds)
            first.rows = ds.rows[:1]
            score_windows(model, first, bank, view["crop_size_zyx"], 0.5, batch_size=4)  # warm-up
            sub = copy.copy(ds)
            sub.rows = ds.rows[:n]
            _sync(torch.device(dev))
            t = time.perf_counter()
            _, n_win = score_windows(model, sub, bank, view["crop_size_zyx"], 0.5, batch_size=4)
            _sync(torch.device(dev))
            dt = time.perf_counter() - t
        res["runs"].append({"device": dev, "dtype": "bf16 autocast" if dev == "cuda" else "fp32", "cases": n,
                            "windows": int(sum(n_win)), "seconds": dt, "windows_per_s": sum(n_win) / dt,
                            "cases_per_s": n / dt, "prompts_s": prompts_s, "tasks": len(bank)})
        ctx.report(**res)
    model.to("cpu")
    return res


def stage_predict(ctx: StageContext) -> dict[str, Any]:
    """Latency of ``fvlm predict`` (the CLI entry point, in this process) on one synthetic NIfTI scan with its
    label map (``--masks``: no TotalSegmentator), for an untrained export of the recipe's model."""
    import io
    import json
    from contextlib import redirect_stdout

    from fvlm.model import save_pretrained
    from pipelines.cli import main as cli
    from pipelines.train.trainer import model_config_for

    cfg = ctx.recipe()
    model_cfg = model_config_for(cfg)
    synth, prep = cohort(ctx, _cohort_cases(ctx))
    model, tok = _model_for(ctx, prep, model_cfg)
    export = ctx.work / "predict-model"
    t = time.perf_counter()
    save_pretrained(model, tok, export, overwrite=True)
    res: dict[str, Any] = {"export_s": time.perf_counter() - t, "runs": []}
    del model
    image = sorted((synth / "images").glob("*.nii.gz"))[0]
    masks = synth / "segmentations" / image.name
    out = ctx.work / "predict.json"
    for _ in range(ctx.profile.predict_runs):
        if res["runs"] and ctx.left() < 2 * res["runs"][0]["seconds"] + ctx.profile.min_stage_s / 2:
            break
        t = time.perf_counter()
        with redirect_stdout(io.StringIO()):
            rc = cli(["predict", "--checkpoint", str(export), str(image), "--masks", str(masks), "--output", str(out)])
        dt = time.perf_counter() - t
        if rc != 0:
            raise RuntimeError(f"fvlm predict returned {rc}")
        doc = json.loads(out.read_text())
        res["runs"].append({"seconds": dt, "tasks": doc["tasks"]["n_tasks"],
                            "scored_anatomies": sum(a["scored"] for a in doc["anatomies"].values())})
        ctx.report(**res)
    res["model_device"] = "cpu (fvlm predict loads the export with load_pretrained(device='cpu'))"
    return res


STAGE_FUNCS: dict[str, Callable[..., dict[str, Any]]] = {
    "env": stage_env, "mfu": stage_mfu, "loader": stage_loader, "zeroshot": stage_zeroshot, "predict": stage_predict,
}
