"""Real deployment: a SuperLink and SuperNodes as separate processes (Flower 1.42).

``deploy_local`` starts a SuperLink and N SuperNodes on 127.0.0.1 (free
ports), runs one configuration with ``flwr run . <federation> --stream`` and
stops every process it started, also on Ctrl-C, on failure and when it is
killed outright (``flwr_scaling.deploy.processes``). By default the
federation is secure: TLS with a fresh CA (``make_certificates``) and
SuperNode authentication (``--enable-supernode-auth``: only public keys
registered with ``flwr supernode register`` may join). ``secure=False`` is
the explicit ``--insecure`` path, announced on stderr.

The building blocks (``make_certificates`` and ``make_node_key`` from
``flwr_scaling.deploy.certs``, ``LocalFederation``) are what docs/deploy.md
runs by hand on real machines.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flwr_scaling.deploy.certs import Certificates, make_certificates, make_node_key
from flwr_scaling.deploy.processes import MARKER_VARIABLE, Proc, Watchdog, end_processes, parent_death_signal, spawn
from flwr_scaling.run.config import ConfigError, RunConfig

FEDERATION = "deploy"
BIN = Path(sys.executable).parent
INSECURE_WARNING = ("flwr-scaling: warning: --insecure: no TLS and no SuperNode authentication; "
                    "any local process can join the federation or read its traffic")


class DeployError(RuntimeError):
    """A deployment step failed; the message names the step and the log to read."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalFederation:
    """SuperLink + SuperNodes on 127.0.0.1 under ``workdir``; use as a context manager.

    ``workdir`` receives ``flwr_home/`` (FLWR_HOME with ``config.toml``),
    ``certs/``, ``keys/``, ``superlink.db`` and one ``*.log`` per process.
    Certificates and node keys are made fresh for each federation, replacing
    those an earlier one left in ``workdir``.

    Every process it starts carries ``FLWR_SCALING_FEDERATION=<marker>`` in its
    environment, as do the processes Flower starts from them; ``stop`` ends
    them all, and a watchdog does the same if this process dies without
    calling it (see ``flwr_scaling.deploy.processes``).
    """

    workdir: Path
    secure: bool = True
    app_dir: Path | None = None
    federation: str = FEDERATION
    processes: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.app_dir = Path(self.app_dir or default_app_dir()).resolve()
        self.flwr_home = self.workdir / "flwr_home"
        try:
            self.flwr_home.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file in the way, or a folder we may not write
            raise ConfigError(f"work folder {str(self.workdir)!r} cannot be used: {error.strerror or error}; "
                              "choose another --workdir") from None
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.certs = make_certificates(self.workdir / "certs", replace=True) if self.secure else None
        self.node_count = 0
        self.marker = uuid.uuid4().hex
        self.watchdog = Watchdog(self.marker, os.environ)

    # environment shared by every process: nothing is installed at run time
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.flwr_home)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[MARKER_VARIABLE] = self.marker
        return env

    def spawn(self, name: str, argv: Sequence[str], cwd: Path | None = None) -> Proc:
        """Start ``argv`` as ``name`` (log: ``workdir/<name>.log``), watched until ``stop``."""
        proc = spawn(name, argv, self.workdir / f"{name}.log", cwd or self.workdir, self.env())
        self.watchdog.watch_group(proc.pid)
        self.processes.append(proc)
        return proc

    # ----------------------------------------------------------- SuperLink
    def start_superlink(self, timeout_s: float = 60.0) -> Proc:
        argv = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(self.workdir / "superlink.db"), "--disable-runtime-dependency-installation"]
        if self.secure:
            argv += ["--ssl-certfile", str(self.certs.server_cert), "--ssl-keyfile", str(self.certs.server_key),
                     "--ssl-ca-certfile", str(self.certs.ca_cert), "--enable-supernode-auth"]
        else:
            argv += ["--insecure"]
        self.write_flwr_config()
        proc = self.spawn("superlink", argv)
        self._wait_port(proc, timeout_s)
        return proc

    def write_flwr_config(self) -> Path:
        """``$FLWR_HOME/config.toml`` with this federation's SuperLink connection."""
        lines = ["[superlink]", f'default = "{self.federation}"', "", f"[superlink.{self.federation}]",
                 f'address = "{self.address}"']
        if self.secure:
            lines.append(f'root-certificates = "{self.certs.ca_cert}"')
        else:
            lines.append("insecure = true")
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _wait_port(self, proc: Proc, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not proc.alive():
                raise DeployError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log}:\n{_tail(proc.log_text())}")
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise DeployError(f"{proc.name} did not open port {self.port} within {timeout_s:g} s; see {proc.log}")

    # ----------------------------------------------------------- SuperNodes
    def flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this federation (FLWR_HOME set)."""
        return subprocess.run([str(BIN / "flwr"), *args], cwd=str(self.app_dir), env=self.env(), capture_output=True,
                              text=True, timeout=timeout_s, start_new_session=True,
                              preexec_fn=parent_death_signal())

    def register(self, public_key: Path, name: str | None = None) -> str:
        """``flwr supernode register KEY <federation>``: allow this public key to join."""
        args = ["supernode", "register", str(public_key), self.federation]
        if name:
            args += ["--name", name]
        result = self.flwr(*args)
        if result.returncode != 0:
            raise DeployError(f"flwr supernode register failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result.stdout

    def list_nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list --format json``: the SuperLink's view of its nodes."""
        result = self.flwr("supernode", "list", self.federation, "--format", "json")
        if result.returncode != 0:
            raise DeployError(f"flwr supernode list failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        data = json.loads(result.stdout[result.stdout.index("{"):])
        return list(data.get("nodes", []))

    def start_supernode(self, node_config: Mapping[str, Any] | str, name: str | None = None, *,
                        register: bool = True, private_key: Path | None = None,
                        root_certificates: Path | None | bool = True) -> Proc:
        """Start a SuperNode with ``node_config``. Secure: a fresh key pair (registered
        unless ``register=False``, or ``private_key`` given), and the CA certificate
        unless ``root_certificates`` is ``False`` or another file."""
        index = self.node_count
        self.node_count += 1
        name = name or f"supernode-{index}"
        argv = [str(BIN / "flower-supernode"), "--superlink", self.address, "--host", "127.0.0.1",
                "--port", str(free_port()), "--node-config", format_node_config(node_config)]
        if self.secure:
            if private_key is None:
                private_key, public_key = make_node_key(self.workdir / "keys", name, replace=True)
                if register:
                    self.register(public_key, name)
            argv += ["--auth-supernode-private-key", str(private_key)]
            if root_certificates is True:
                argv += ["--root-certificates", str(self.certs.ca_cert)]
            elif root_certificates:
                argv += ["--root-certificates", str(root_certificates)]
        else:
            argv += ["--insecure"]
        return self.spawn(name, argv)

    def wait_for_nodes(self, count: int, timeout_s: float = 90.0) -> None:
        """Until ``count`` nodes are online (``flwr supernode list``)."""
        deadline = time.monotonic() + timeout_s
        online = 0
        while time.monotonic() < deadline:
            try:
                online = sum(1 for n in self.list_nodes() if str(n.get("status", "")).lower() == "online")
            except (DeployError, ValueError):
                online = 0
            if online >= count:
                return
            for proc in self.processes:
                if proc.name.startswith("supernode") and not proc.alive():
                    raise DeployError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log}:\n{_tail(proc.log_text())}")
            time.sleep(1.0)
        raise DeployError(f"{online} of {count} SuperNodes online after {timeout_s:g} s; see the logs in {self.workdir}")

    # ---------------------------------------------------------------- runs
    def run(self, config: RunConfig, on_line: Callable[[str], None] | None = print, timeout_s: float | None = None) -> Proc:
        """``flwr run <app_dir> <federation> --stream -c overrides.toml``; waits for the end.
        The run's resolved configuration goes in as a TOML file of overrides."""
        overrides = self.workdir / "run-config.toml"
        overrides.write_text(to_toml(config.to_flower()))
        proc = self.spawn("flwr-run", [str(BIN / "flwr"), "run", str(self.app_dir), self.federation, "--stream",
                                       "-c", str(overrides)], cwd=self.app_dir)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with open(proc.log, "r", errors="replace") as handle:
            while True:
                line = handle.readline()
                if line:
                    if on_line is not None:
                        on_line(line.rstrip("\n"))
                    continue
                if not proc.alive():
                    for rest in handle:
                        if on_line is not None:
                            on_line(rest.rstrip("\n"))
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise DeployError(f"the run did not finish within {timeout_s:g} s; see {proc.log}")
                time.sleep(0.2)
        return proc

    # ------------------------------------------------------------- teardown
    def stop(self) -> None:
        """Stop every process this federation started: the newest first (SuperNodes before the SuperLink),
        then whatever else carries its marker (Flower's SuperExec and apps, in sessions of their own)."""
        while self.processes:
            proc = self.processes.pop()
            proc.stop()
            self.watchdog.forget_group(proc.pid)
        end_processes(self.marker)
        self.watchdog.dismiss()

    def release(self, proc: Proc) -> None:
        """Stop one process early and stop watching it (e.g. a node a test started on the side)."""
        proc.stop()
        if proc in self.processes:
            self.processes.remove(proc)
        self.watchdog.forget_group(proc.pid)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------- helpers
def default_app_dir() -> Path:
    """The Flower app's folder (pyproject.toml with [tool.flwr.app]): the source checkout."""
    root = Path(__file__).resolve().parents[2]  # <root>/flwr_scaling/deploy/local.py
    if not (root / "pyproject.toml").exists():
        raise DeployError("deploying needs the project's source folder (pyproject.toml with [tool.flwr.app]); "
                          "pass app_dir= or install from a checkout (pip install -e .)")
    return root


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def to_toml(values: Mapping[str, Any]) -> str:
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())


