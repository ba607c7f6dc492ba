"""The static transport table: ``outbound.transport_table``, written for Postfix's transport_maps.

Postfix asks transport_maps synchronously about every recipient (trivial-rewrite, for smtpd and
again for qmgr). Served over the socketmap, each of those lookups waits on policyd; as a static
table (``transport_maps = hash:/var/lib/policyd/transport``) it costs Postfix a local file
lookup. The table holds no secret (passwords stay in policyd's ``sasl_passwd`` socketmap), so
policyd writes it from the YAML at start and on every successful reload.

What is written, for ``path: /var/lib/policyd/transport`` and ``type: hash``:

- ``/var/lib/policyd/transport``, the source (one ``key value`` line per row, for humans and
  for diffing), and
- ``/var/lib/policyd/transport.db``, built from it by ``postmap`` (``.lmdb`` for lmdb,
  ``.cdb`` for cdb, ``.db`` for btree).

Both are replaced with ``rename()``, never rewritten in place, so a reader sees the old table or
the new one and never half of one. Postfix's trivial-rewrite checks its open tables every 10
seconds and restarts when one was replaced, so new rows apply within about 10 seconds of a
reload (the socketmap applies them at once). A table whose content did not change is not
touched, so a reload that changes nothing here restarts nothing in Postfix.

The rows come from ``OutboundTables.transport_table_entries`` (pure); this module does the I/O.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

TableType = Literal["hash", "btree", "lmdb", "cdb"]
TABLE_TYPES: tuple[TableType, ...] = get_args(TableType)

#: The file postmap builds next to the source, by table type.
BUILT_SUFFIX: dict[TableType, str] = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb", "cdb": ".cdb"}

DEFAULT_POSTFIX_CONFIG_DIR = "/etc/postfix"
FALLBACK_POSTMAP = "/usr/sbin/postmap"

#: How long postmap may take before the write counts as failed (it takes milliseconds).
POSTMAP_TIMEOUT_SECONDS = 60.0

_HEADER = (
    "# Written by policyd from {source} (outbound, local_domains): do not edit, it is\n"
    "# replaced on every start and reload. Postfix reads {table}.\n"
    "# Check a key with: postmap -q KEY {table}   (':' = Postfix's own routing)\n"
)

WriteResult = Literal["written", "unchanged"]


@dataclass(frozen=True, slots=True)
class TransportTableSettings:
    """The ``outbound.transport_table`` section. ``path`` is absolute.

    ``postmap`` is the command as configured; empty means ``postmap`` on PATH, else
    /usr/sbin/postmap (see ``postmap_command``).
    """

    path: Path
    type: TableType = "hash"
    postmap: str = ""
    postfix_config_dir: str = DEFAULT_POSTFIX_CONFIG_DIR

    @property
    def table(self) -> str:
        """The table as Postfix names it in main.cf: ``hash:/var/lib/policyd/transport``."""
        return f"{self.type}:{self.path}"

    @property
    def built_path(self) -> Path:
        """The file Postfix opens: the path plus postmap's suffix for the type."""
        return self.path.with_name(self.path.name + BUILT_SUFFIX[self.type])

    def postmap_command(self) -> str:
        """The postmap to run: as configured, else ``postmap`` on PATH, else /usr/sbin/postmap."""
        return self.postmap or shutil.which("postmap") or FALLBACK_POSTMAP


@dataclass(frozen=True, slots=True)
class TableWrite:
    """The outcome of one successful write: ``written`` or ``unchanged`` (nothing touched).

    ``timestamp`` is when the table in place was built (now, or the built file's mtime).
    """

    settings: TransportTableSettings
    result: WriteResult
    entries: int
    timestamp: float

    def describe(self) -> str:
        """One line for the log and ``write-tables``."""
        what = "written" if self.result == "written" else "unchanged, not rewritten"
        return f"transport table {self.settings.table}: {what} ({self.entries} entries)"


class TableWriteError(Exception):
    """The table could not be written; the one in place (if any) is untouched.

    ``str()`` names the configuration key and what went wrong, for the operator.
    """

    def __init__(self, settings: TransportTableSettings, problem: str) -> None:
        self.settings = settings
        self.problem = problem
        super().__init__(f"outbound.transport_table: cannot write {settings.table}: {problem}")


