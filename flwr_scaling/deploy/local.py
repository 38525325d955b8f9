"""Real deployment: a SuperLink and SuperNodes as separate processes (Flower 1.42).

``deploy_local`` starts a SuperLink and N SuperNodes on 127.0.0.1 (free
ports), runs one configuration with ``flwr run . <federation> --stream`` and
stops every process it started, also on Ctrl-C and on failure. By default the
federation is secure: TLS with a fresh CA (``make_certificates``) and
SuperNode authentication (``--enable-supernode-auth``: only public keys
registered with ``flwr supernode register`` may join). ``secure=False`` is
the explicit ``--insecure`` path.

The building blocks (``make_certificates``, ``make_node_key``,
``LocalFederation``) are what docs/deploy.md runs by hand on real machines.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from flwr_scaling.run.config import ConfigError, RunConfig

FEDERATION = "deploy"
BIN = Path(sys.executable).parent


class DeployError(RuntimeError):
    """A deployment step failed; the message names the step and the log to read."""


# --------------------------------------------------------------- certificates
@dataclass(frozen=True)
class Certificates:
    ca_cert: Path  # give to every SuperNode (--root-certificates) and to `flwr` (root-certificates)
    server_cert: Path  # SuperLink --ssl-certfile
    server_key: Path  # SuperLink --ssl-keyfile (keep secret)


def make_certificates(directory: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1"), days: int = 365) -> Certificates:
    """A self-signed CA and a server certificate for ``hosts`` (DNS names or IP
    addresses, as the SuperNodes will dial them), written as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flwr-scaling CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = Certificates(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    paths.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    paths.server_cert.write_bytes(server_cert.public_bytes(pem))
    _write_secret(paths.server_key, server_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                              serialization.NoEncryption()))
    _write_secret(directory / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                             serialization.NoEncryption()))
    return paths


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC P-384 key pair in OpenSSH format: ``(private, public)``.
    The private key stays on the device (``--auth-supernode-private-key``); the
    public key is registered on the SuperLink (``flwr supernode register``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    _write_secret(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def _write_secret(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


# ------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Proc:
    """A started process in its own process group, with its log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``; also reaps stray children."""
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:  # children (flwr-clientapp, flwr-serverapp) may outlive the leader
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group at once: a device losing power."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=10)


@dataclass
class LocalFederation:
    """SuperLink + SuperNodes on 127.0.0.1 under ``workdir``; use as a context manager.

    ``workdir`` receives ``flwr_home/`` (FLWR_HOME with ``config.toml``),
    ``certs/``, ``keys/``, ``superlink.db`` and one ``*.log`` per process.
    """

    workdir: Path
    secure: bool = True
    app_dir: Path | None = None
    federation: str = FEDERATION
    processes: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.app_dir = Path(self.app_dir or default_app_dir()).resolve()
        self.flwr_home = self.workdir / "flwr_home"
        self.flwr_home.mkdir(exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.certs = make_certificates(self.workdir / "certs") if self.secure else None
        self._node_count = 0

    # environment shared by every process: nothing is installed at run time
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.flwr_home)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def spawn(self, name: str, argv: Sequence[str], cwd: Path | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        handle = open(log, "ab")
        popen = subprocess.Popen(list(argv), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=str(cwd or self.workdir), env=self.env(), start_new_session=True)
        handle.close()
        proc = Proc(name, popen, log)
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
                              text=True, timeout=timeout_s, start_new_session=True)

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
        index = self._node_count
        self._node_count += 1
        name = name or f"supernode-{index}"
        argv = [str(BIN / "flower-supernode"), "--superlink", self.address, "--host", "127.0.0.1",
                "--port", str(free_port()), "--node-config", format_node_config(node_config)]
        if self.secure:
            if private_key is None:
                private_key, public_key = make_node_key(self.workdir / "keys", name)
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
        """Stop every process this federation started: the newest first (SuperNodes before the SuperLink)."""
        while self.processes:
            self.processes.pop().stop()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------- helpers
def default_app_dir() -> Path:
    """The Flower app's folder (pyproject.toml with [tool.flwr.app]): the source checkout."""
    root = Path(__file__).resolve().parents[1]
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
    failure and on Ctrl-C / SIGTERM.
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
    federation = LocalFederation(Path(workdir), secure=secure, app_dir=app_dir)
    try:
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
        federation.stop()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


__all__ = ["Certificates", "DeployError", "LocalFederation", "deploy_local", "make_certificates", "make_node_key"]
