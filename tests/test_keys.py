"""Key and certificate tools (``make-node-key``, ``make-certs``): names that
stay inside ``--out``, files created 0600 with ``O_EXCL`` (never through a
link, never over an existing file), one line and exit 2 for every bad folder,
and nothing left behind by a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from flwr_scaling.cli import main
from flwr_scaling.deploy import certs
from flwr_scaling.deploy.certs import KeyFileError, make_certificates, make_node_key

CERT_FILES = ["ca.crt", "ca.key", "server.key", "server.pem"]


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every path under ``root`` with its contents (files), link target (links) or 'dir'."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = f"link->{os.readlink(path)}"
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = path.read_bytes()
    return found


def _cli_error(argv: list[str], capsys) -> str:
    """Run the CLI expecting exit 2 with exactly one line on stderr; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@contextlib.contextmanager
def _read_only(folder: Path):
    """Make ``folder`` unwritable, for root too: the immutable flag as root, mode 0555 otherwise."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                            capture_output=True).returncode != 0:
            pytest.skip("running as root on a file system without the immutable flag: no read-only folder")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


# --------------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["../evil", "sub/node", "/tmp/node", "node/", "", ".", "..", "a\0b"])
def test_node_key_names_that_are_not_plain_file_names_are_refused(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keys").mkdir()
    line = _cli_error(["make-node-key", "--name", name, "--out", "keys"], capsys)
    assert line.startswith(f"flwr-scaling: error: key name {name!r} "), line
    assert _tree(tmp_path) == {"keys": "dir"}  # nothing written, inside --out or outside it


def test_separator_message_says_what_to_do(tmp_path, capsys):
    line = _cli_error(["make-node-key", "--name", "../evil", "--out", str(tmp_path)], capsys)
    assert line == ("flwr-scaling: error: key name '../evil' contains a path separator; "
                    "give a plain file name (choose the folder with --out)")


def test_a_plain_name_with_dots_is_a_file_name(tmp_path):
    private, public = make_node_key(tmp_path, "lab-pc.3")
    assert (private.name, public.name) == ("lab-pc.3", "lab-pc.3.pub")


# --------------------------------------------------------------------- modes
def test_private_keys_are_created_0600_with_o_excl_and_never_chmodded(tmp_path, monkeypatch):
    """Even with umask 0 the private files are 0600 from the first byte: the mode goes to
    ``os.open`` with ``O_CREAT | O_EXCL``, no chmod follows (which would leave a window)."""
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy_open(path, flags, mode=0o777, *args, **kwargs):
        opened.append((Path(path).name, flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    def no_chmod(*args, **kwargs):
        raise AssertionError(f"chmod called: {args}")

    monkeypatch.setattr(certs.os, "open", spy_open)
    monkeypatch.setattr(certs.os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    old_umask = os.umask(0)
    try:
        make_node_key(tmp_path / "keys", "node")
        make_certificates(tmp_path / "certs", ["localhost"])
    finally:
        os.umask(old_umask)
    modes = {name: stat.S_IMODE(path.stat().st_mode) for name, path in
             [("node", tmp_path / "keys/node"), ("node.pub", tmp_path / "keys/node.pub")]
             + [(n, tmp_path / "certs" / n) for n in CERT_FILES]}
    assert modes == {"node": 0o600, "node.pub": 0o644, "ca.crt": 0o644, "ca.key": 0o600,
                     "server.key": 0o600, "server.pem": 0o644}
    assert sorted(name for name, _, _ in opened) == sorted(["node", "node.pub", *CERT_FILES])
    for name, flags, mode in opened:
        assert flags & (os.O_CREAT | os.O_EXCL) == os.O_CREAT | os.O_EXCL, name
        assert mode == (0o600 if name in {"node", "ca.key", "server.key"} else 0o644), name


def test_umask_still_narrows_public_files(tmp_path):
    old_umask = os.umask(0o077)
    try:
        _, public = make_node_key(tmp_path, "node")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(public.stat().st_mode) == 0o600


# ------------------------------------------------------------------ symlinks
@pytest.mark.parametrize("linked", ["node", "node.pub"])
@pytest.mark.parametrize("target_exists", [False, True])
def test_a_symlink_where_a_key_goes_is_refused_and_its_target_untouched(tmp_path, monkeypatch, capsys,
                                                                        linked, target_exists):
    monkeypatch.chdir(tmp_path)
    keys, target = tmp_path / "keys", tmp_path / "elsewhere"
    keys.mkdir()
    if target_exists:
        target.write_text("precious\n")
    (keys / linked).symlink_to(target)
    before = _tree(tmp_path)
    line = _cli_error(["make-node-key", "--name", "node", "--out", "keys"], capsys)
    assert line == (f"flwr-scaling: error: 'keys/{linked}' is a symbolic link; keys are never written through one: "
                    "remove it or choose another name or folder")
    assert _tree(tmp_path) == before


def test_make_certs_refuses_a_symlink_at_the_server_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs/server.key").symlink_to(tmp_path / "stolen.key")
    before = _tree(tmp_path)
    line = _cli_error(["make-certs", "--host", "localhost", "--out", "certs"], capsys)
    assert "'certs/server.key' is a symbolic link" in line
    assert _tree(tmp_path) == before  # no certificate made either: every path is checked first


def test_replace_swaps_a_link_for_a_file_without_writing_through_it(tmp_path):
    """``deploy-local`` remakes its own keys in its work folder: the old file or link goes, the target stays."""
    target = tmp_path / "target"
    target.write_text("precious\n")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/node").symlink_to(target)
    (tmp_path / "keys/node.pub").write_text("old\n")
    private, public = make_node_key(tmp_path / "keys", "node", replace=True)
    assert not private.is_symlink() and stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert target.read_text() == "precious\n"


# ------------------------------------------------------------ existing files
@pytest.mark.parametrize("existing", ["node", "node.pub"])
def test_an_existing_key_file_is_not_overwritten(tmp_path, monkeypatch, capsys, existing):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / existing).write_text("old key\n")
    before = _tree(tmp_path)
    line = _cli_error(["make-node-key", "--out", "keys"], capsys)
    assert line == (f"flwr-scaling: error: 'keys/{existing}' already exists and is not overwritten; "
                    "remove it or choose another name or folder")
    assert _tree(tmp_path) == before  # the other half of the pair was not written either


def test_make_certs_into_a_folder_with_certificates_changes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_certificates(tmp_path / "certs", ["localhost"])
    before = _tree(tmp_path)
    line = _cli_error(["make-certs", "--host", "server.example.org", "--out", "certs"], capsys)
    assert line == ("flwr-scaling: error: 'certs/ca.crt' already exists and is not overwritten; "
                    "remove it or choose another name or folder")
    assert _tree(tmp_path) == before


def test_a_folder_named_like_the_key_is_refused(tmp_path, capsys):
    (tmp_path / "node").mkdir()
    line = _cli_error(["make-node-key", "--out", str(tmp_path)], capsys)
    assert line == (f"flwr-scaling: error: '{tmp_path}/node' is a folder; remove it or choose another name or folder")


# ------------------------------------------------------------------- folders
@pytest.mark.parametrize("command", [["make-node-key"], ["make-certs", "--host", "localhost"]])
@pytest.mark.parametrize("out", ["afile", "afile/sub"])
def test_a_file_where_the_folder_goes_is_one_line(tmp_path, monkeypatch, capsys, command, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("data\n")
    line = _cli_error([*command, "--out", out], capsys)
    assert line == (f"flwr-scaling: error: cannot make folder '{out}': 'afile' is not a folder; "
                    "choose another output folder")
    assert _tree(tmp_path) == {"afile": b"data\n"}


@pytest.mark.parametrize("command", [["make-node-key"], ["make-certs", "--host", "localhost"]])
@pytest.mark.parametrize("out", ["ro", "ro/new/keys"])
def test_a_read_only_folder_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, command, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ro").mkdir()
    with _read_only(tmp_path / "ro"):
        line = _cli_error([*command, "--out", out], capsys)
    assert line.startswith("flwr-scaling: error: "), line
    assert ("Permission denied" in line or "Operation not permitted" in line or "is not writable" in line), line
    assert "'ro" in line and line.endswith("choose another output folder"), line
    assert _tree(tmp_path) == {"ro": "dir"}


# ----------------------------------------------------------------- failures
@pytest.mark.parametrize("failing", CERT_FILES)
def test_a_failed_make_certs_removes_what_it_wrote_and_the_folders_it_made(tmp_path, monkeypatch, capsys, failing):
    """The disk fills up at one of the four files: the files before it and the new folders go."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept/notes.txt").write_text("mine\n")
    real_open = os.open

    def disk_full(path, flags, mode=0o777, *args, **kwargs):
        if Path(path).name == failing:
            raise OSError(28, "No space left on device")
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(certs.os, "open", disk_full)
    before = _tree(tmp_path)
    line = _cli_error(["make-certs", "--host", "localhost", "--out", "kept/new/certs"], capsys)
    assert line == (f"flwr-scaling: error: cannot create 'kept/new/certs/{failing}': No space left on device; "
                    "choose another output folder")
    assert _tree(tmp_path) == before  # kept/ and its file stay; kept/new is gone


