"""Certificates and keys for a secure federation: a CA, the SuperLink's
server certificate (``make-certs``) and a SuperNode's key pair
(``make-node-key``).

Every file is created, never replaced: ``os.open`` with ``O_CREAT | O_EXCL``
refuses a path that exists, a symbolic link included, so nothing is written
through a link or over an earlier key. Private keys get mode 0600 at creation
(no window in which they are readable by others). A call that fails removes
what it wrote and the folders it made, and leaves everything that was there
before untouched. Every expected failure is a ``KeyFileError``: one line that
names the path and what to do.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SECRET_MODE = 0o600  # private keys: owner only
PUBLIC_MODE = 0o644  # certificates and public keys: readable by others, as far as the umask allows
CERT_FILES = ("ca.crt", "ca.key", "server.pem", "server.key")


class KeyFileError(ValueError):
    """A key or certificate file cannot be written; the message is one line naming the path."""


@dataclass(frozen=True)
class Certificates:
    """The PEM files ``make_certificates`` writes (``ca.key`` sits next to them)."""

    ca_cert: Path  # give to every SuperNode (--root-certificates) and to `flwr` (root-certificates)
    server_cert: Path  # SuperLink --ssl-certfile
    server_key: Path  # SuperLink --ssl-keyfile (keep secret)


def check_key_name(name: str) -> str:
    """Return ``name`` if it is a plain file name, else raise ``KeyFileError``.

    A key's name becomes a file name inside the output folder, so it must not
    lead out of it: no path separator, not empty, not ``.`` or ``..``.
    """
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if not name or name in {".", ".."}:
        raise KeyFileError(f"key name {name!r} is not a file name; give a plain name such as --name node")
    if any(sep in name for sep in separators) or "\0" in name:
        raise KeyFileError(f"key name {name!r} contains a path separator; give a plain file name "
                           "(choose the folder with --out)")
    return name


class _Writer:
    """Creates files and folders, remembering them so that a failure removes exactly those."""

    def __init__(self, directory: Path, replace: bool) -> None:
        self.directory = directory
        self.replace = replace
        self.files: list[Path] = []
        self.folders: list[Path] = []

    def make_folder(self) -> None:
        """Create ``directory`` and its missing parents, remembering the ones it made."""
        missing = []
        folder = self.directory
        while not folder.exists() and not folder.is_symlink():
            missing.append(folder)
            if folder.parent == folder:
                break
            folder = folder.parent
        if not folder.is_dir():  # the nearest existing ancestor (or the folder itself) is a file
            raise KeyFileError(f"cannot make folder {str(self.directory)!r}: {str(folder)!r} is not a folder; "
                               "choose another output folder")
        for path in reversed(missing):
            try:
                path.mkdir()
            except OSError as error:
                raise KeyFileError(f"cannot make folder {str(path)!r}: {error.strerror or error}; "
                                   "choose another output folder") from None
            self.folders.append(path)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise KeyFileError(f"folder {str(self.directory)!r} is not writable; choose another output folder")

    def check_free(self, path: Path) -> None:
        """Refuse a path that exists (or is a link), unless replacing an old regular file or link."""
        if path.is_symlink():
            if not self.replace:
                raise KeyFileError(f"{str(path)!r} is a symbolic link; keys are never written through one: "
                                   "remove it or choose another name or folder")
        elif path.exists():
            if path.is_dir():
                raise KeyFileError(f"{str(path)!r} is a folder; remove it or choose another name or folder")
            if not self.replace:
                raise KeyFileError(f"{str(path)!r} already exists and is not overwritten; "
                                   "remove it or choose another name or folder")

    def write(self, path: Path, data: bytes, mode: int) -> None:
        """Create ``path`` with ``mode`` from the start (``O_EXCL``: never an existing file or a link)."""
        self.check_free(path)
        if self.replace and (path.is_symlink() or path.is_file()):
            path.unlink()  # removes a link itself, never its target
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, mode)
        except FileExistsError:  # appeared since check_free: another process is writing here
            raise KeyFileError(f"{str(path)!r} appeared while writing; remove it or choose another name or folder") from None
        except OSError as error:
            raise KeyFileError(f"cannot create {str(path)!r}: {error.strerror or error}; choose another output folder") from None
        self.files.append(path)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        except OSError as error:
            raise KeyFileError(f"cannot write {str(path)!r}: {error.strerror or error}") from None

    def undo(self) -> None:
        """Remove the files written and the folders made, newest first; leave everything else."""
        for path in reversed(self.files):
            try:
                path.unlink()
            except OSError:
                pass
        for folder in reversed(self.folders):
            try:
                folder.rmdir()  # only if empty: never removes something another process put there
            except OSError:
                pass


def make_certificates(directory: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1"), days: int = 365,
                      *, replace: bool = False) -> Certificates:
    """A self-signed CA and a server certificate for ``hosts``, as PEM files.

    Parameters
    ----------
    directory : Path
        Output folder, created if missing. Receives ``ca.crt``, ``ca.key``,
        ``server.pem`` and ``server.key``.
    hosts : sequence of str
        DNS names or IP addresses, as the SuperNodes will dial them.
    days : int
        Validity of both certificates.
    replace : bool
        Replace these four files if they exist (``deploy-local``'s own
        throw-away material); by default an existing file is an error.

    Returns
    -------
    Certificates
        The paths written.

    Raises
    ------
    KeyFileError
        A host is empty or invalid, a file exists, or the folder cannot be
        made or written; nothing is left behind.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names = [_general_name(x509, host) for host in hosts]
    if not names:
        raise KeyFileError("no host given; name the host or IP address the SuperNodes dial (--host)")
    directory = Path(directory)
    writer = _Writer(directory, replace)
    for file_name in CERT_FILES:  # before generating or creating anything
        writer.check_free(directory / file_name)
    try:
        writer.make_folder()
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flwr-scaling CA")])
        ca_cert = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        server_key = ec.generate_private_key(ec.SECP384R1())
        server_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _common_name(hosts[0]))]))
            .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        private = serialization.PrivateFormat.TraditionalOpenSSL
        paths = Certificates(directory / "ca.crt", directory / "server.pem", directory / "server.key")
        writer.write(paths.ca_cert, ca_cert.public_bytes(pem), PUBLIC_MODE)
        writer.write(paths.server_cert, server_cert.public_bytes(pem), PUBLIC_MODE)
        writer.write(paths.server_key, server_key.private_bytes(pem, private, serialization.NoEncryption()),
                     SECRET_MODE)
        writer.write(directory / "ca.key", ca_key.private_bytes(pem, private, serialization.NoEncryption()),
                     SECRET_MODE)
    except BaseException:  # Ctrl-C included: a half-written set of certificates is worse than none
        writer.undo()
        raise
    return paths


