"""The main job end to end: synthetic cohorts -> preprocess -> train each recipe -> zero-shot evaluation ->
comparison report. ``fvlm demo`` and ``benchmarks/quality.py`` run it.

Layout of the output folder ``OUT``::

    cohort/train, cohort/test       fvlm synth (the test cohort has seed + 1: phantoms never seen in training)
    prep/train, prep/test           fvlm preprocess (labels and parsed reports joined)
    runs/<recipe>[-s<seed>]         fvlm train (config.yaml, metrics.jsonl, checkpoints, model/)
    eval/<recipe>[-s<seed>]         fvlm evaluate (metrics.csv/json, report.md, report.html)
    summary.json, report.md, report.html   the comparison (pipelines.demo.summary)

Every stage runs the ``fvlm`` subcommand a user would run, as a child process (``python -m pipelines``), so
the demo exercises the real command lines, shows their own progress, and keeps DeepSpeed's process-wide state
out of this process. Evaluation runs in this process (it needs the per-case scores for the paired
comparison). Re-running the same command resumes: a cohort whose ``cohort.json`` matches is kept,
preprocess skips finished cases, a finished training run (marker ``RUN/demo-done.json`` holding its exact
arguments) is kept and an unfinished one continues from its last checkpoint, and an evaluation whose run, settings and
code are unchanged (``OUT/eval/<run>/demo-done.json``) is reused.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines.atomic import atomic_path, write_text_atomic
from pipelines.demo.config import DemoConfig

__all__ = ["StageError", "RunKey", "DemoResult", "run_demo", "run_key_name"]


class StageError(RuntimeError):
    """A stage's command failed; the message names the stage, the command and where its output is."""


@dataclass(frozen=True)
class RunKey:
    recipe: str
    seed: int


def run_key_name(key: RunKey, cfg: DemoConfig) -> str:
    """``fvlm-disease`` with one seed, ``fvlm-disease-s1`` when the config has several."""
    return key.recipe if len(cfg.seeds) == 1 else f"{key.recipe}-s{key.seed}"