def test_an_interrupted_make_node_key_in_an_existing_folder_removes_only_its_own_file(tmp_path, monkeypatch):
    (tmp_path / "other").write_text("mine\n")
    real_open = os.open

    def interrupted(path, flags, mode=0o777, *args, **kwargs):
        if Path(path).name == "node.pub":
            raise KeyboardInterrupt
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(certs.os, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_node_key(tmp_path, "node")
    assert _tree(tmp_path) == {"other": b"mine\n"}


def test_make_certs_writes_the_four_files_and_the_certificate_names_the_hosts(tmp_path):
    from cryptography import x509

    made = make_certificates(tmp_path / "a/b", ["server.example.org", "203.0.113.7"])
    assert sorted(p.name for p in (tmp_path / "a/b").iterdir()) == CERT_FILES
    cert = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["server.example.org"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["203.0.113.7"]


@pytest.mark.parametrize("host, message", [
    ("", "host '' is not a host name or IP address; give the name the SuperNodes dial (--host)"),
    ("two words", "host 'two words' is not a host name or IP address; give the name the SuperNodes dial (--host)"),
    ("h\u00e9llo", "host 'h\u00e9llo' is not a valid DNS name or IP address (--host)"),
])
def test_bad_hosts_are_one_line_before_anything_is_made(tmp_path, monkeypatch, capsys, host, message):
    monkeypatch.chdir(tmp_path)
    line = _cli_error(["make-certs", "--host", host, "--out", "certs"], capsys)
    assert line == f"flwr-scaling: error: {message}"
    assert _tree(tmp_path) == {}


def test_a_host_longer_than_a_subject_name_allows_still_gets_a_certificate(tmp_path):
    from cryptography import x509

    host = "a" * 60 + "." + "b" * 30 + ".org"  # a valid DNS name of 95 characters
    made = make_certificates(tmp_path, [host])
    cert = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [host]


def test_key_file_errors_are_value_errors_for_the_cli():
    """The CLI turns ValueError into one line and exit 2; KeyFileError must stay one."""
    assert issubclass(KeyFileError, ValueError)
