"""GPU readiness check of the base recipe, one command, every stage under a hard time budget (issue 19).

    python -m benchmarks.gpu_check OUT                    # on one GPU: about 8 minutes at most, then writes
    python -m benchmarks.gpu_check OUT --cpu-dry-run      # every stage with the tiny model on CPU, < 1 minute
    make gpu-check                                        # the first line, OUT = data/gpu-check

Stages (``benchmarks.gpu_check_stages`` measures; FLOP formula and MFU definition in its docstring):

``env``               torch / CUDA / cuDNN / NCCL / DeepSpeed versions, device, bf16 support, the dense bf16
                      peak, and which SDPA kernel the vision tower's attention takes (flash, memory-efficient,
                      cuDNN or math; read from the profiler's aten ops of a forward + backward of the real tower)
``mfu``               the vision tower alone, forward + backward at the recipe batch in bf16: TFLOP/s and MFU,
                      with and without activation checkpointing; formula checked against torch's FLOP counter
``train_ZERO[_ckpt]`` the recipe (default ``fvlm``: ViT-B over 112 x 256 x 352, BERT-base, batch 14) through
                      the real Trainer and DeepSpeed engine for each ``--zero`` config (zero0, zero2; bf16 on a
                      GPU), one process, synthetic full-size cases in memory: samples/s after warm-up, peak
                      memory at the recipe batch, the largest batch that fits (fitted, then verified), the
                      vision tower's MFU inside the step; ``_ckpt``: with activation checkpointing
``loader``            the training loader's cases/s at the recipe's crop on a preprocessed synthetic cohort,
                      with the recipe's workers and with every usable core (is loading the limit?)
``zeroshot``          windows/s of zero-shot scoring (``score_windows``) on the GPU and on the CPU
``predict``           latency of ``fvlm predict --masks`` (no TotalSegmentator) on one scan

How it always ends: this process starts one worker process that runs the stages in turn and reports each
stage's start, partial figures and result as JSON lines (OUT/progress.jsonl). A stage past its budget (or
past the total budget) is stopped by killing the worker's process group; it is marked ``timeout`` with the
figures it had reported, and a fresh worker goes on with the next stage. A stage that raises is marked
``error`` (type, message, traceback tail) and the others still run. Stages that no longer fit in the total
budget are marked ``skipped``. Results: OUT/gpu_check.json (everything), OUT/gpu_check.md (the tables as a
BENCHMARKS.md block with command, date and machine), OUT/progress.jsonl (the stage events), OUT/worker.log
(the worker's output); on a GPU the block also goes into BENCHMARKS.md under "GPU check: <device name>"
(``benchmarks.record``; ``--no-record`` leaves it alone; a dry run never writes it). On a lent machine whose
tree does not come back, copy OUT home and run ``python -m benchmarks.gpu_check --record-from OUT``.
Exit status 0 when every stage ended ``ok``, else 1 (2: no GPU without ``--cpu-dry-run``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: Per-stage budgets in seconds (GPU profile, CPU dry run); train stages share ``train`` / ``train_ckpt``.
BUDGETS = {"env": (40, 60), "mfu": (40, 60), "train": (75, 120), "train_ckpt": (60, 120), "loader": (60, 60),
           "zeroshot": (60, 60), "predict": (60, 60)}
STARTUP_BUDGET = (90, 60)  # a worker that reports no stage start within this is stopped
TOTAL_BUDGET = (465, 300)  # the 8 minutes, minus writing the results
RELEASE_SAMPLES_PER_S = 1.8  # the fVLM release, fp32, one GPU (docs/architecture.md#training)


def stage_names(zero: list[str], ckpt: bool) -> list[str]:
    """Stage order: cheapest and most telling first, so that what the total budget cuts is the least needed."""
    names = ["env", "mfu", *[f"train_{z}" for z in zero], "loader", "zeroshot", "predict"]
    return names + ([f"train_{z}_ckpt" for z in zero] if ckpt else [])


def stage_budget(name: str, dry: bool, overrides: dict[str, float]) -> float:
    if name in overrides:
        return overrides[name]
    key = ("train_ckpt" if name.endswith("_ckpt") else "train") if name.startswith("train_") else name
    return float(BUDGETS[key][1 if dry else 0])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", default=None,
                    help="output folder (created): gpu_check.json, gpu_check.md, progress.jsonl, worker.log")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="every stage with the tiny model on the CPU (CUDA hidden), to check the script itself")
    ap.add_argument("--recipe", default="fvlm", help="training recipe (configs/train) whose geometry is measured")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    ap.add_argument("--zero", nargs="+", default=["zero0", "zero2"],
                    help="DeepSpeed configs (configs/deepspeed) to train with, one stage each (default zero0 zero2)")
    ap.add_argument("--no-ckpt", action="store_true", help="leave out the activation-checkpointing train stages")
    ap.add_argument("--stages", nargs="+", default=None, help="run only these stages (names as in the JSON)")
    ap.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                    help="per-stage budget override (repeatable)")
    ap.add_argument("--total-budget", type=float, default=None, help="seconds for all stages (GPU 465, dry run 300)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak in TFLOP/s, for devices the built-in table does not know")
    ap.add_argument("--no-record", action="store_true", help="do not write the BENCHMARKS.md block")
    ap.add_argument("--record-from", type=Path, default=None, metavar="OUT",
                    help="only put OUT/gpu_check.md, the block of a GPU check run elsewhere (e.g. on a lent GPU "
                         "machine whose tree does not come back), into this tree's BENCHMARKS.md")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # comma-separated stages: worker mode
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadlines", default=None, help=argparse.SUPPRESS)  # JSON: stage -> budget s; "_total": epoch
    args = ap.parse_args(argv)
    if (args.out is None) == (args.record_from is None):
        ap.error("give the output folder OUT, or --record-from OUT alone")
    budgets: dict[str, float] = {}
    for item in args.budget:
        name, sep, value = item.partition("=")
        try:
            budgets[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or budgets[name] <= 0:
            ap.error(f"--budget {item!r}: give STAGE=SECONDS with a positive number, e.g. --budget loader=30")
    args.budgets = budgets
    known = stage_names(args.zero, not args.no_ckpt)
    for name in [*(args.stages or []), *budgets]:
        if name not in known:
            ap.error(f"unknown stage {name!r}; stages: {', '.join(known)}")
    return args


# ------------------------------------------------------------------------------------------ worker
def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (loader workers, pools)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def worker(args: argparse.Namespace) -> int:
    """Run the named stages in order in this process, reporting to OUT/progress.jsonl."""
    import benchmarks.gpu_check_stages as S

    deadlines = json.loads(args.deadlines)
    total_end = float(deadlines.pop("_total"))
    profile = S.DRY if args.cpu_dry_run else S.GPU
    peak = args.peak_tflops
    with open(args.out / "progress.jsonl", "a", buffering=1, encoding="utf-8") as events:
        def emit(**ev: Any) -> None:
            events.write(json.dumps({**ev, "time": time.time()}, default=str) + "\n")
            events.flush()

        cache: dict[str, Any] = {}
        for name in args.worker.split(","):
            start, cpu0 = time.time(), _cpu_seconds()
            emit(stage=name, event="start")
            partial: dict[str, Any] = {}

            def report(**fields: Any) -> None:
                partial.update(fields)
                emit(stage=name, event="partial", result=partial)

            ctx = S.StageContext(args.recipe, list(args.set), profile, args.work,
                                 min(start + deadlines[name], total_end) - 2.0, report, peak, cache)
            try:
                if name.startswith("train_"):
                    zero = name[len("train_"):].removesuffix("_ckpt")
                    result = S.stage_train(ctx, zero, name.endswith("_ckpt"))
                else:
                    result = S.STAGE_FUNCS[name](ctx)
                if name == "env" and peak is None:
                    peak = result.get("peak_bf16_tflops")  # later stages compute MFU against it
                emit(stage=name, event="done", seconds=time.time() - start, cpu_s=_cpu_seconds() - cpu0, result=result)
            except BaseException as e:  # noqa: BLE001 - every failure is a result of this stage
                tb = traceback.format_exc().strip().splitlines()
                emit(stage=name, event="error", seconds=time.time() - start, result=partial,
                     error=f"{type(e).__name__}: {e}"[:2000], traceback=tb[-25:])
                if isinstance(e, KeyboardInterrupt):
                    raise
            finally:
                S.free_memory()
    from fvlm import distributed as dist_utils

    dist_utils.destroy()
    return 0


# ------------------------------------------------------------------------------------------ orchestration
def _kill(proc: subprocess.Popen) -> None:
    """End the worker and everything it started (its own process group)."""
    with_group = hasattr(os, "killpg")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig) if with_group else proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue


class _Events:
    """The worker's JSON-line events (OUT/progress.jsonl), read as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()
        self.offset = path.stat().st_size

    def read(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self.offset += len(complete)
        return [json.loads(line) for line in complete.decode("utf-8").splitlines()]


def _follow(proc: subprocess.Popen, events: _Events, results: dict[str, dict[str, Any]], remaining: list[str],
            budgets: dict[str, float], total_end: float, dry: bool) -> tuple[str | None, float, bool]:
    """Apply the worker's events to ``results`` until it exits or overruns a budget (then it is killed and the
    stage marked ``timeout``); returns the stage it was in when it exited (None: between stages), since when,
    and whether it was stopped for its budget."""
    current, since = None, time.time()
    while True:
        new = events.read()
        for ev in new:
            s = ev["stage"]
            if ev["event"] == "start":
                current, since = s, time.time()
                results[s]["status"] = "running"
            elif ev["event"] == "partial":
                results[s]["result"] = ev["result"]
            else:
                results[s].update(status="ok" if ev["event"] == "done" else "error",
                                  seconds=round(ev["seconds"], 2), result=ev.get("result", {}))
                if "cpu_s" in ev:
                    results[s]["cpu_s"] = round(ev["cpu_s"], 2)
                if ev["event"] == "error":
                    results[s].update(error=ev["error"], traceback=ev["traceback"])
                remaining.remove(s)
                current, since = None, time.time()
        if proc.poll() is not None and not new:
            return current, since, False
        limit = budgets[current] if current else STARTUP_BUDGET[1 if dry else 0]
        now = time.time()
        if now > min(since + limit, total_end):
            _kill(proc)
            victim = current or remaining[0]
            if since + limit > total_end:
                what = "stopped at the end of the total budget"
            elif current is None:
                what = f"the worker reported no stage start within {limit:.3g} s (imports or start-up)"
            else:
                what = f"stopped after its budget of {limit:.3g} s"
            results[victim].update(status="timeout", seconds=round(now - since, 2), error=what)
            remaining.remove(victim)
            return None, now, True
        time.sleep(0.1)


def orchestrate(args: argparse.Namespace, stages: list[str], work: Path) -> dict[str, dict[str, Any]]:
    """Run ``stages`` in worker processes under their budgets; returns stage -> outcome."""
    dry = args.cpu_dry_run
    t_start = time.time()
    total_end = t_start + (args.total_budget or TOTAL_BUDGET[1 if dry else 0])
    budgets = {s: stage_budget(s, dry, args.budgets) for s in stages}
    results: dict[str, dict[str, Any]] = {s: {"status": "pending", "budget_s": budgets[s]} for s in stages}
    events = _Events(args.out / "progress.jsonl")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if dry:
        # One torch thread: the tiny model gains nothing from more, and idle OpenMP threads spin on a busy CI box.
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # the worker is a single process: engine.setup_distributed makes its own group
    remaining = list(stages)
    min_start = 5.0 if dry else 15.0
    with open(args.out / "worker.log", "a", encoding="utf-8") as log:
        while remaining:
            if total_end - time.time() < min_start:
                for s in remaining:
                    results[s].update(status="skipped", error="the total budget was spent before this stage")
                break
            cmd = [sys.executable, "-m", "benchmarks.gpu_check", str(args.out), "--worker", ",".join(remaining),
                   "--work", str(work), "--recipe", args.recipe, "--zero", *args.zero,
                   "--deadlines", json.dumps({**budgets, "_total": total_end})]
            cmd += [f"--set={s}" for s in args.set]
            # A fresh worker after a stopped one still computes MFU against the peak the env stage found.
            peak = args.peak_tflops or ((results.get("env") or {}).get("result") or {}).get("peak_bf16_tflops")
            cmd += (["--cpu-dry-run"] if dry else []) + (["--peak-tflops", str(peak)] if peak else [])
            log.write(f"\n=== worker for {', '.join(remaining)} ===\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            current, since, stopped = None, time.time(), False
            try:
                current, since, stopped = _follow(proc, events, results, remaining, budgets, total_end, dry)
            finally:  # also on Ctrl-C: the worker runs in its own session and would outlive this process
                if proc.poll() is None:
                    _kill(proc)
            if current is not None and current in remaining:  # the worker died inside a stage
                results[current].update(status="error", seconds=round(time.time() - since, 2),
                                        error=f"the worker exited with status {proc.returncode} during the stage "
                                              "(crash or kill; see worker.log)")
                remaining.remove(current)
            elif not stopped and current is None and remaining and proc.returncode not in (None, 0) and \
                    results[remaining[0]]["status"] == "pending":
                results[remaining[0]].update(status="error", error=f"the worker exited with status "
                                             f"{proc.returncode} before this stage started (see worker.log)")
                remaining.remove(remaining[0])
    return results


# ------------------------------------------------------------------------------------------ report
def _f(v: Any, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt) if isinstance(v, (int, float)) else str(v)


def _gib(mib: Any) -> str:
    return "-" if mib is None else f"{mib / 1024:.1f}"


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, read off the stage results (None where the figure is missing)."""
    st = doc["stages"]
    trains = [(s, v.get("result") or {}) for s, v in st.items() if s.startswith("train_")]
    sps = [r.get("samples_per_s") for _, r in trains if r.get("samples_per_s")]
    mfu_runs = ((st.get("mfu") or {}).get("result") or {}).get("runs") or []
    tower_mfu = next((r.get("mfu") for r in mfu_runs if not r["grad_checkpointing"]), None)
    in_step = [r.get("vision_mfu_in_step") for _, r in trains if r.get("vision_mfu_in_step")]
    loader_runs = [r for r in ((st.get("loader") or {}).get("result") or {}).get("runs") or [] if "cases_per_s" in r]
    best_loader = max((r["cases_per_s"] for r in loader_runs), default=None)
    fits = [r.get("recipe_batch_fits") for _, r in trains if "recipe_batch_fits" in r]
    return {
        "best_train_samples_per_s": max(sps, default=None),
        "speedup_vs_release": max(sps) / RELEASE_SAMPLES_PER_S if sps else None,
        "target_speedup": 15.0,
        "vision_tower_mfu": tower_mfu, "vision_mfu_in_step_best": max(in_step, default=None), "target_mfu": 0.40,
        "recipe_batch_fits": all(fits) if fits else None,
        "largest_batch": {s: r.get("largest_batch") for s, r in trains if "largest_batch" in r},
        "loader_best_cases_per_s": best_loader,
        "loading_is_the_limit": (best_loader < max(sps)) if best_loader and sps else None,
    }


def markdown(doc: dict[str, Any]) -> tuple[str, str]:
    """The tables (stages, training, vision tower, loader, zero-shot, predict) and the notes."""
    from benchmarks.record import markdown_table

    st = doc["stages"]
    res = {s: (v.get("result") or {}) for s, v in st.items()}
    env = res.get("env", {})
    parts = [markdown_table(["stage", "status", "seconds", "budget s", "error"],
                            [[s, v["status"], _f(v.get("seconds"), ".1f"), _f(v.get("budget_s"), ".0f"),
                              (v.get("error") or "")[:120].replace("|", "/")] for s, v in st.items()])]
    rows = []
    for s, r in res.items():
        if s.startswith("train_") and r:
            rows.append([r.get("zero"), "yes" if r.get("grad_checkpointing") else "no", r.get("dtype"), r.get("batch"),
                         _f(r.get("samples_per_s")), _f(r.get("samples_per_s_model_only")), _gib(r.get("peak_mib")),
                         _gib(r.get("per_sample_mib")), _f(r.get("predicted_max_batch")), _f(r.get("largest_batch")),
                         _gib(r.get("largest_batch_peak_mib")), _f(r.get("largest_batch_samples_per_s")),
                         _f(r.get("vision_mfu_in_step"), ".1%")])
    if rows:
        parts.append(markdown_table(["ZeRO", "act. ckpt", "dtype", "batch", "samples/s", "samples/s w/o host batch",
                                     "peak GiB", "GiB/sample", "predicted max batch", "largest batch verified",
                                     "its peak GiB", "its samples/s", "vision MFU in step"], rows))
    m = res.get("mfu", {})
    if m.get("runs"):
        parts.append(markdown_table(
            ["vision tower", "batch", "dtype", "TFLOP/sample (train)", "FLOP counter / formula", "s/iter",
             "samples/s", "TFLOP/s", "MFU"],
            [["act. ckpt" if r["grad_checkpointing"] else "plain", m.get("batch"), m.get("dtype"),
              _f(m.get("tflop_train_per_sample")), _f(m.get("flops_counter_ratio"), ".3f"), _f(r["s_per_iter"]),
              _f(r["samples_per_s"]), _f(r["achieved_tflops"]), _f(r.get("mfu"), ".1%")] for r in m["runs"]]))
    lo = res.get("loader", {})
    if lo.get("runs"):
        parts.append(markdown_table(["loader workers", "crop", "cases timed", "cases/s", "cases/s per worker"],
                                    [[r["workers"], "x".join(map(str, lo.get("crop", []))), r.get("cases", "-"),
                                      _f(r.get("cases_per_s")), _f(r.get("cases_per_s_per_worker"))
                                      if "error" not in r else r["error"][:80]] for r in lo["runs"]]))
    zs = res.get("zeroshot", {})
    if zs.get("runs"):
        parts.append(markdown_table(["zero-shot device", "dtype", "cases", "windows", "windows/s", "prompt encoding s"],
                                    [[r["device"], r.get("dtype", "-"), r.get("cases", "-"), r.get("windows", "-"),
                                      _f(r.get("windows_per_s")), _f(r.get("prompts_s"))] for r in zs["runs"]]))
    pr = res.get("predict", {})
    if pr.get("runs"):
        parts.append(markdown_table(["fvlm predict run", "seconds", "tasks", "scored anatomies"],
                                    [[i + 1, _f(r["seconds"]), r["tasks"], r["scored_anatomies"]]
                                     for i, r in enumerate(pr["runs"])]))
    sm = doc["summary"]
    sdpa = env.get("sdpa") or {}
    notes = (
        f"{doc['mode']}; recipe `{doc['recipe']}`{' with ' + ', '.join(doc['sets']) if doc['sets'] else ''}; "
        f"device {env.get('device', '?')} (bf16 {env.get('bf16')}, peak {_f(env.get('peak_bf16_tflops'))} TFLOP/s "
        f"bf16 dense, {env.get('peak_source', '')}); torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN "
        f"{env.get('cudnn')}, DeepSpeed {env.get('deepspeed')}; {env.get('usable_cores')} usable cores. "
        f"Vision attention {sdpa.get('shape', '')} in {sdpa.get('dtype', '?')} takes the **{sdpa.get('kernel', '?')}** "
        f"SDPA kernel ({', '.join(sdpa.get('aten_ops', []))}). "
        f"Targets: best training {_f(sm['best_train_samples_per_s'])} samples/s = "
        f"{_f(sm['speedup_vs_release'])}x the release's {RELEASE_SAMPLES_PER_S} (target 15x); vision-tower MFU "
        f"{_f(sm['vision_tower_mfu'], '.1%')} alone, {_f(sm['vision_mfu_in_step_best'], '.1%')} inside the "
        f"training step (target 40%); recipe batch fits: {sm['recipe_batch_fits']}; loader best "
        f"{_f(sm['loader_best_cases_per_s'])} cases/s (loading is the limit: {sm['loading_is_the_limit']}). "
        "Training: the real Trainer on in-memory synthetic cases, workers 0 (the host batch column subtracts the "
        "in-process batch making and copy); largest batch: peak memory fitted linearly through the recipe batch "
        "and half of it, predicted at 92% of the device memory, then tried. Zero-shot and predict use untrained "
        "models on a small synthetic cohort preprocessed at the default 1 x 1 x 3 mm grid; `fvlm evaluate` and "
        "`fvlm predict` load their model on the CPU. Full figures: gpu_check.json.")
    return "\n\n".join(parts), notes


def record_from(folder: Path) -> int:
    """Put the block of an earlier GPU run (``folder/gpu_check.md``) into BENCHMARKS.md under its own title."""
    from benchmarks.record import write_block

    path = folder / "gpu_check.md"
    if not path.is_file():
        raise FileNotFoundError(f"--record-from {folder}: no gpu_check.md there (the output folder of a GPU run)")
    block = path.read_text(encoding="utf-8")
    title = block.splitlines()[0].removeprefix("### ").strip() if block.startswith("### ") else ""
    if not title.startswith("GPU check: ") or "\n- machine: " not in block:
        raise ValueError(f"{path}: not the block of a GPU run (a dry run is not recorded); heading {title!r}")
    write_block(title, block)
    print(f"gpu_check: recorded '{title}' in BENCHMARKS.md", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.record_from is not None:
        return record_from(args.record_from)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    if not args.cpu_dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device is visible; run on a GPU machine, or pass --cpu-dry-run to check the "
                  "script on the CPU", file=sys.stderr)
            return 2
    stages = args.stages or stage_names(args.zero, not args.no_ckpt)
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="fvlm-gpu-check-"))
    try:
        results = orchestrate(args, stages, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"format": "fvlm-gpu-check/1", "mode": "CPU dry run, tiny model" if args.cpu_dry_run else "GPU",
           "recipe": args.recipe, "sets": list(args.set), "zero": args.zero, "wall_s": round(time.time() - t0, 1),
           "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
           "stages": results}
    doc["summary"] = summarise(doc)
    (args.out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    table, notes = markdown(doc)
    from benchmarks.record import format_block, write_block

    device = ((results.get("env") or {}).get("result") or {}).get("device") or "unknown device"
    title = f"GPU check: {device}" if not args.cpu_dry_run else "GPU check (CPU dry run, tiny model)"
    block = format_block(title, table, notes, command=doc["command"])
    (args.out / "gpu_check.md").write_text(block, encoding="utf-8")
    if not args.cpu_dry_run and not args.no_record:
        write_block(title, block)
    bad = {s: v["status"] for s, v in results.items() if v["status"] != "ok"}
    print(f"gpu_check: {len(results) - len(bad)}/{len(results)} stages ok in {doc['wall_s']} s"
          + (f"; not ok: {bad}" if bad else "") + f"; results in {args.out}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