@dataclass
class DemoResult:
    out: Path
    evaluations: dict[RunKey, Any] = field(default_factory=dict)  #: pipelines.evaluate.run.Evaluation
    train_seconds: dict[RunKey, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_fvlm(stage: str, argv: list[str], log_dir: Path, echo: Callable[[str], None]) -> None:
    """``python -m pipelines ARGV`` as a child; its output goes to the terminal and to ``LOG_DIR/STAGE.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{stage}.log"
    cmd = [sys.executable, "-m", "pipelines", *argv]
    echo(f"  $ fvlm {' '.join(argv)}")
    sys.stdout.flush()
    with open(log_path, "wb") as log:
        # bytes as they come: progress bars redraw in place (\r) in the terminal and in the log
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_child_env())
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            log.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        rc = proc.wait()
    if rc != 0:
        raise StageError(f"stage {stage} failed (exit {rc}): fvlm {' '.join(argv)}; its output is in {log_path}")


def _cohort_matches(folder: Path, cfg: DemoConfig, cases: int, seed: int) -> bool:
    path = folder / "cohort.json"
    if not path.is_file():
        return False
    try:
        c = json.loads(path.read_text(encoding="utf-8")).get("config", {})
    except (OSError, json.JSONDecodeError):
        return False
    want = {"cases": cases, "seed": seed, "format": cfg.cohort.format, "normal_share": cfg.cohort.normal_share,
            "max_findings": cfg.cohort.max_findings, "label_noise": cfg.cohort.label_noise, "size": "small",
            "prevalence_mix": cfg.cohort.prevalence_mix}
    return all(c.get(k, 0.0 if k == "prevalence_mix" else None) == v for k, v in want.items())  # older cohorts: mix 0


def _synth(cfg: DemoConfig, out: Path, split: str, echo) -> None:
    cases = cfg.cohort.train_cases if split == "train" else cfg.cohort.test_cases
    seed = cfg.cohort.seed + (0 if split == "train" else 1)
    folder = out / "cohort" / split
    if _cohort_matches(folder, cfg, cases, seed):
        echo(f"  {folder}: done earlier ({cases} cases, seed {seed})")
        return
    run_fvlm(f"synth-{split}", ["synth", str(folder), "--cases", str(cases), "--seed", str(seed), "--format",
                                cfg.cohort.format, "--normal-share", str(cfg.cohort.normal_share), "--max-findings",
                                str(cfg.cohort.max_findings), "--label-noise", str(cfg.cohort.label_noise),
                                "--prevalence-mix", str(cfg.cohort.prevalence_mix),
                                "--workers", str(cfg.synth_workers), "--overwrite"], out / "logs", echo)


def _preprocess(cfg: DemoConfig, out: Path, split: str, echo) -> None:
    src = out / "cohort" / split
    run_fvlm(f"preprocess-{split}", ["preprocess", str(src / "images"), str(out / "prep" / split), "--masks",
                                     str(src / "segmentations"), "--reports", str(src / "reports.csv"), "--labels",
                                     str(src / "labels.csv"), "--anatomy", cfg.anatomy, "--config", cfg.preprocess,
                                     "--case-id", "key", "--workers", str(cfg.preprocess_workers), "--no-progress"],
             out / "logs", echo)


def _train(cfg: DemoConfig, out: Path, key: RunKey, echo) -> float:
    name = run_key_name(key, cfg)
    run_dir = out / "runs" / name
    argv = ["train", "--config", key.recipe, "--data", str(out / "prep" / "train"), "--output", str(run_dir),
            "--workers", str(cfg.train_workers), *cfg.train_args(key.recipe, key.seed)]
    marker = run_dir / "demo-done.json"
    if marker.is_file() and (run_dir / "model").is_dir():
        try:
            done = json.loads(marker.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            done = {}
        if done.get("argv") == argv:
            echo(f"  {run_dir}: trained earlier ({done.get('seconds', 0):.0f} s)")
            return float(done.get("seconds", 0.0))
    t0 = time.perf_counter()
    run_fvlm(f"train-{name}", [*argv, "--resume"], out / "logs", echo)
    seconds = time.perf_counter() - t0
    write_text_atomic(marker, json.dumps({"argv": argv, "seconds": seconds}, indent=2) + "\n")
    return seconds


def _source_digest() -> str:
    """sha256 over the project's sources and configs (``anatomy/``, ``fvlm/``, ``pipelines/``, ``configs/``:
    ``*.py`` and ``*.yaml`` by relative path and content): any change to the code that scores re-evaluates."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for part in ("anatomy", "fvlm", "pipelines", "configs"):
        for path in sorted((root / part).rglob("*")):
            if path.suffix in (".py", ".yaml") and path.is_file():
                h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _files_digest(folder: Path, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """sha256 of the plain files directly in ``folder`` (links followed; only ``names`` when given), by name.
    Contents, not times: a resumed preprocess rewrites an unchanged index."""
    if not folder.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and (names is None or p.name in names)}


_NUMPY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
                  ("numpy._core.numeric", "_frombuffer")}
_BUILTIN_GLOBALS = {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "slice"),
                    ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


