"""Least privilege: serve refuses files that others could change to make the server relay.

load_config with ``trusted_uids`` (what ``serve`` and its reloads pass: root and the user it
runs as) checks the configuration, every ``file:`` list and every password file; the other
commands (check-config, explain) read without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from policyd.config import ConfigError, load_config, untrusted_reason

TRUSTED = frozenset({0, os.geteuid()})

CONFIG = """\
listen: {policy: "inet:127.0.0.1:10040"}
local_domains: [local.example, "file:domains.txt"]
relay: {allow: {client_networks: ["file:networks.txt"]}}
outbound:
  default: {auth: none}
  domains:
    partner.example: {auth: cleartext, username: relay@partner.example,
                      password_file: partner, nexthop: "[smtp.partner.example]:587"}
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    (directory / "policyd.yaml").write_text(CONFIG)
    (directory / "domains.txt").write_text("filed.example\n")
    (directory / "networks.txt").write_text("192.0.2.0/24\n")
    (directory / "partner").write_text("s3cret\n")
    for name in ("policyd.yaml", "domains.txt", "networks.txt"):
        (directory / name).chmod(0o644)
    (directory / "partner").chmod(0o600)
    return directory


def load(directory: Path) -> None:
    load_config(directory / "policyd.yaml", TRUSTED)


def test_safe_files_load(config_dir: Path) -> None:
    """Owned by this user, writable only by it, in a directory only it can write: loads."""
    load(config_dir)
    for name in ("policyd.yaml", "domains.txt", "networks.txt", "partner"):
        assert untrusted_reason(config_dir / name, TRUSTED) is None


@pytest.mark.parametrize(
    ("name", "mode", "key"),
    [
        ("policyd.yaml", 0o664, ""),
        ("policyd.yaml", 0o646, ""),
        ("domains.txt", 0o664, "local_domains[1]"),
        ("networks.txt", 0o666, "relay.allow.client_networks[0]"),
        ("partner", 0o620, "outbound.domains.partner.example.password_file"),
    ],
)
def test_file_writable_by_others_is_refused(
    config_dir: Path, name: str, mode: int, key: str
) -> None:
    """A file group or others can write is refused, naming the key that reads it."""
    (config_dir / name).chmod(mode)
    with pytest.raises(ConfigError) as caught:
        load(config_dir)
    assert caught.value.path == key
    assert f"{config_dir / name} is writable by others than its owner (mode {mode:04o})" in str(
        caught.value
    )
    assert "refusing an unsafe file" in str(caught.value)
    # check-config and explain read without the check: the same files load.
    load_config(config_dir / "policyd.yaml")


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_file_owned_by_another_user_is_refused(config_dir: Path) -> None:
    """A file owned by someone other than root or the service user is refused."""
    os.chown(config_dir / "networks.txt", 65534, 65534)
    with pytest.raises(ConfigError) as caught:
        load(config_dir)
    assert caught.value.path == "relay.allow.client_networks[0]"
    assert "is owned by uid 65534, not by root or the user policyd runs as" in str(caught.value)


def test_directory_others_can_write_is_refused_unless_sticky(config_dir: Path) -> None:
    """Others could replace a file in a directory they can write; a sticky one (like /tmp)
    stops them, so it is accepted."""
    config_dir.chmod(0o777)
    with pytest.raises(ConfigError) as caught:
        load(config_dir)
    assert f"{config_dir}, the directory of policyd.yaml, is writable by others" in str(
        caught.value
    )
    config_dir.chmod(0o1777)
    load(config_dir)


def test_serve_refuses_to_start_with_exit_1(config_dir: Path) -> None:
    """``policyd serve`` exits 1 (configuration error) with the reason, before listening."""
    (config_dir / "domains.txt").chmod(0o666)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "policyd",
            "serve",
            "--config",
            str(config_dir / "policyd.yaml"),
            "--no-transport-table",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "configuration error: local_domains[1]: refusing an unsafe file:" in result.stderr
    assert "domains.txt is writable by others than its owner (mode 0666)" in result.stderr
