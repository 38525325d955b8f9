"""Reports of finished runs: one pipeline for ``compare`` and for sweeps (``sweep``, ``report``).

Both commands turn their runs into groups (``outcomes.Group``: runs that differ
only in their seed; one run each for ``compare``), summarise every group with
``seed_group_summary`` and write ``summary.md`` with ``write_summary``. The
layouts differ only where the commands do: ``compare`` has one run per row
(``per_seed=False``: the first round reaching the target, no seed count), a
sweep a group of seeds per row (means ± std, how many seeds reached the
target, optional columns). ``compare`` draws ``accuracy.png`` with two panels;
a sweep adds ``results.csv``, ``summary.csv`` and one figure per quantity.
Only metrics.csv files (and a sweep's ``sweep.json`` and DONE markers, a
comparison's ``compare.json`` and ``config.json`` files) are read; regenerating
a report gives the same bytes. ``write_report`` (``flwr-scaling report``) rebuilds either kind.
Titles name the partitioner the runs used (``partition_text``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr_scaling.data.partitioners import describe as describe_partition
from flwr_scaling.run.config import ConfigError, RunConfig
from flwr_scaling.run.recorder import read_metrics, write_atomic
from flwr_scaling.studies.outcomes import Group, Rows, seed_group_summary
from flwr_scaling.errors import first_line
from flwr_scaling.studies.plan import METHOD, SEED, run_name, target_for, value_text
from flwr_scaling.studies.plots import plot_accuracy, plot_sweep
from flwr_scaling.studies.state import METRICS, RUNS, SWEEP_JSON, check_planned_runs, is_finished
from flwr_scaling.studies.statistics import honest_summary, paired_note_of_groups, reading_note

Summary = list[tuple[Group, dict[str, Any]]]  # each group with its seed_group_summary
# summary.csv: the statistics after the group's cells and seeds, in this order.
STATISTICS = ["n_seeds", "final_accuracy_mean", "final_accuracy_std", "best_accuracy_mean", "best_accuracy_std",
              "target_accuracy", "rounds_to_target_mean", "reached_target", "mb_to_target_mean", "mb_total_mean",
              "max_gamma_over_alpha", "final_gap_mean", "final_gap_std", "final_worst10_mean", "final_worst10_std",
              "tuning_score_mean", "tuning_score_std", "rounds_to_target_median", "mb_to_target_median"]
# What decides a run's partition of the data (a partition does not depend on the method).
COMPARE_JSON = "compare.json"  # a comparison's labels (in order) and target, for report
PARTITION_KEYS = ("dataset", "test-path", "partitioner", "dirichlet-alpha", "shard-classes", "num-clients",
                  "client-eval-every", "eval-split", "seed")


# ------------------------------------------------------------------ tables
def summarise(groups: Sequence[Group], target: float) -> Summary:
    """Every group with its statistics (``seed_group_summary``)."""
    return [(group, seed_group_summary(group.runs, target)) for group in groups]


def summary_table(summary: Summary, target: float, *, per_seed: bool, split: str = "test") -> list[str]:
    """The Markdown table of ``summary.md``, one line per group.

    ``per_seed=False`` (``compare``): accuracies and the first round reaching
    ``target`` of each single run. ``per_seed=True`` (sweeps): a seeds column,
    means ± std, the tuning score, rounds and MB to ``target`` (or each group's own) as medians over all
    seeds (``statistics.honest_summary``), optional columns (f − f*, worst clients' accuracy); "val acc" for validation.
    """
    cells_header = list(summary[0][0].cells) if summary else []
    acc = "val acc" if split == "validation" else "acc"
    targets = {stats.get("target_accuracy", target) for _, stats in summary}
    several = per_seed and len(targets) > 1
    shown = "target" if several else f"{target:g}"
    reach = f"rounds to {shown}" if per_seed else f"first round >= {target:g}"
    header = [*cells_header, *(["seeds"] if per_seed else []), *(["target"] if several else []), f"final {acc}",
              f"best {acc}", *([f"mean {acc} over rounds"] if per_seed else []), reach,
              f"MB to {shown}", "MB total", "max Γ/α"]
    extras = [(key, title) for key, title in (("final_gap", "final f − f*"), ("final_worst10", "final worst-10 % client acc"))
              if per_seed and all(stats[f"{key}_mean"] is not None for _, stats in summary)]
    header += [title for _, title in extras]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, stats in summary:
        n, reached = stats["n_seeds"], stats["reached_target"]
        if per_seed:
            rounds_text = stats["reach_text"]
            megabytes = stats["mb_to_target_median"]
        else:
            rounds_text = "never" if not reached else str(int(stats["rounds_to_target_mean"]))
            megabytes = math.inf if stats["mb_to_target_mean"] is None else stats["mb_to_target_mean"]
        cells = [*group.cells.values(), *([str(n)] if per_seed else []),
                 *([f"{stats['target_accuracy']:g}"] if several else []),
                 _pm(stats["final_accuracy_mean"], stats["final_accuracy_std"]),
                 _pm(stats["best_accuracy_mean"], stats["best_accuracy_std"]),
                 *([_pm(stats["tuning_score_mean"], stats["tuning_score_std"])] if per_seed else []),
                 rounds_text,
                 "-" if math.isinf(megabytes) else _fixed(megabytes, 2),
                 _fixed(stats["mb_total_mean"], 2),
                 f"{stats['max_gamma_over_alpha']:.3g}"]
        for key, _ in extras:
            mean, std = stats[f"{key}_mean"], stats[f"{key}_std"]
            cells.append(f"{mean:.3g}" + ("" if std is None else f" ± {std:.2g}") if key == "final_gap"
                         else _pm(mean, std))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_summary(out: Path, title: str, summary: Summary, target: float, *, per_seed: bool,
                  context: str = "", notes: Sequence[str] = (), split: str = "test") -> None:
    """``summary.md``: the title, the shared setting (``context``), the table, then each note as a paragraph."""
    lines = [f"# {title}", ""] + ([context, ""] if context else [])
    lines += summary_table(summary, target, per_seed=per_seed, split=split)
    for note in notes:
        lines += ["", note]
    write_atomic(out / "summary.md", "\n".join(lines) + "\n")


# ----------------------------------------------------------------- compare
def partition_text(config: Mapping[str, Any]) -> str:
    """How a run (kebab-case configuration) split the data, for titles: ``Dirichlet 0.5``, ``iid``,
    ``shard (2 classes per client)``; other partitioners as their registry entry describes them."""
    partitioner = config.get("partitioner") or "dirichlet"  # configurations saved before the option existed
    if partitioner == "dirichlet":
        return f"Dirichlet {float(config.get('dirichlet-alpha', 0.5)):g}"
    return describe_partition(RunConfig.from_mapping({key: config[key] for key in PARTITION_KEYS if key in config})
                              .partition_spec())


def compare_title(config: Mapping[str, Any]) -> str:
    """The title of a comparison of runs sharing the setting of ``config`` (kebab-case, resolved)."""
    return (f"{config['dataset']}, {config['model']}, {config['num-clients']} clients, {partition_text(config)}, "
            f"{config['local-epochs']} local epoch(s), seed {config['seed']}")


def write_compare_report(out: Path, runs: Mapping[str, Rows], lrs: Mapping[str, float], target: float,
                         title: str) -> None:
    """``compare``'s ``summary.md`` (one row per configuration), ``accuracy.png`` and ``compare.json`` in ``out``.

    ``runs`` maps each configuration's label to its metrics rows, ``lrs`` to its step size.
    ``compare.json`` (the labels in order and the target) lets ``report`` rebuild the same files.
    """
    groups = [Group(label, {"run": label, "lr": _number(lrs.get(label, math.nan))}, [rows])
              for label, rows in runs.items()]
    write_summary(out, title, summarise(groups, target), target, per_seed=False)
    plot_accuracy(runs, out / "accuracy.png", title, target)
    write_atomic(out / COMPARE_JSON, json.dumps({"labels": list(runs), "target-accuracy": target}, indent=2) + "\n")


def rebuild_compare_report(out_dir: str | Path, target: float | None = None) -> None:
    """Rebuild a ``compare`` folder's ``summary.md`` and ``accuracy.png`` from its runs' files (runs nothing).

    The labels and target (unless ``target`` is given) come from ``compare.json``; a folder written before
    that file existed gives every sub-folder with a finished run, by name, and
    the default target 0.9.
    """
    out = Path(out_dir)
    labels, planned = _compare_plan(out)
    target = planned if target is None else target
    runs, configs = {}, {}
    for label in labels:
        folder = out / label
        try:
            configs[label] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            runs[label] = read_metrics(folder / METRICS)
        except (OSError, ValueError) as problem:
            raise ConfigError(f"{folder}: not a finished run ({first_line(problem)})") from None
        if len(runs[label]) != int(configs[label].get("rounds", 0)):
            raise ConfigError(f"{folder}: {len(runs[label])} of {configs[label].get('rounds')} rounds in {METRICS}; "
                              f"finish the run first (run --resume {folder})")
    write_compare_report(out, runs, {label: float(c["lr"]) for label, c in configs.items()}, target,
                         compare_title(configs[labels[0]]))


def is_compare_folder(out: Path) -> bool:
    """``out`` was written by ``compare``: its ``compare.json``, or a ``summary.md`` over run sub-folders."""
    return (out / COMPARE_JSON).is_file() or (
        (out / "summary.md").is_file() and not (out / SWEEP_JSON).is_file() and bool(_run_folders(out)))


def write_report(out_dir: str | Path, target: float | None = None) -> str:
    """``flwr-scaling report``: rebuild a sweep's or a comparison's report; return which (``sweep``/``compare``).

    ``target``: the accuracy to count rounds and MB to (default: the one the folder was written with).
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise ConfigError(f"{out} is not a folder")
    if not (out / SWEEP_JSON).is_file() and is_compare_folder(out):
        rebuild_compare_report(out, target)
        return "compare"
    if target is None:
        write_sweep_report(out)
    else:
        write_sweep_report(out, target=target)
    return "sweep"


def _run_folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if (p / "config.json").is_file() and (p / METRICS).is_file())


def _compare_plan(out: Path) -> tuple[list[str], float]:
    plan_file = out / COMPARE_JSON
    if not plan_file.is_file():
        labels = _run_folders(out)
        if not labels:
            raise ConfigError(f"{out} holds no finished runs to report")
        return labels, 0.9
    try:
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
        labels, target = [str(label) for label in plan["labels"]], float(plan["target-accuracy"])
    except (ValueError, KeyError, TypeError) as problem:
        raise ConfigError(f"{plan_file} is not a comparison description: {first_line(problem)}") from None
    if not labels:
        raise ConfigError(f"{plan_file} names no runs")
    return labels, target


# ------------------------------------------------------------------- sweeps
def write_sweep_report(out_dir: str | Path, target: float | None = None) -> None:
    """Tables and plots of the finished runs in the sweep folder ``out_dir``. Only reads; never runs anything.

    Writes (atomically) ``results.csv`` (one row per run and round: the grid
    values, then every metrics.csv column), ``summary.csv`` and ``summary.md``
    (one row per group of runs that differ only in their seed; with several
    methods run on the same seeds, their paired differences from the baseline
    with bootstrap intervals, ``statistics.py``) and
    ``accuracy.png``, ``accuracy_vs_mb.png``, ``gamma_over_alpha.png``. The
    tables depend on the run files alone: regenerating them gives the same bytes.
    ``target``: one target accuracy for every group instead of the sweep file's (``report --target``).
    """
    out = Path(out_dir)
    name, planned, grid, runs = _read_plan(out)
    planned = planned if target is None else target
    done = [is_finished(out / RUNS / run["name"], run["config"]) for run in runs]
    finished = [run for run, ok in zip(runs, done) if ok]
    missing = [run["name"] for run, ok in zip(runs, done) if not ok]
    if not finished:
        raise ConfigError(f"{out}: no finished runs yet (0 of {len(runs)}); nothing to report (a run is finished when "
                          f"its folder has a DONE marker and a metrics.csv of every round: run the sweep to finish them)")
    rows = {run["name"]: read_metrics(out / RUNS / run["name"] / METRICS) for run in finished}
    _write_results(out, list(grid), finished)

    group_keys = [key for key in grid if key != SEED]
    groups = _seed_groups(finished, rows, grid, group_keys)
    alphas = [g.values[group_keys.index("dirichlet-alpha")] if "dirichlet-alpha" in group_keys
              else finished[0]["config"].get("dirichlet-alpha", 0.5) for g in groups]  # per-alpha targets
    targets = [target_for(planned, alpha) for alpha in alphas]
    target = targets[0]
    summary = [(g, {**seed_group_summary(g.runs, t), **honest_summary(g.runs, t)}) for g, t in zip(groups, targets)]
    split = "validation" if all(r["config"].get("eval-split") == "validation" for r in finished) else "test"
    seeds_of = {group.label: " ".join(map(str, group.seeds)) for group, _ in summary}
    csv_rows = [{**group.cells, "seeds": seeds_of[group.label],
                 **{key: _number(value) for key, value in stats.items()}} for group, stats in summary]
    columns = [*(summary[0][0].cells), "seeds", *STATISTICS]
    write_atomic(out / "summary.csv", _csv(columns, csv_rows))

    context = _common_context([run["config"] for run in runs])
    notes = [reading_note(split, "the target" if len(set(targets)) > 1 else f"{target:g}")]
    notes += paired_note_of_groups(groups, group_keys, METHOD)  # each method vs fedavg, paired over seeds
    partitions = _collect_partition_plots(out, finished)
    if partitions:
        notes.append("Label distribution of each client (one heatmap per distinct partition): "
                     + ", ".join(f"[{name}](partitions/{name}.png)" for name in partitions))
    if missing:
        notes.append(f"Not finished ({len(missing)} of {len(runs)} runs): " + ", ".join(missing))
    write_summary(out, f"Sweep {name}", summary, target, per_seed=True, context=context, notes=notes, split=split)
    plot_sweep(out, name, [group for group, _ in summary], grid[group_keys[0]] if group_keys else [], target, context)


def _read_plan(out: Path) -> tuple[str, float | dict[str, float], dict[str, list[Any]], list[dict[str, Any]]]:
    """The sweep's name, target accuracy (or per-alpha targets), grid and planned runs, from its ``sweep.json``."""
    spec_file = out / SWEEP_JSON
    if not spec_file.is_file():
        raise ConfigError(f"{out} is not a sweep folder: {SWEEP_JSON} is missing (run the sweep first)")
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        planned = spec["target-accuracy"]
        target = ({str(k): float(v) for k, v in planned.items()} if isinstance(planned, dict) else float(planned))
        grid = {key: list(values) for key, values in spec["grid"].items()}
        runs = list(spec["runs"])
        name = str(spec.get("name", out.name))
    except (ValueError, KeyError, TypeError, AttributeError) as problem:
        raise ConfigError(f"{spec_file} is not a sweep description: {first_line(problem)}") from None
    check_planned_runs(spec_file, runs, grid)
    return name, target, grid, runs


def _write_results(out: Path, keys: Sequence[str], finished: Sequence[Mapping[str, Any]]) -> None:
    """``results.csv``: every round of every finished run, the metrics as written (no re-formatting),
    the run's name and grid values in front."""
    metric_columns: list[str] = []
    result_rows = []
    for run in finished:
        with open(out / RUNS / run["name"] / METRICS, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            metric_columns += [c for c in reader.fieldnames or [] if c not in metric_columns]
            result_rows += [{"run": run["name"], **{k: value_text(run["values"][k]) for k in keys}, **row}
                            for row in reader]
    write_atomic(out / "results.csv", _csv(["run", *keys, *metric_columns], result_rows))


def _seed_groups(finished: Sequence[Mapping[str, Any]], rows: Mapping[str, Rows], grid: Mapping[str, list[Any]],
                 group_keys: Sequence[str]) -> list[Group]:
    """The finished runs grouped by their grid values but the seed, in grid order; runs by seed within."""
    members: dict[tuple, list[Mapping[str, Any]]] = {}
    for run in finished:
        members.setdefault(tuple(run["values"][k] for k in group_keys), []).append(run)
    position = {key: {json.dumps(v): i for i, v in enumerate(grid[key])} for key in group_keys}
    ordered = sorted(members, key=lambda g: [position[k][json.dumps(v)] for k, v in zip(group_keys, g)])
    groups = []
    for values in ordered:
        runs = sorted(members[values], key=lambda r: r["config"]["seed"])
        if group_keys:
            label = ", ".join(str(v) if k == METHOD else f"{k}={value_text(v)}" for k, v in zip(group_keys, values))
        else:
            label = RunConfig.from_mapping(runs[0]["config"]).label()
        cells = {k: value_text(v) for k, v in zip(group_keys, values)}
        if "lr" not in group_keys:
            cells["lr"] = _number(runs[0]["config"]["lr"])
        for key, plain in (("server-lr", 1.0), ("server-momentum", 0.0)):  # shown when some run sets them
            if key not in group_keys and any(float(r["config"].get(key, plain)) != plain for r in finished):
                cells[key] = _number(runs[0]["config"].get(key, plain))
        groups.append(Group(label, cells, [rows[r["name"]] for r in runs], values,
                            [r["config"]["seed"] for r in runs]))
    return groups


def _collect_partition_plots(out: Path, runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """One label-distribution heatmap per distinct partition of the finished runs, in ``OUT/partitions/``,
    named by the settings that make the partition (a partition does not depend on the method)."""
    folder = out / "partitions"
    wanted = {}
    for run in runs:
        config = run["config"]
        varying = {key: config.get(key) for key in PARTITION_KEYS}
        name = run_name({k: v for k, v in varying.items() if k in ("partitioner", "dirichlet-alpha",
                                                                     "num-clients", "seed")})
        source = out / RUNS / run["name"] / "partitions.png"
        if name not in wanted and source.is_file():
            wanted[name] = source
    if not wanted:
        return []
    folder.mkdir(exist_ok=True)
    for name, source in wanted.items():
        target = folder / f"{name}.png"
        data = source.read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, target)
    return list(wanted)


def _common_context(configs: Sequence[Mapping[str, Any]]) -> str:
    """The setting shared by every run (for titles): dataset, model, clients, split, epochs, rounds."""
    parts = []
    for key, show in (("dataset", "{}"), ("model", "{}"), ("num-clients", "{} clients"),
                      ("clients-per-round", "{} per round"), ("partition", "{}"),
                      ("local-epochs", "{} local epoch(s)"), ("rounds", "{} rounds")):
        if key == "partition":  # the partitioner actually used (iid, shard k, Dirichlet alpha), if all share it
            splits = {partition_text(c) for c in configs}
            if len(splits) == 1:
                parts.append(splits.pop())
            continue
        values = {json.dumps(c.get(key)) for c in configs}
        if len(values) == 1 and configs[0].get(key) is not None:
            if key == "clients-per-round" and configs[0].get(key) == configs[0].get("num-clients"):
                continue
            parts.append(show.format(configs[0][key]))
    return ", ".join(parts)


# ---------------------------------------------------------------- formats
def _csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _number(value: Any) -> str:
    """A number for the tables: integers as such, floats to 6 significant digits, None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.6g}"
    return str(value)


def _fixed(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def _pm(mean: float, std: float | None) -> str:
    """``mean ± std`` to 3 decimals; the mean alone for a single run."""
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


__all__ = ["Summary", "summarise", "summary_table", "write_summary", "write_compare_report", "write_sweep_report",
           "compare_title", "partition_text", "rebuild_compare_report", "is_compare_folder", "write_report",
           "COMPARE_JSON"]