class _EvaluationUnpickler(pickle.Unpickler):
    """Reads an ``evaluation.pkl`` without running code from it (the Python docs' "restricting globals"): the
    only globals it resolves are numpy's array and scalar rebuilders, a few plain containers, and dataclass or
    enum types of this project's packages (the :class:`Evaluation` tree). Anything else, e.g. a file crafted to
    call ``os.system``, raises ``pickle.UnpicklingError`` and the evaluation is recomputed."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS or (module, name) in _BUILTIN_GLOBALS:
            return super().find_class(module, name)
        if module.split(".")[0] in ("anatomy", "fvlm", "pipelines", "configs"):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"evaluation cache: global {module}.{name} is not allowed")


def _evaluate(cfg: DemoConfig, out: Path, name: str) -> tuple[Any, bool]:
    """``fvlm evaluate`` of ``OUT/runs/NAME`` on the held-out cases (the benchmark's settings), written to
    ``OUT/eval/NAME``; returns (evaluation, reused). The evaluation is also kept in ``OUT/eval/NAME/evaluation.pkl``
    under a key (the run's training marker, its model files, the held-out folder's index, the evaluation
    settings, a digest of the project's code and configs): a re-run with the same key reuses it instead of
    scoring 1,000 cases again (1.5-2 min per run on 2 cores), any change evaluates afresh. The cache is this
    process's own output, read back by :class:`_EvaluationUnpickler` (no code runs from it); an unreadable,
    disallowed or stale one is recomputed."""
    from pipelines.evaluate.report import write_outputs
    from pipelines.evaluate.run import evaluate

    run_dir, eval_dir, test = out / "runs" / name, out / "eval" / name, out / "prep" / "test"
    settings = dict(threshold_split=cfg.evaluate.threshold_split or None, n_boot=cfg.evaluate.n_boot, seed=0,
                    min_positives=cfg.evaluate.min_positives,
                    probe_data=out / "prep" / "train" if cfg.evaluate.probe else None,
                    probe_folds=cfg.evaluate.probe_folds, view_kind=cfg.evaluate.view, batch_size=16)
    marker = run_dir / "demo-done.json"
    key = {"run": marker.read_text(encoding="utf-8") if marker.is_file() else None,
           "model": _files_digest(run_dir / "model"), "data": _files_digest(test, ("index.jsonl",)),
           "tasks": cfg.tasks, "settings": {k: str(v) for k, v in settings.items()}, "code": _source_digest()}
    cache, done = eval_dir / "evaluation.pkl", eval_dir / "demo-done.json"
    if cache.is_file() and done.is_file():
        try:
            if json.loads(done.read_text(encoding="utf-8")).get("key") == key:
                with open(cache, "rb") as f:
                    return _EvaluationUnpickler(f).load(), True
        except Exception:  # noqa: BLE001 - any unreadable cache is recomputed
            pass
    ev = evaluate(run_dir, test, cfg.tasks, **settings)
    write_outputs(ev, eval_dir)
    with atomic_path(cache) as tmp:
        tmp.write_bytes(pickle.dumps(ev, protocol=pickle.HIGHEST_PROTOCOL))
    write_text_atomic(done, json.dumps({"key": key}, indent=2) + "\n")
    return ev, False


def run_demo(cfg: DemoConfig, out: Path, *, echo: Callable[[str], None] = print) -> DemoResult:
    """Run every stage of ``cfg`` into ``out`` (see the module docstring); returns the evaluations."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out)
    keys = [RunKey(r, s) for s in cfg.seeds for r in cfg.recipes]
    n_stages = 3 + len(keys)
    t_all = time.perf_counter()

    def stage(i: int, title: str) -> float:
        echo(f"[{i}/{n_stages}] {title}  (elapsed {time.perf_counter() - t_all:.0f} s)")
        return time.perf_counter()

    t = stage(1, f"synthetic cohorts: {cfg.cohort.train_cases} training + {cfg.cohort.test_cases} held-out cases")
    for split in ("train", "test"):
        _synth(cfg, out, split, echo)
    result.stage_seconds["synth"] = time.perf_counter() - t
    t = stage(2, f"preprocess ({cfg.preprocess} config, {cfg.anatomy} anatomies)")
    for split in ("train", "test"):
        _preprocess(cfg, out, split, echo)
    result.stage_seconds["preprocess"] = time.perf_counter() - t
    echo(f"  every run: {', '.join(cfg.train_overrides)}")
    for i, key in enumerate(keys):
        t = stage(3 + i, f"train {key.recipe} (seed {key.seed}) and evaluate it on the held-out cases")
        result.train_seconds[key] = _train(cfg, out, key, echo)
        t_eval = time.perf_counter()
        name = run_key_name(key, cfg)
        ev, earlier = _evaluate(cfg, out, name)
        result.evaluations[key] = ev
        m = ev.summary["macro"]
        how = "evaluated earlier" if earlier else f"evaluated in {time.perf_counter() - t_eval:.0f} s"
        echo(f"  {name}: macro AUC {m['auc']:.3f} over {m['n_tasks']} tasks "
             f"({how}); report {out / 'eval' / name / 'report.html'}"
             if m["auc"] is not None else f"  {name}: no macro AUC (no task with enough positives; {how})")
        result.stage_seconds[f"train+eval {name}"] = time.perf_counter() - t
    stage(n_stages, "comparison report")
    result.stage_seconds["total"] = time.perf_counter() - t_all
    return result
