"""``flwr-scaling``: run one configuration, or compare several on the same partition."""

from __future__ import annotations

import argparse
import difflib
import sys
import time
from dataclasses import fields
from pathlib import Path

from flwr_scaling.api import COMPARE_FIXED  # the options compare sets per configuration
from flwr_scaling.run.config import ConfigError, RunConfig
from flwr_scaling.run.config_files import check_output_folder, load_toml
from flwr_scaling.run.outdir import claim_output
from flwr_scaling.run.ray_cluster import ADDRESS_HELP
from flwr_scaling.cli_errors import PREFIX, check_path_arguments, exit_on_failure
from flwr_scaling.cli_help import compare_labels_help, option_help, option_metavars
from flwr_scaling.methods import DEFAULT_COMPARE, parse_label  # noqa: F401  (parse_label: tests import it from here)

VERBOSE_HELP = "show the traceback of an error (and, for runs, Flower's and Ray's logs)"
OVERWRITE_HELP = ("replace the results of another run in the output folder (without it such a folder is refused; "
                  "the old files are kept until the new run has finished a round)")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line on stderr with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            bad = message.split(":", 1)[1].split()[0]
            known = [o for a in self._actions for o in a.option_strings]
            close = difflib.get_close_matches(bad.split("=")[0], known, n=1)
            if close:
                message += f"; did you mean {close[0]}?"
        fail(message)


def fail(message: str) -> None:
    print(PREFIX + message, file=sys.stderr)
    raise SystemExit(2)


