"""The Python API: ``run``, ``compare`` and ``sweep`` for notebooks and scripts, returning the metrics.

Each function does what the command of the same name does (``flwr-scaling run``,
``compare``, ``sweep``), with the same checks and the same one-line errors,
raised as ``ConfigError`` instead of ending the process; the command line
calls these functions. Options are given as a ``RunConfig``, a mapping
(kebab-case keys, as in TOML files), keyword arguments
(snake_case), or several of these (keywords override the mapping)::

    import flwr_scaling
    result = flwr_scaling.run(precond="rmsprop", rounds=5, backend="inprocess", out="runs/rms")
    result.metrics[-1]["test_accuracy"]

Progress lines go to the ``flwr_scaling`` logger (stdout), as on the command line.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flwr_scaling.errors import ConfigError
from flwr_scaling.methods import DEFAULT_COMPARE, parse_label
from flwr_scaling.run.config import RunConfig
from flwr_scaling.run.config_files import check_output_folder
from flwr_scaling.run.outdir import claim_output
from flwr_scaling.run.ray_cluster import attach, check_address
from flwr_scaling.run.recorder import check_tensorboard, progress_logger, read_metrics

COMPARE_FIXED = {"strategy", "precond", "precond_mode", "lr", "out"}  # set per configuration by compare
DEFAULT_TARGET = 0.9
Rows = list[dict[str, float]]


@dataclass(frozen=True)
class RunResult:
    """What ``run`` returns: the rows of ``metrics.csv`` (one per round), the folder and the resolved options.

    ``rounds_run`` is how many rounds this call trained (0 when a resumed run was already complete).
    """

    metrics: Rows
    out: Path
    config: RunConfig
    rounds_run: int


@dataclass(frozen=True)
class StudyResult:
    """What ``compare`` and ``sweep`` return: each run's ``metrics.csv`` rows by its name, and the folder.

    The names are ``compare``'s labels (``fedavg``, ``savic-adam-global``) or a sweep's run names
    (``method=fedavg,seed=0``); the folder holds ``summary.md`` and the plots.
    """

    metrics: dict[str, Rows]
    out: Path


def options(config: RunConfig | Mapping[str, Any] | None = None, **keywords: Any) -> dict[str, Any]:
    """The options of ``config`` and ``keywords`` as one kebab-case mapping (keywords win), unchecked.

    A ``RunConfig`` contributes its fields that are not ``None``; a mapping's
    keys are kebab-case (as in TOML files), keywords snake_case. Unknown names
    are refused later, by ``RunConfig.from_mapping``, with a suggestion.
    """
    if isinstance(config, RunConfig):
        base = {key: value for key, value in config.to_dict().items() if value is not None}
    elif config is None:
        base = {}
    elif isinstance(config, Mapping):  # kebab-case keys, as in TOML files: a snake_case key is refused as there
        base = dict(config)
    else:
        raise ConfigError(f"config must be a RunConfig or a mapping of options, got {type(config).__name__}")
    return {**base, **{key.replace("_", "-"): value for key, value in keywords.items()}}


def run(config: RunConfig | Mapping[str, Any] | None = None, /, *, backend: str = "simulation",
        overwrite: bool = False, resume: str | Path | None = None, ray_address: str | None = None,
        verbose: bool = False, **keywords: Any) -> RunResult:
    """Run one configuration, as ``flwr-scaling run``; return its metrics.

    Parameters
    ----------
    config : RunConfig or mapping, optional
        The options; ``keywords`` (snake_case option names) override them.
    backend : {"simulation", "inprocess"}
        Flower's simulation engine (Ray), or the same apps in this process without Ray.
    overwrite : bool
        Replace another run's results in the output folder (refused otherwise).
    resume : str or Path, optional
        Continue the run in this folder from its checkpoint; options given must agree with it.
    ray_address : str, optional
        With the simulation backend: run on this Ray cluster.
    verbose : bool
        Show Flower's and Ray's logs.

    Returns
    -------
    RunResult
        ``metrics`` (the rows of ``OUT/metrics.csv``), ``out``, ``config``, ``rounds_run``.

    Raises
    ------
    ConfigError
        A bad option or folder, in one line, before any data is loaded.
    """
    from flwr_scaling.run.inprocess import BACKENDS, runner_for
    from flwr_scaling.run.simulation import preflight

    _check_backend(backend, BACKENDS)
    if ray_address is not None and backend != "simulation":
        raise ConfigError("--ray-address needs --backend simulation (in-process runs do not use Ray)")
    if ray_address is not None:
        check_address(ray_address)
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume exclude each other: a resumed run keeps its folder's results")
    given = options(config, **keywords)
    checkpoint = None
    log = progress_logger()
    if resume:
        cfg, checkpoint = resumed_config(str(resume), given)
        if checkpoint.round >= cfg.rounds:
            log.info(f"{resume}: all {cfg.rounds} rounds are done already; nothing to resume")
            return RunResult(read_metrics(Path(cfg.out) / "metrics.csv"), Path(cfg.out), cfg, 0)
        log.info(f"resuming {resume} after round {checkpoint.round} of {cfg.rounds}")
    else:
        cfg = RunConfig.from_mapping(given).resolved()
    check_output_folder(cfg.out)
    check_tensorboard(cfg.tensorboard)
    # The folder is locked and checked before the preflight, so a busy folder fails at once.
    with claim_output(cfg.out, overwrite=overwrite, resume=checkpoint is not None):
        preflight(cfg)
        if ray_address:  # Flower's Ray backend skips ray.init when Ray is initialised: it runs on the cluster
            attach(ray_address, verbose=verbose)
        rows = runner_for(backend)(cfg, verbose=verbose, resume=checkpoint)
    return RunResult(rows, Path(cfg.out), cfg, cfg.rounds - (checkpoint.round if checkpoint else 0))


def resumed_config(folder: str, given: Mapping[str, Any]):
    """The checkpoint's configuration in ``folder`` and the checkpoint; any option given that differs is refused."""
    from flwr_scaling.run.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(folder)
    saved = RunConfig.from_mapping(checkpoint.config)
    given = dict(given)
    if Path(str(given.pop("out", folder))).resolve() != Path(folder).resolve():
        raise ConfigError("--out and --resume name different folders; a run resumes in its own folder")
    for key, value in given.items():
        field = key.replace("-", "_")
        asked, kept = getattr(RunConfig.from_mapping({key: value}), field), getattr(saved, field)
        if asked != kept:
            raise ConfigError(
                f"--{key} {value} differs from the checkpoint's {key} = {kept}; a resumed run keeps its "
                f"configuration (start a new run in another folder instead)"
            )
    resolved = replace(saved, out=folder).resolved()
    check_model_layout(checkpoint.model, resolved, folder)
    return resolved, checkpoint


