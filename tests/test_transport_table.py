"""``outbound.transport_table``: its configuration, and writing it with the real ``postmap``.

The writer runs Debian's postmap (installed by ``make test``, like the e2e tests' Postfix) with
a private config directory; ``postmap -q`` then reads the result the way Postfix does.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
from pathlib import Path

import pytest

from policyd.config import ConfigError, parse_config
from policyd.service import write_tables
from policyd.transport_table import (
    TableWriteError,
    TransportTableSettings,
    problems,
    render,
    write_transport_table,
)
from tests.system_tools import POSTMAP

ROWS = (
    ("*", "policyd-none:[127.0.0.33]:25"),
    (".local.example", ":"),
    ("bücher.example", "policyd-ntlm:xn--bcher-kva.example"),
    ("local.example", ":"),
    ("partner.example", "policyd-cleartext:[127.0.0.31]:2525"),
    ("xn--bcher-kva.example", "policyd-ntlm:xn--bcher-kva.example"),
)


@pytest.fixture
def settings(tmp_path: Path, postfix_dir: Path) -> TransportTableSettings:
    directory = tmp_path / "state"
    directory.mkdir()
    return TransportTableSettings(path=directory / "transport", postfix_config_dir=str(postfix_dir))


def query(settings: TransportTableSettings, key: str) -> tuple[int, str]:
    """``postmap -q KEY TYPE:PATH``: (exit status, value)."""
    result = subprocess.run(
        [POSTMAP, "-c", settings.postfix_config_dir, "-q", key, settings.table],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.returncode, result.stdout.strip()


def leftovers(settings: TransportTableSettings) -> list[str]:
    names = {settings.path.name, settings.built_path.name}
    return sorted(p.name for p in settings.path.parent.iterdir() if p.name not in names)


# ---------------------------------------------------------------------------- configuration

BASE = 'listen: {policy: "inet:127.0.0.1:10040"}\noutbound:\n  transport_table:\n'


def load(body: str, base_dir: Path) -> TransportTableSettings | None:
    return parse_config(BASE + body, source="policyd.yaml", base_dir=base_dir).transport_table


def test_settings_defaults_and_relative_path(tmp_path: Path) -> None:
    """Only ``path`` is required; a relative one is relative to the YAML's directory; the
    type defaults to hash, postfix_config_dir to /etc/postfix, postmap to the one on PATH."""
    table = load("    path: state/transport\n", tmp_path)
    assert table == TransportTableSettings(path=tmp_path / "state" / "transport")
    assert table.table == f"hash:{tmp_path}/state/transport"
    assert table.built_path == tmp_path / "state" / "transport.db"
    assert table.postfix_config_dir == "/etc/postfix"
    assert table.postmap_command() == POSTMAP


def test_settings_all_keys(tmp_path: Path) -> None:
    """Every key as written; lmdb and cdb tables are built as PATH.lmdb and PATH.cdb."""
    table = load(
        "    {path: /var/lib/policyd/transport, type: lmdb, postmap: /opt/pf/postmap,\n"
        "     postfix_config_dir: /etc/postfix-out}\n",
        tmp_path,
    )
    assert table is not None
    assert (table.table, table.built_path.name) == (
        "lmdb:/var/lib/policyd/transport",
        "transport.lmdb",
    )
    assert (table.postmap, table.postfix_config_dir) == ("/opt/pf/postmap", "/etc/postfix-out")
    cdb = load("    {path: /t, type: cdb}\n", tmp_path)
    assert cdb is not None and cdb.built_path == Path("/t.cdb")


def test_without_the_section_nothing_is_written(tmp_path: Path) -> None:
    """No ``outbound.transport_table``: socketmap users get no table."""
    config = parse_config('listen: {policy: "inet:127.0.0.1:10040"}\n', base_dir=tmp_path)
    assert config.transport_table is None
    assert "outbound.transport_table: -" in config.summary()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("    {type: hash}\n", "outbound.transport_table.path: missing"),
        ("    {path: /t, type: dbm}\n", "outbound.transport_table.type: 'dbm' is not one of hash"),
        ("    {path: /t, typo: hash}\n", "outbound.transport_table.typo: unknown key"),
        (
            "    {path: '/var/lib/my table'}\n",
            "outbound.transport_table.path: '/var/lib/my table' ",
        ),
        ("    {path: /var/lib/policyd/}\n", "outbound.transport_table.path: must name a file"),
        ("    {path: [a]}\n", "outbound.transport_table.path: expected a single value"),
        ("    {path: ''}\n", "outbound.transport_table.path: must not be empty"),
        ("    /var/lib/policyd/transport\n", "outbound.transport_table: expected a mapping"),
    ],
)
def test_settings_errors_name_key_and_line(tmp_path: Path, body: str, message: str) -> None:
    """Strict validation: each error names the key path and the YAML line."""
    with pytest.raises(ConfigError) as caught:
        load(body, tmp_path)
    assert str(caught.value).startswith(message), str(caught.value)
    assert str(caught.value).endswith("(policyd.yaml:4)"), str(caught.value)


def test_summary_counts_the_rows(tmp_path: Path) -> None:
    """check-config's summary names the table, its entry count and how it is built."""
    config = parse_config(
        BASE + "    {path: t, postfix_config_dir: /pf}\nlocal_domains: [a.example, .a.example]\n",
        source="policyd.yaml",
        base_dir=tmp_path,
    )
    line = next(x for x in config.summary().splitlines() if "outbound.transport_table" in x)
    assert f"hash:{tmp_path}/t (2 entries; built file t.db, postmap " in line
    assert line.endswith("-c /pf)")