def _add_run_options(parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    help_text, metavars = option_help(), option_metavars()
    for field in fields(RunConfig):
        if field.name in skip:
            continue
        # Every value is parsed by RunConfig, so that the command line, TOML
        # files and Flower's run config give the same errors; a choice option's
        # usage shows its valid values rather than a placeholder.
        parser.add_argument(f"--{RunConfig.key(field.name)}", dest=field.name, default=None,
                            metavar=metavars.get(field.name), help=help_text[field.name])


def _given(args: argparse.Namespace, skip: set[str] = frozenset()) -> dict[str, object]:
    """Options from ``--config FILE.toml``, overridden by those on the command line."""
    values: dict[str, object] = load_toml(args.config) if getattr(args, "config", None) else {}
    for name in skip:
        if RunConfig.key(name) in values:
            raise ConfigError(f"option {RunConfig.key(name)!r} in {args.config} is set per configuration here; remove it")
    if values:
        try:  # names and types only (cross-option checks come later, with the command line's values): names the file
            RunConfig.from_mapping(values)
        except ConfigError as error:
            raise ConfigError(f"config file {args.config!r}: {error}") from None
    values.update(
        {
            RunConfig.key(f.name): getattr(args, f.name)
            for f in fields(RunConfig)
            if f.name not in skip and getattr(args, f.name, None) is not None
        }
    )
    return values


def _add_backend(parser: argparse.ArgumentParser, default: str | None = "simulation") -> None:
    from flwr_scaling.run.inprocess import BACKENDS

    where = "Default: simulation" if default else "Default: the file's backend, else simulation"
    parser.add_argument("--backend", choices=BACKENDS, default=default,
                        help="simulation (Flower's simulation engine, Ray) or inprocess (the same ServerApp and "
                             f"ClientApp code in this process, clients one after another, no Ray start-up). {where}")


def _installed_version() -> str:
    """The version of the installed package (its metadata), so that it is written in one place: pyproject.toml."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flwr-scaling")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="flwr-scaling", description="Scaled Local SGD (SAVIC) on Flower's simulation engine.",
                           allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_installed_version()}")
    parser.add_argument("--verbose", dest="verbose_everywhere", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    run = sub.add_parser("run", help="run one configuration", allow_abbrev=False)
    run.add_argument("--config", help="TOML file of options (kebab-case keys); command-line options override it")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_run_options(run)
    run.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    _add_backend(run)
    run.add_argument("--ray-address", metavar="ADDR", help=f"with --backend simulation: the {ADDRESS_HELP}")
    compare = sub.add_parser("compare", help="run several configurations on the same partition and seed",
                             allow_abbrev=False)
    compare.add_argument("--configs", metavar="LABEL,...", default=",".join(DEFAULT_COMPARE),
                         help=f"{compare_labels_help()}. Default: {','.join(DEFAULT_COMPARE)}")
    compare.add_argument("--out", default="runs/compare", help="output folder. Default: runs/compare")
    compare.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    compare.add_argument("--target-accuracy", default="0.9", help="accuracy whose first round is reported. Default: 0.9")
    compare.add_argument("--config", help="TOML file of the common options; command-line options override it")
    _add_run_options(compare, skip=COMPARE_FIXED)
    compare.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    _add_backend(compare)
    sweep = sub.add_parser("sweep", help="run every combination of a grid of options (TOML file), resumably",
                           allow_abbrev=False)
    sweep.add_argument("file", help="sweep file: [base] options and [grid] lists (see README, Sweeps)")
    sweep.add_argument("--out", help="output folder. Default: the file's 'out', else runs/<file stem>")
    sweep.add_argument("--dry-run", action="store_true", help="check the file and list the runs; run nothing")
    sweep.add_argument("--overwrite", action="store_true",
                       help="run again the runs that finished with another configuration than the file's "
                            "(without it the sweep is refused; finished runs of the same configuration are always kept)")
    _add_backend(sweep, default=None)
    sweep.add_argument("--workers", metavar="N", help="run N runs at a time as Ray tasks (each in-process). "
                       "Default: the file's workers, else one after another in this process")
    sweep.add_argument("--cpus-per-run", metavar="C", help="Ray CPUs per run with --workers. Default: the file's, else 1")
    sweep.add_argument("--gpus-per-run", metavar="F", help="Ray GPUs per run with --workers (fractions share a GPU). "
                       "Default: the file's, else 0")
    sweep.add_argument("--ray-address", metavar="ADDR", help=f"run the sweep's runs on the {ADDRESS_HELP}")
    deploy = sub.add_parser("deploy-local", help="run on a real SuperLink and N real SuperNodes on this machine",
                            allow_abbrev=False)
    deploy.add_argument("--nodes", default="2", help="number of SuperNodes (each one client). Default: 2")
    deploy.add_argument("--insecure", action="store_true",
                        help="no TLS and no node authentication (default: TLS with a fresh CA, registered node keys)")
    deploy.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    deploy.add_argument("--workdir", help="folder for certificates, keys, logs and Flower's home. Default: OUT/deploy")
    deploy.add_argument("--config", help="TOML file of run options; command-line options override it")
    _add_run_options(deploy, skip={"num_clients"})
    certs = sub.add_parser("make-certs", help="make a CA and a server certificate and key for the SuperLink (TLS)",
                           allow_abbrev=False)
    certs.add_argument("--host", action="append", required=True,
                       help="host name or IP address the SuperNodes dial (repeat for several)")
    certs.add_argument("--out", default="certs", help="output folder. Default: certs")
    node_key = sub.add_parser("make-node-key", help="make a SuperNode key pair (register the .pub on the SuperLink)",
                              allow_abbrev=False)
    node_key.add_argument("--name", default="node", help="file name of the key. Default: node")
    node_key.add_argument("--out", default="keys", help="output folder. Default: keys")
    report = sub.add_parser("report", help="rebuild the tables and plots of a sweep or a comparison from its results "
                            "(runs nothing)")
    report.add_argument("dir", help="the output folder of a sweep or of compare")
    report.add_argument("--target", metavar="T", help="accuracy the rounds and MB to target are counted to "
                        "(one number in (0, 1]). Default: the sweep file's target-accuracy")
    tune = sub.add_parser("tune", help="choose each method's step sizes on a validation split (grid search over "
                          "sweep runs); writes [method-options] tables for sweep files", allow_abbrev=False)
    tune.add_argument("file", help="a sweep file with a [tune] table (see README, Tuning)")
    tune.add_argument("--out", help="output folder of the tuning sweeps (one per method). Default: OUT/tune, "
                      "OUT the file's 'out', else runs/<file stem>")
    tune.add_argument("--write", metavar="FILE", help="TOML file the chosen [method-options] tables are written to. "
                      "Default: OUT/tuned.toml")
    _add_backend(tune, default=None)
    tune.add_argument("--workers", metavar="N", help="run N runs at a time as Ray tasks, as for sweep")
    tune.add_argument("--ray-address", metavar="ADDR", help=f"run the tuning runs on the {ADDRESS_HELP}")
    data = sub.add_parser("data", help="download a dataset of the study from its public source and check its "
                          "SHA256", allow_abbrev=False)
    data.add_argument("name", help="a9a, mushrooms, mnist-t10k, or all")
    data.add_argument("--out", default="data", help="folder the files go to (NAME/FILE inside). Default: data")
    data.add_argument("--mirror", metavar="URL", help="fetch MIRROR/NAME/FILE instead of the public sources "
                      "(e.g. file:///path/to/copy)")
    for command in sub.choices.values():  # --verbose is accepted by every command, before or after its name
        if "--verbose" not in command._option_string_actions:
            command.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def _run(args: argparse.Namespace) -> None:
    from flwr_scaling.api import run

    start = time.perf_counter()
    result = run(_given(args), backend=args.backend, overwrite=args.overwrite, resume=args.resume,
                 ray_address=args.ray_address, verbose=args.verbose)
    if result.rounds_run:
        print(f"done in {time.perf_counter() - start:.1f} s: final test accuracy "
              f"{result.metrics[-1]['test_accuracy']:.3f}; results in {result.out}/ (config.json, metrics.csv)")


def _compare(args: argparse.Namespace) -> None:
    from flwr_scaling.api import compare

    start = time.perf_counter()
    out = compare(args.configs, _given(args, skip=COMPARE_FIXED), out=args.out, target_accuracy=args.target_accuracy,
                  backend=args.backend, overwrite=args.overwrite, verbose=args.verbose).out
    print((out / "summary.md").read_text(encoding="utf-8"))
    print(f"done in {time.perf_counter() - start:.1f} s; summary in {out}/summary.md, plot in {out}/accuracy.png")


def _sweep(args: argparse.Namespace) -> None:
    from flwr_scaling.studies.sweep import load_sweep, run_sweep

    if args.dry_run:
        plan = load_sweep(args.file, args.out)
        for index, run in enumerate(plan.runs, start=1):
            print(f"[{index}/{len(plan.runs)}] {run.name}")
        return
    parallel = {"workers": args.workers, "cpus-per-run": args.cpus_per_run, "gpus-per-run": args.gpus_per_run,
                "ray-address": args.ray_address}
    out = run_sweep(args.file, args.out, backend=args.backend, overwrite=args.overwrite, parallel=parallel)
    print(f"sweep done; summary in {out}/summary.md, plots in {out}/")


def _report(args: argparse.Namespace) -> None:
    from flwr_scaling.studies.report import write_report
    from flwr_scaling.studies.state import check_output_files

    if not Path(args.dir).is_dir():
        raise ConfigError(f"{args.dir} is not a folder")
    target = None
    if args.target is not None:
        try:
            target = float(args.target)
        except ValueError:
            raise ConfigError(f"--target must be a number in (0, 1], got {args.target!r}") from None
        if not 0 < target <= 1:
            raise ConfigError(f"--target must be in (0, 1], got {args.target}")
    check_output_files(args.dir)  # a folder where a table goes fails now, not after the tables before it
    write_report(args.dir, target=target)
    print(f"tables and plots rebuilt in {args.dir}/")


def _tune(args: argparse.Namespace) -> None:
    from flwr_scaling.studies.tune import tune

    parallel = {"workers": args.workers, "ray-address": args.ray_address}
    written = tune(args.file, args.out, write=args.write, backend=args.backend, parallel=parallel)
    print(f"chosen step sizes in {written}; include its [method-options] tables in your sweep file")


def _data(args: argparse.Namespace) -> None:
    from flwr_scaling.data.download import download

    files = download(args.name, args.out, mirror=args.mirror)
    print(f"{len(files)} file(s) in {args.out}/, every sha256 checked")


def _deploy_local(args: argparse.Namespace) -> None:
    from flwr_scaling.deploy.local import deploy_local

    try:
        nodes = int(args.nodes)
    except ValueError:
        raise ConfigError(f"--nodes must be an integer, got {args.nodes!r}") from None
    if nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {nodes}")
    cfg = RunConfig.from_mapping({**_given(args, skip={"num_clients"}), "num-clients": nodes}).resolved()
    check_output_folder(cfg.out)
    workdir = Path(args.workdir) if args.workdir else Path(cfg.out) / "deploy"
    with claim_output(cfg.out, overwrite=args.overwrite):  # the ServerApp writes the results into cfg.out
        out = deploy_local(cfg, nodes, workdir, secure=not args.insecure)
    print(f"deployment run done; results in {out}/ (config.json, metrics.csv); logs in {workdir}/")


def _make_certs(args: argparse.Namespace) -> None:
    from flwr_scaling.deploy.local import make_certificates

    made = make_certificates(Path(args.out), args.host)
    print(f"wrote {made.ca_cert} (copy to every SuperNode), {made.server_cert} and {made.server_key} "
          f"(SuperLink; keep the keys, and {Path(args.out) / 'ca.key'}, secret)")


def _make_node_key(args: argparse.Namespace) -> None:
    from flwr_scaling.deploy.local import make_node_key

    private, public = make_node_key(Path(args.out), args.name)
    print(f"wrote {private} (stays on the device) and {public} (register it on the SuperLink)")


COMMANDS = {"make-certs": _make_certs, "make-node-key": _make_node_key, "run": _run, "compare": _compare, "sweep": _sweep, "report": _report, "deploy-local": _deploy_local,
            "tune": _tune, "data": _data}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # Unknown options are reported by the subcommand's parser, which knows its
    # options and can suggest the closest one.
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        bad = extra[0].split("=")[0]
        if args.command == "compare" and bad.lstrip("-").replace("-", "_") in COMPARE_FIXED:
            fail(f"unrecognized arguments: {' '.join(extra)}; compare sets {bad} per configuration: "
                 f"choose them with --configs, or use run {bad}")
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    # Global and per-command --verbose are the same switch; every failure below is one line (cli_errors).
    args.verbose = bool(getattr(args, "verbose", False) or args.verbose_everywhere)
    with exit_on_failure(args.verbose):
        check_path_arguments(args)
        _check_run_outputs(args)
        COMMANDS[args.command](args)


def _check_run_outputs(args: argparse.Namespace) -> None:
    """A folder where a run writes a file (``OUT/metrics.csv/``) fails now, not after the run's first round."""
    from flwr_scaling.run.outdir import RUN_OUTPUTS
    from flwr_scaling.studies.state import REPORT_FILES, check_output_files

    if args.command in ("run", "deploy-local") and (getattr(args, "resume", None) or args.out):
        check_output_files(getattr(args, "resume", None) or args.out, RUN_OUTPUTS, ())
    elif args.command == "compare":
        check_output_files(args.out, REPORT_FILES, ())


if __name__ == "__main__":
    main()