def check_model_layout(arrays: Mapping[str, Any], cfg: RunConfig, folder: str) -> None:
    """ConfigError (one line, before any work) when a checkpoint's model is not the one ``cfg`` builds."""
    from flwr_scaling.core.models import build_model
    from flwr_scaling.data.federated import load_federated_data

    data = load_federated_data(cfg.data_spec())
    expected = {key: tuple(value.shape) for key, value in
                build_model(cfg.model, data.input_shape, data.num_classes).state_dict().items()}
    held = {key: tuple(getattr(value, "shape", ())) for key, value in arrays.items()}
    if held != expected:
        differing = sorted(set(held) ^ set(expected)) or sorted(k for k in held if held[k] != expected[k])
        raise ConfigError(
            f"checkpoint {Path(folder) / 'checkpoint.npz'} holds another model than this run's {cfg.model} "
            f"(first difference: {differing[0]}); resume it with the configuration it was written with, or start "
            f"a new run in another folder"
        )


def compare(configs: Sequence[str] | str | None = None, config: RunConfig | Mapping[str, Any] | None = None, *,
            out: str | Path = "runs/compare", target_accuracy: float | str = DEFAULT_TARGET,
            backend: str = "simulation", overwrite: bool = False, verbose: bool = False,
            **keywords: Any) -> StudyResult:
    """Run several configurations on the same partition and seed, as ``flwr-scaling compare``.

    Parameters
    ----------
    configs : list of str, or a comma-separated str, optional
        Labels such as ``fedavg`` or ``savic-adam-local`` (default: the command's default list).
    config : RunConfig or mapping, optional
        The options common to every configuration; ``keywords`` override them.
        Method, rule, mode, step size and folder are set per label and refused here.
    out : str or Path
        The comparison's folder: ``summary.md``, ``accuracy.png`` and one folder per label.
    target_accuracy : float
        The accuracy whose first round the summary reports, in (0, 1].

    Returns
    -------
    StudyResult
        ``metrics`` by label, and ``out``.
    """
    from flwr_scaling.run.inprocess import BACKENDS, runner_for
    from flwr_scaling.run.simulation import preflight
    from flwr_scaling.studies.report import compare_title, write_compare_report

    _check_backend(backend, BACKENDS)
    target = _target(target_accuracy)
    labels = _labels(DEFAULT_COMPARE if configs is None else configs)
    common = options(config, **keywords)
    for name in sorted(COMPARE_FIXED):
        if RunConfig.key(name) in common:
            raise ConfigError(f"option {RunConfig.key(name)!r} is set per configuration by compare; remove it "
                              f"(choose methods with the configuration labels)")
    out = Path(out)
    resolved = {label: replace(RunConfig.from_mapping({**common, **parse_label(label)}),
                               out=str(out / label)).resolved() for label in labels}
    check_output_folder(str(out))
    for cfg in resolved.values():
        check_tensorboard(cfg.tensorboard)
    log = progress_logger()
    with contextlib.ExitStack() as claims:  # every folder is claimed and checked before the first run
        claims.enter_context(claim_output(out, overwrite=overwrite, what="compare",
                                          results=("summary.md",), outputs=("summary.md", "accuracy.png", "compare.json")))
        for cfg in resolved.values():
            check_output_folder(cfg.out)
            claims.enter_context(claim_output(cfg.out, overwrite=overwrite))
            preflight(cfg)
        runs = {}
        for index, (label, cfg) in enumerate(resolved.items(), start=1):
            log.info(f"== [{index}/{len(resolved)}] {label} (lr {cfg.lr:g}) ==")
            runs[label] = runner_for(backend)(cfg, verbose=verbose)
        write_compare_report(out, runs, {label: cfg.lr for label, cfg in resolved.items()}, target,
                             compare_title(next(iter(resolved.values())).to_dict()))
    return StudyResult(runs, out)


