"""`sideways compare`: which runs to train (modes x sweep grid, plus variants), which finished ones
to reuse or read, how their configs differ, and their numbers as compare.json and compare.csv.

Everything a user can get wrong is refused while planning, before the first run trains: a typo in
the last --sweep value must not cost the time the first runs took.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sideways_cli.analyses.fidelity import run_fidelity
from sideways_cli.config import MODES, Config, current_key, flat_dict, valid_keys
from sideways_cli.data.catalog import resolve_dataset
from sideways_cli.reports.plots import compare_png, sweep_png
from sideways_cli.reports.progress import Log
from sideways_cli.reports.tables import compare_table, format_value, mean_below_head, write_csv, write_json
from sideways_cli.run import isolated
from sideways_cli.run.build import resolve_config
from sideways_cli.run.resume import MAY_DIFFER, config_differences
from sideways_cli.run.rundir import FinishedRun, RunDir
from sideways_cli.support.errors import UserError

# Settings not warned about: those that cannot change a run's numbers, and the device (resuming
# compares it once resolved; runs on different devices are a comparison worth making).
IGNORED_KEYS = frozenset(MAY_DIFFER) | {"device"}
# the classification and the reconstruction metrics: a run leaves the other task's empty
SUMMARY_COLUMNS = ("train_loss", "val_clip_top1", "val_clip_top5", "val_video_top1", "val_video_top5",
                   "val_mean_class_acc", "val_mse", "val_psnr", "val_ema_clip_top1",
                   "val_ema_video_top1", "val_ema_psnr", "frames_per_s", "peak_mem_mb", "wall_s")


@dataclass
class PlannedRun:
    name: str
    run_dir: Path
    cfg: Config
    variant: bool  # a --variant run: one setting on top of the base config, not a point of the sweep


@dataclass
class Plan:
    runs: list[PlannedRun]
    compared: list[str]  # mode, swept keys, variant keys, --keys
    swept: list[str]


@dataclass
class RunResult(FinishedRun):
    """A finished run in a comparison, with what the comparison measures of it."""

    variant: bool = False
    fidelity: list[dict[str, Any]] | None = None  # per-module rows of gradient_fidelity
    fidelity_mean: float | None = None
    tick_fidelity_mean: float | None = None  # the mean of the modules' tick_cosine below the head


def parse_modes(text: str | None) -> list[str]:
    modes = [m.strip() for m in (text or "bp,sideways").split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise UserError(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    if not modes or len(set(modes)) < len(modes):
        raise UserError(f"--modes takes each of {', '.join(MODES)} at most once, got {text!r}")
    return modes


def _validate_key(key: str, option: str) -> str:
    key = current_key(key)
    if key == "mode":
        raise UserError(f"{option}: the mode is chosen with --modes, not {option}")
    if key not in valid_keys():
        raise UserError(f"{option}: unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
    return key


def parse_keys(text: str | None) -> list[str]:
    """--keys K1,K2: config keys to show as columns and to leave out of the difference warning."""
    keys = [k.strip() for k in (text or "").split(",") if k.strip()]
    # mode is always compared; naming it is harmless
    return [key if key == "mode" else _validate_key(key, "--keys") for key in keys]


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """KEY=v1,v2,... -> (KEY, ["KEY=v1", "KEY=v2", ...]), overrides parsed later like --set."""
    key, sep, values = text.partition("=")
    raws = [v.strip() for v in values.split(",")]
    if not sep or not key.strip() or not all(raws):
        raise UserError(f"--sweep expects KEY=V1,V2,... with no empty value, got {text!r}")
    key = _validate_key(key.strip(), "--sweep")
    return key, [f"{key}={raw}" for raw in raws]


def parse_variant(text: str) -> list[str]:
    """KEY=V[,KEY2=V2] -> ["KEY=V", "KEY2=V2"]: the settings of one extra run per mode."""
    overrides, keys = [], []
    for part in text.split(","):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise UserError(f"--variant expects KEY=V[,KEY2=V2], got {text!r}")
        keys.append(_validate_key(key.strip(), "--variant"))
        overrides.append(f"{key.strip()}={raw.strip()}")
    if len(set(keys)) < len(keys):
        raise UserError(f"--variant {text!r} sets a key twice")
    return overrides


SIDEWAYS_KEYS = "sideways."  # the Sideways engine's settings, which BP runs without


def _key_of(override: str) -> str:
    return override.partition("=")[0].strip()


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def run_name(mode: str, settings: dict[str, Any], compared: list[str]) -> str:
    """mode, then '-leaf=value' per setting ('sideways-frame_stride=2'); the full key where two
    compared keys share a leaf; characters a folder name should not hold become '_'."""
    leaves = [k.rsplit(".", 1)[-1] for k in compared]
    parts = [mode]
    for key, value in settings.items():
        leaf = key.rsplit(".", 1)[-1]
        parts.append(f"{key if leaves.count(leaf) > 1 else leaf}={format_value(value)}")
    return re.sub(r"[^\w.=+-]", "_", "-".join(parts))


def plan_training(config_path: Path | None, base: list[str], modes: list[str], sweeps: list[str],
                  variants: list[str], keys: list[str], out_dir: Path) -> Plan:
    """Resolve and validate the config of every run; nothing is trained or written."""
    axes = [parse_sweep(text) for text in sweeps]
    swept = [key for key, _ in axes]
    variant_sets = [parse_variant(text) for text in variants]
    for key in swept:
        if swept.count(key) > 1:
            raise UserError(f"--sweep names {key} twice; give all its values in one --sweep")
        if key in map(_key_of, base):
            raise UserError(f"{key} is both swept and fixed by --set/--seed; drop one of them")
    variant_keys = _unique([_key_of(o) for overrides in variant_sets for o in overrides])
    compared = _unique(["mode", *swept, *variant_keys, *keys])
    points = [(list(combo), False) for combo in itertools.product(*(values for _, values in axes))]
    points += [(overrides, True) for overrides in variant_sets]
    runs, seen = [], {}
    for mode in modes:
        for overrides, variant in points:
            if mode == "bp":  # no Sideways setting changes BP's numbers: one run stands for all
                kept = [o for o in overrides if not _key_of(o).startswith(SIDEWAYS_KEYS)]
                if variant and overrides and not kept:  # a variant of Sideways settings only
                    continue
                overrides = kept
            cfg = resolve_config(config_path, [*base, f"mode={mode}", *overrides])
            flat = flat_dict(cfg)
            name = run_name(mode, {k: flat[k] for k in map(_key_of, overrides)}, compared)
            if name in seen and mode == "bp" and seen[name] == (" ".join(overrides) or "the base config"):
                continue
            if name in seen:
                raise UserError(f"two runs would share {out_dir / name} ({seen[name]} and "
                                f"{' '.join(overrides)}); drop the repeated value or variant")
            seen[name] = " ".join(overrides) or "the base config"
            runs.append(PlannedRun(name, out_dir / name, cfg, variant))
    return Plan(runs, compared, swept)


def is_finished(run: PlannedRun) -> bool:
    """True when run_dir already holds this run, finished; refuses a finished run of another config
    (resuming into it would mix two experiments under one name)."""
    if not RunDir(run.run_dir).is_finished():
        return False
    changed = config_differences(RunDir(run.run_dir).read_config(), run.cfg)  # what train would refuse
    if changed:
        raise UserError(f"{run.run_dir} holds a finished run of another config "
                        f"({', '.join(changed[:3])}); compare into a new --out")
    return True


def train_all(plan: Plan, quiet: bool, log: Log,
              restart: bool = False) -> list[RunResult]:
    """Train each planned run in its own process, reusing those already finished (``restart``:
    none; each is trained from scratch). An unfinished run resumes from its last checkpoint."""
    # all refusals before any training
    finished = [False] * len(plan.runs) if restart else [is_finished(run) for run in plan.runs]
    prepared: list[Any] = []
    for run, done in zip(plan.runs, finished):
        if done:
            log(f"reusing {run.run_dir}")
            continue
        if run.cfg.data not in prepared:  # prepare (e.g. generate) each dataset once, here
            resolve_dataset(run.cfg.data, progress=not quiet)
            prepared.append(run.cfg.data)
        # its own process, so peak memory and speed are measured from the same start
        isolated.train_isolated(run.cfg, run.run_dir, quiet=quiet, restart=restart)
    return [read_run(run.run_dir, run.name, run.variant) for run in plan.runs]


def read_run(run_dir: Path, name: str | None = None, variant: bool = False) -> RunResult:
    return RunResult(**vars(RunDir(run_dir).read_finished(name)), variant=variant)


def refuse_with_runs(options: dict[str, Any]) -> None:
    """--runs reads finished runs: an option that would shape training means a mix-up."""
    given = [name for name, value in options.items() if value is not None and value != []]
    if given:
        raise UserError(f"--runs compares finished runs and trains nothing; drop {', '.join(given)}")


def read_runs(run_dirs: list[Path], keys: list[str]) -> tuple[list[RunResult], list[str]]:
    """Finished runs, named after their folders (with the parent where two folders share a name)."""
    if len(set(map(Path.resolve, run_dirs))) < len(run_dirs):
        raise UserError("--runs names a run directory twice; give each once")
    names = [d.name for d in run_dirs]
    runs = [read_run(d, str(d) if names.count(d.name) > 1 else d.name) for d in run_dirs]
    return runs, _unique(["mode", *keys])


def add_fidelity(runs: list[RunResult], progress: bool) -> None:
    for run in runs:
        run.fidelity = run_fidelity(run.run_dir, progress=progress)
        run.fidelity_mean = mean_below_head(run.fidelity)
        run.tick_fidelity_mean = mean_below_head(run.fidelity, "tick_cosine")


def differences(runs: list[RunResult], compared: list[str]) -> dict[str, dict[str, Any]]:
    """{key: {run: value}} for every setting that differs across runs but is not compared."""
    keys = _unique([k for run in runs for k in run.config])
    return {key: {run.name: run.config.get(key) for run in runs} for key in keys
            if key not in compared and key not in IGNORED_KEYS
            and len({json.dumps(run.config.get(key)) for run in runs}) > 1}


def difference_warnings(diffs: dict[str, dict[str, Any]]) -> list[str]:
    return [f"runs also differ in {key}, which is not compared: "
            + ", ".join(f"{format_value(v)} in {name}" for name, v in values.items())
            for key, values in diffs.items()]


FOLD_KEY = "data.fold"


def fold_means(runs: list[RunResult], swept: list[str]) -> list[dict[str, Any]]:
    """With ``data.fold`` swept, the mean over folds of every summary metric, one entry per mode
    (and per value of the other swept keys): the number papers report for UCF101 and HMDB51."""
    if FOLD_KEY not in swept:
        return []
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        if not run.variant:
            others = {k: run.config[k] for k in swept if k != FOLD_KEY}
            groups.setdefault(json.dumps([run.summary["mode"], others]), []).append(run)
    means = []
    for key, members in groups.items():
        mode, others = json.loads(key)
        entry: dict[str, Any] = {"mode": mode, "task": members[0].summary.get("task", "classify"),
                                 "settings": others, "folds": [m.config[FOLD_KEY] for m in members]}
        for column in SUMMARY_COLUMNS:
            values = [m.summary[column] for m in members if column in m.summary]
            if len(values) == len(members):
                entry[column] = sum(values) / len(values)
        means.append(entry)
    return means


def write_compare_json(path: Path, runs: list[RunResult], compared: list[str], swept: list[str],
                       diffs: dict[str, dict[str, Any]]) -> None:
    entries = []
    for run in runs:
        entry = {"name": run.name, "run_dir": str(run.run_dir),
                 "settings": {k: run.config.get(k) for k in compared}, "summary": run.summary}
        if run.fidelity is not None:
            entry.update(fidelity=run.fidelity, fidelity_mean=run.fidelity_mean,
                         tick_fidelity_mean=run.tick_fidelity_mean)
        entries.append(entry)
    write_json(path, {"runs": entries, "compared": compared, "swept": swept, "differences": diffs,
                      "fold_means": fold_means(runs, swept)})


def write_compare_csv(path: Path, runs: list[RunResult], compared: list[str]) -> None:
    """One row per run: name, mode, each compared key, the summary metrics, fidelity if measured."""
    keys = [k for k in compared if k != "mode"]
    modules = _unique([f"fidelity_{row['name']}" for run in runs for row in run.fidelity or []])
    fidelity = ["fidelity_mean", "tick_fidelity_mean", *modules] if any(run.fidelity for run in runs) else []
    rows = []
    for run in runs:
        cosines = {f"fidelity_{row['name']}": row["cosine"] for row in run.fidelity or []}
        cosines["fidelity_mean"] = run.fidelity_mean
        cosines["tick_fidelity_mean"] = run.tick_fidelity_mean
        rows.append([run.name, run.summary["mode"], *(format_value(run.config.get(k)) for k in keys),
                     *(run.summary.get(k, "") for k in SUMMARY_COLUMNS),
                     *("" if cosines.get(k) is None else cosines[k] for k in fidelity)])
    write_csv(path, ["run", "mode", *keys, *SUMMARY_COLUMNS, *fidelity], rows)


def write_outputs(out_dir: Path, runs: list[RunResult], compared: list[str], swept: list[str],
                  diffs: dict[str, dict[str, Any]]) -> list[Path]:
    """compare.json, compare.csv, compare.png and, with a sweep, sweep.png; returns their paths."""
    paths = [out_dir / name for name in ("compare.json", "compare.csv", "compare.png", "sweep.png")]
    write_compare_json(paths[0], runs, compared, swept, diffs)
    write_compare_csv(paths[1], runs, compared)
    compare_png(runs, paths[2])
    if not swept:
        paths[3].unlink(missing_ok=True)  # a stale one would contradict compare.json
        return paths[:3]
    sweep_png(runs, swept, paths[3])
    return paths


def table(runs: list[RunResult], compared: list[str], with_fidelity: bool):
    """The rich table: a column per compared key, a run column only where those settings leave
    two runs looking alike (e.g. --runs of two bp runs)."""
    settings = [{k: run.config.get(k) for k in compared} for run in runs]
    alike = len({json.dumps(s, sort_keys=True) for s in settings}) < len(runs)
    return compare_table([run.summary for run in runs], settings=settings,
                         names=[run.name for run in runs] if alike else None,
                         fidelity=[(run.fidelity_mean, run.tick_fidelity_mean) for run in runs]
                         if with_fidelity else None)