def make_node_key(directory: Path, name: str, *, replace: bool = False) -> tuple[Path, Path]:
    """A SuperNode's EC P-384 key pair in OpenSSH format.

    The private key stays on the device (``--auth-supernode-private-key``);
    the public key is registered on the SuperLink (``flwr supernode register``).

    Parameters
    ----------
    directory : Path
        Output folder, created if missing.
    name : str
        File name of the private key; the public key is ``name + ".pub"``.
        A plain name: no path separator, not empty, not ``.`` or ``..``.
    replace : bool
        Replace both files if they exist (``deploy-local``'s own keys); by
        default an existing file is an error.

    Returns
    -------
    tuple of Path
        ``(private, public)``.

    Raises
    ------
    KeyFileError
        The name is not a plain file name, a file exists or is a link, or the
        folder cannot be made or written; nothing is left behind.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    check_key_name(name)
    directory = Path(directory)
    private, public = directory / name, directory / f"{name}.pub"
    writer = _Writer(directory, replace)
    writer.check_free(private)
    writer.check_free(public)
    try:
        writer.make_folder()
        key = ec.generate_private_key(ec.SECP384R1())
        writer.write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()), SECRET_MODE)
        writer.write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                           serialization.PublicFormat.OpenSSH) + b"\n", PUBLIC_MODE)
    except BaseException:
        writer.undo()
        raise
    return private, public


def _common_name(host: str) -> str:
    """The server certificate's subject name: the first host, or a fixed name if it is longer than
    X.509 allows (64 characters); clients check the alternative names, not this one."""
    return host if len(host) <= 64 else "flwr-scaling SuperLink"


def _general_name(x509, host: str):
    """``host`` as a subject alternative name: an IP address if it parses as one, else a DNS name."""
    if not host or not host.strip() or any(ch.isspace() for ch in host):
        raise KeyFileError(f"host {host!r} is not a host name or IP address; give the name the SuperNodes dial (--host)")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return x509.DNSName(host)
    except ValueError:
        raise KeyFileError(f"host {host!r} is not a valid DNS name or IP address (--host)") from None


__all__ = ["Certificates", "KeyFileError", "check_key_name", "make_certificates", "make_node_key"]