def format_node_config(node_config: Mapping[str, Any] | str) -> str:
    """``{"partition-id": 0, "data-path": "csv:/x"}`` -> ``partition-id=0 data-path="csv:/x"``."""
    if isinstance(node_config, str):
        return node_config
    return " ".join(f"{key}={_toml_value(value)}" for key, value in node_config.items())


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------- entry
def deploy_local(
    config: RunConfig,
    nodes: int,
    workdir: Path,
    secure: bool = True,
    *,
    node_configs: Sequence[Mapping[str, Any] | str] | None = None,
    app_dir: Path | None = None,
    on_line: Callable[[str], None] | None = print,
    timeout_s: float | None = None,
) -> Path:
    """Run ``config`` on a real SuperLink and ``nodes`` SuperNodes on 127.0.0.1.

    Node ``i`` gets ``partition-id=i num-partitions=nodes`` unless ``node_configs``
    gives its own (e.g. ``{"data-path": "libsvm:/data/node0.svm"}``).
    ``num-clients`` is set to ``nodes`` (and ``clients-per-round`` capped at it);
    ``out`` is made absolute (relative to the current folder). Logs, keys and
    certificates go to ``workdir``. Returns the output folder with
    ``metrics.csv`` and ``config.json``. Every process is stopped on return, on
    failure, on Ctrl-C / SIGTERM, and by a watchdog if this process is killed
    outright; on Linux the children also get SIGTERM from the kernel when the
    thread that called this function ends, so call it from a thread that
    lives as long as the run. ``secure=False`` prints a warning on stderr.
    """
    if nodes < 1:
        raise ConfigError(f"nodes must be at least 1, got {nodes}")
    if node_configs is not None and len(node_configs) != nodes:
        raise ConfigError(f"{len(node_configs)} node configs for {nodes} nodes")
    per_round = config.clients_per_round
    config = replace(config, num_clients=nodes, clients_per_round=min(per_round, nodes) if per_round else per_round)
    cfg = config.resolved()
    cfg = replace(cfg, out=str(Path(cfg.out).resolve()))
    configs = node_configs or [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)]

    previous = signal.getsignal(signal.SIGTERM)

    def _terminate(signum, frame):  # SIGTERM behaves like Ctrl-C: unwind through finally
        raise KeyboardInterrupt

    in_main = _in_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _terminate)
    if not secure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    federation = None
    try:
        federation = LocalFederation(Path(workdir), secure=secure, app_dir=app_dir)
        federation.start_superlink()
        for index, node_config in enumerate(configs):
            federation.start_supernode(node_config, f"supernode-{index}")
        federation.wait_for_nodes(nodes)
        proc = federation.run(cfg, on_line=on_line, timeout_s=timeout_s)
        if proc.popen.returncode != 0:
            raise DeployError(f"flwr run exited with {proc.popen.returncode}; see {proc.log} and {federation.workdir}/superlink.log")
        metrics = Path(cfg.out) / "metrics.csv"
        if not metrics.exists():
            raise DeployError(f"the run ended without {metrics}; see {federation.workdir}/superlink.log")
        return Path(cfg.out)
    finally:
        if federation is not None:
            federation.stop()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# make_certificates, make_node_key and Certificates stay importable from here (the CLI and older scripts do).
__all__ = ["Certificates", "DeployError", "LocalFederation", "deploy_local", "make_certificates", "make_node_key"]