def sweep(path: str | Path, *, out: str | Path | None = None, backend: str | None = None, overwrite: bool = False,
          workers: int | str | None = None, cpus_per_run: float | str | None = None,
          gpus_per_run: float | str | None = None, ray_address: str | None = None) -> StudyResult:
    """Run every combination of a sweep file's grid, resumably, as ``flwr-scaling sweep``.

    Parameters
    ----------
    path : str or Path
        The sweep file (``[base]`` options and ``[grid]`` lists; see the README, Sweeps).
    out : str or Path, optional
        The sweep's folder (default: the file's ``out``, else ``runs/<file stem>``).
    backend, workers, cpus_per_run, gpus_per_run, ray_address
        As the command's options; ``None``: the file's setting, else the default.
    overwrite : bool
        Run again the finished runs whose configuration the file no longer describes.

    Returns
    -------
    StudyResult
        ``metrics`` of every run by its name, and ``out``.
    """
    from flwr_scaling.studies.state import METRICS, RUNS, SWEEP_JSON
    from flwr_scaling.studies.sweep import run_sweep

    parallel = {"workers": workers, "cpus-per-run": cpus_per_run, "gpus-per-run": gpus_per_run,
                "ray-address": ray_address}
    folder = run_sweep(str(path), None if out is None else str(out), backend=backend, overwrite=overwrite,
                       parallel=parallel)
    folder = Path(folder)
    # The plan the sweep wrote (re-reading the file would preflight every run again).
    names = [run["name"] for run in json.loads((folder / SWEEP_JSON).read_text(encoding="utf-8"))["runs"]]
    return StudyResult({name: read_metrics(folder / RUNS / name / METRICS) for name in names}, folder)


def _check_backend(backend: str, backends: Sequence[str]) -> None:
    if backend not in backends:
        raise ConfigError(f"backend must be one of {', '.join(backends)}, got {backend!r}")


def _target(value: float | str) -> float:
    try:
        target = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"target-accuracy must be a number, got {value!r}") from None
    if not 0 < target <= 1:
        raise ConfigError(f"target-accuracy must be in (0, 1], got {target}")
    return target


def _labels(configs: Sequence[str] | str) -> list[str]:
    text = configs if isinstance(configs, str) else ",".join(configs)
    labels = [label.strip() for label in text.split(",") if label.strip()]
    if not labels or len(set(labels)) != len(labels):
        raise ConfigError(f"--configs needs distinct configuration names, got {text!r}")
    return labels


__all__ = ["RunResult", "StudyResult", "options", "run", "compare", "sweep", "resumed_config", "COMPARE_FIXED"]