def render(
    rows: tuple[tuple[str, str], ...], *, source: str, settings: TransportTableSettings
) -> str:
    """The source file's text: a header comment, then one ``key value`` line per row."""
    header = _HEADER.format(source=source, table=settings.table)
    return header + "".join(f"{key} {value}\n" for key, value in rows)


def write_transport_table(
    settings: TransportTableSettings,
    rows: tuple[tuple[str, str], ...],
    *,
    source: str,
    timeout: float = POSTMAP_TIMEOUT_SECONDS,
) -> TableWrite:
    """Write ``rows`` as the table ``settings`` describes, atomically; skip it if unchanged.

    Unchanged means: the source file in place has exactly this text and the built file exists.
    Otherwise the source goes to a temporary file in the same directory (mode 0644: Postfix
    reads it as another user; it holds no secret), ``postmap -c postfix_config_dir TYPE:TMP``
    builds it (no shell, bounded by ``timeout``), and the built file, then the source, are
    renamed into place and the directory synced. Temporary files never outlive the call.
    Raises ``TableWriteError`` (with postmap's own message) when anything fails; the table in
    place is then left as it was.
    """
    text = render(rows, source=source, settings=settings)
    if _unchanged(settings, text):
        mtime = settings.built_path.stat().st_mtime
        return TableWrite(settings, "unchanged", len(rows), mtime)
    directory = settings.path.parent
    suffix = BUILT_SUFFIX[settings.type]
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{settings.path.name}.", suffix=".new", dir=directory
        )
    except OSError as err:
        raise TableWriteError(
            settings, f"cannot create a file in {directory}: {_reason(err)}"
        ) from None
    tmp_source = Path(tmp_name)
    tmp_built = tmp_source.with_name(tmp_source.name + suffix)
    try:
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fchmod(handle.fileno(), 0o644)
                os.fsync(handle.fileno())
        except OSError as err:
            raise TableWriteError(settings, f"cannot write {tmp_source}: {_reason(err)}") from None
        _postmap(settings, tmp_source, timeout)
        try:
            os.chmod(tmp_built, 0o644)
            _fsync_file(tmp_built)
            os.replace(tmp_built, settings.built_path)
            os.replace(tmp_source, settings.path)
            _fsync_file(directory)
        except OSError as err:
            raise TableWriteError(
                settings, f"cannot put the table in place: {_reason(err)}"
            ) from None
    finally:
        for leftover in (tmp_source, tmp_built):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return TableWrite(settings, "written", len(rows), time.time())


def problems(settings: TransportTableSettings) -> list[str]:
    """What would make a write fail, found without writing (for ``check-config``)."""
    found: list[str] = []
    directory = settings.path.parent
    if not directory.is_dir():
        found.append(f"directory {directory} does not exist")
    elif not os.access(directory, os.W_OK | os.X_OK):
        found.append(f"directory {directory} is not writable by this user")
    command = settings.postmap_command()
    resolved = shutil.which(command)
    if resolved is None:
        found.append(f"postmap command {command!r} not found or not executable")
    main_cf = Path(settings.postfix_config_dir) / "main.cf"
    if not main_cf.is_file():
        found.append(f"{main_cf} does not exist (postmap needs it; set postfix_config_dir)")
    return found


def _unchanged(settings: TransportTableSettings, text: str) -> bool:
    try:
        current = settings.path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return current == text and settings.built_path.is_file()


def _postmap(settings: TransportTableSettings, source: Path, timeout: float) -> None:
    command = settings.postmap_command()
    argv = [command, "-c", settings.postfix_config_dir, f"{settings.type}:{source}"]
    try:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise TableWriteError(settings, f"postmap command {command!r} not found") from None
    except subprocess.TimeoutExpired:
        raise TableWriteError(settings, f"{command} did not finish within {timeout:g}s") from None
    except OSError as err:
        raise TableWriteError(settings, f"cannot run {command}: {_reason(err)}") from None
    if result.returncode != 0:
        output = " ".join((result.stderr or result.stdout).split())[-500:] or "no message"
        raise TableWriteError(settings, f"{command} exited with {result.returncode}: {output}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__