def test_problems_found_without_writing(tmp_path: Path, postfix_dir: Path) -> None:
    """``problems`` reports a missing directory, postmap or main.cf and creates nothing."""
    good = TransportTableSettings(path=tmp_path / "transport", postfix_config_dir=str(postfix_dir))
    assert problems(good) == []
    bad = TransportTableSettings(
        path=tmp_path / "missing" / "transport",
        postmap=str(tmp_path / "no-postmap"),
        postfix_config_dir=str(tmp_path / "no-etc"),
    )
    found = problems(bad)
    assert len(found) == 3, found
    assert "does not exist" in found[0] and "not found" in found[1] and "main.cf" in found[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- writing


def test_write_builds_a_table_postfix_reads(settings: TransportTableSettings) -> None:
    """The source and the .db appear, mode 0644 (Postfix reads them as another user); postmap
    finds every row, case-insensitively, UTF-8 keys included, ``:`` as written."""
    written = write_transport_table(settings, ROWS, source="policyd.yaml")
    assert (written.result, written.entries) == ("written", len(ROWS))
    for path in (settings.path, settings.built_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert settings.path.read_text() == render(ROWS, source="policyd.yaml", settings=settings)
    for key, value in ROWS:
        assert query(settings, key) == (0, value), key
    assert query(settings, "PARTNER.Example") == (0, "policyd-cleartext:[127.0.0.31]:2525")
    assert query(settings, "BÜCHER.example") == (0, "policyd-ntlm:xn--bcher-kva.example")
    assert query(settings, "elsewhere.example") == (1, "")
    assert leftovers(settings) == []


def test_unchanged_content_is_left_alone(settings: TransportTableSettings) -> None:
    """Writing the same rows again touches nothing (no trivial-rewrite restart), and reports
    the time the table in place was built."""
    write_transport_table(settings, ROWS, source="policyd.yaml")
    before = settings.built_path.stat()
    again = write_transport_table(settings, ROWS, source="policyd.yaml")
    after = settings.built_path.stat()
    assert again.result == "unchanged"
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert again.timestamp == before.st_mtime


def test_changed_content_replaces_the_file_by_rename(settings: TransportTableSettings) -> None:
    """A change is a new file renamed over the old one: a reader that has the old table open
    (trivial-rewrite) keeps a whole old table, and sees its link count drop to 0, which is
    how Postfix's dict_changed_name() notices the change and restarts trivial-rewrite."""
    write_transport_table(settings, ROWS, source="policyd.yaml")
    with settings.built_path.open("rb") as old:
        assert os.fstat(old.fileno()).st_nlink == 1
        changed = (*ROWS, ("new.example", "policyd-none:[gw.example]"))
        assert write_transport_table(settings, changed, source="policyd.yaml").result == "written"
        assert os.fstat(old.fileno()).st_nlink == 0
    assert query(settings, "new.example") == (0, "policyd-none:[gw.example]")


def test_a_missing_built_file_is_rebuilt(settings: TransportTableSettings) -> None:
    """Same source but no .db (deleted, or the type changed): built again."""
    write_transport_table(settings, ROWS, source="policyd.yaml")
    settings.built_path.unlink()
    assert write_transport_table(settings, ROWS, source="policyd.yaml").result == "written"
    assert query(settings, "local.example") == (0, ":")


def test_an_empty_table_is_still_a_table(settings: TransportTableSettings) -> None:
    """No rows (nothing local, no overrides, a default without next hop): the table exists,
    so Postfix can open it, and finds nothing."""
    write_transport_table(settings, (), source="policyd.yaml")
    assert settings.built_path.is_file()
    assert query(settings, "anything.example") == (1, "")


def test_btree_type(tmp_path: Path, postfix_dir: Path) -> None:
    """``type: btree`` builds PATH.db with postmap btree:PATH."""
    table = TransportTableSettings(
        path=tmp_path / "transport", type="btree", postfix_config_dir=str(postfix_dir)
    )
    write_transport_table(table, ROWS, source="policyd.yaml")
    assert query(table, "partner.example") == (0, "policyd-cleartext:[127.0.0.31]:2525")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"postmap": "/nonexistent/postmap"}, "postmap command '/nonexistent/postmap' not found"),
        (
            {"postfix_config_dir": "/nonexistent"},
            "exited with 1: postmap: fatal: open /nonexistent/main.cf",
        ),
        ({"type": "cdb"}, "exited with 1: postmap: fatal: unsupported dictionary type: cdb"),
    ],
)
def test_failure_keeps_the_old_table(
    settings: TransportTableSettings, change: dict[str, str], message: str
) -> None:
    """A postmap that is missing or fails (bad config dir, a map type this Postfix lacks)
    raises an error naming the key and carrying postmap's message; the table in place is
    untouched and no temporary file is left."""
    write_transport_table(settings, ROWS, source="policyd.yaml")
    source, built = settings.path.read_bytes(), settings.built_path.read_bytes()
    broken = dataclasses.replace(settings, **change)
    with pytest.raises(TableWriteError) as caught:
        write_transport_table(broken, (*ROWS, ("x.example", ":")), source="policyd.yaml")
    text = str(caught.value)
    assert text.startswith(f"outbound.transport_table: cannot write {broken.table}: "), text
    assert message in text, text
    assert (settings.path.read_bytes(), settings.built_path.read_bytes()) == (source, built)
    assert leftovers(settings) == []


def test_unwritable_directory_is_an_error(tmp_path: Path, postfix_dir: Path) -> None:
    """A directory that cannot hold the table (here: the parent is a regular file; root
    ignores permission bits) is an error that says so."""
    (tmp_path / "file").write_text("")
    table = TransportTableSettings(
        path=tmp_path / "file" / "transport", postfix_config_dir=str(postfix_dir)
    )
    with pytest.raises(TableWriteError, match="cannot create a file in"):
        write_transport_table(table, ROWS, source="policyd.yaml")


def test_no_password_ever_reaches_the_table(tmp_path: Path, postfix_dir: Path) -> None:
    """The table files are world-readable: after writing a configuration whose profiles log
    in, neither the source nor the built file contains a password or an account name."""
    passwords = {"partner": "Partner-pw-7f3a", "smarthost": "Smart-pw-91cc", "corp": "Corp-pw-55"}
    for name, password in passwords.items():
        (tmp_path / name).write_text(password + "\n")
        (tmp_path / name).chmod(0o600)
    config = parse_config(
        f"""
listen: {{policy: "inet:127.0.0.1:10040"}}
local_domains: [local.example]
outbound:
  transport_table: {{path: transport, postfix_config_dir: {postfix_dir}}}
  default: {{auth: cleartext, username: site@isp.example, password_file: smarthost,
            nexthop: "[smtp.isp.example]:587"}}
  domains:
    partner.example: {{auth: cleartext, username: relay@partner.example,
                      password_file: partner, nexthop: "[smtp.partner.example]:587"}}
    corp.example: {{auth: ntlm, username: 'CORP\\svc', password_file: corp}}
""",
        source="policyd.yaml",
        base_dir=tmp_path,
    )
    written = write_tables(config)
    assert written is not None and written.entries == 4
    table = config.transport_table
    assert table is not None
    contents = table.path.read_bytes() + table.built_path.read_bytes()
    for secret in (*passwords.values(), "site@isp.example", "relay@partner.example", "svc"):
        assert secret.encode() not in contents, secret
    assert query(table, "corp.example") == (0, "policyd-ntlm:corp.example")
