"""Backup and restore of a whole ledger (`custody-backup/v1`, described in docs/OPERATIONS.md).

A backup is one tar archive whose first member is `MANIFEST.json`:

* `db/ledger.sqlite3`  SQLite: a copy made with SQLite's online backup API (one consistent
  snapshot while the server keeps writing), or
  `db/ledger.pgdump`   PostgreSQL: `pg_dump --format=custom` of the ledger's schema, taken in a
  snapshot exported from the transaction that also read the manifest's log heads;
* `checkpoints/<platform>/notes.log` and `last.json`: the signed checkpoints (copied BEFORE
  the database snapshot, so every checkpoint in the archive is covered by the database copy);
* `keys/master.key`, `keys/checkpoint.key`: ONLY with `include_keys` (default: excluded; keys are
  backed up separately and offline).

The manifest records the format, the ledger id, per platform the log size, the chain head, the
latest signed checkpoint and the verifier key, and the SHA-256 and size of every other member.

Restore refuses a non-empty target (unless `force`, which moves what it would replace aside,
never deletes it), refuses an archive whose members do not match the manifest BEFORE placing
anything, then restores and verifies: each platform's log is reloaded exactly as the service
loads it (re-chained and replayed), compared with the manifest's size and head, and checked
against the backup's own checkpoints and against checkpoints an auditor holds. A restore that
is shorter than a known checkpoint ("older than a known checkpoint") or has another root at
that size ("fork") stays in place for inspection, marked by a `RESTORE-UNVERIFIED` file that
`restore_guard` (called by `custody serve`) refuses to start with.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import IO, Any, Final

from ledger.checkpoint import NoteSigner, load_key, origin_for, parse_checkpoint_note
from ledger.config import STORE_POSTGRES, STORE_SQLITE, Config

log = logging.getLogger("ledger.backup")

FORMAT: Final = "custody-backup/v1"
MANIFEST: Final = "MANIFEST.json"
DB_SQLITE: Final = "db/ledger.sqlite3"
DB_POSTGRES: Final = "db/ledger.pgdump"
KEY_MASTER: Final = "keys/master.key"
KEY_SIGNING: Final = "keys/checkpoint.key"
CHECKPOINT_FILES: Final = ("notes.log", "last.json")
MARKER: Final = "RESTORE-UNVERIFIED"
KEYS_NEEDED: Final = "RESTORE-KEYS-NEEDED"
REPORT: Final = "RESTORE-REPORT.json"
ACCEPTED: Final = "RESTORE-ACCEPTED.json"
SQLITE_EVENTS: Final = "stored_events"  # eventsourcing's SQLite application table
PG_EVENTS: Final = "custody_events"  # eventsourcing's PostgreSQL table for the app `custody`
MAX_MANIFEST_BYTES: Final = 64 << 20
COPY_CHUNK: Final = 1 << 20

_PLATFORM_RE: Final = r"[a-z0-9][a-z0-9-]{0,62}"
_MEMBER_RE: Final = re.compile(
    rf"^(db/ledger\.(sqlite3|pgdump)|checkpoints/{_PLATFORM_RE}/(notes\.log|last\.json)"
    r"|keys/(master\.key|checkpoint\.key))$"
)
_SCHEMA_RE: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

KEYS_NOTE: Final = (
    "KEYS NOT INCLUDED: this backup holds no master key and no checkpoint signing key. Back "
    "them up separately and OFFLINE ({master}; {signing}). Without the master key the personal "
    "data in this backup cannot be decrypted; without the signing key a restored ledger signs "
    "checkpoints under a key auditors do not know."
)

# -- errors -------------------------------------------------------------------------------------


class BackupError(RuntimeError):
    """The backup could not be taken (no ledger, pg_dump missing or failing, ...)."""


class PgToolMissing(BackupError):
    """pg_dump / pg_restore / psql is not installed (not on PATH nor /usr/lib/postgresql)."""


class RestoreRefused(RuntimeError):
    """Nothing was restored: the target is not empty, or the archive is unusable or tampered."""


class RestoreUnverified(RuntimeError):
    """The data folder holds a restore that did not verify (or waits for its keys)."""


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupResult:
    path: Path
    manifest: dict[str, Any]
    bytes: int

    @property
    def keys_included(self) -> bool:
        return bool(self.manifest["keys_included"])


@dataclass
class Problem:
    code: str  # OLDER_THAN_CHECKPOINT, FORK, CHAIN_BROKEN, MANIFEST_MISMATCH, CHECKPOINT, ...
    platform: str | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "platform": self.platform, "message": self.message}


@dataclass
class PlatformCheck:
    platform: str
    size: int = 0
    head: str = ""
    checkpoints_checked: int = 0  # the backup's own
    auditor_checkpoints_checked: int = 0
    balances: dict[str, int] = field(default_factory=dict)  # account -> posted (minor units)

    def as_dict(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "size": self.size,
            "head": self.head,
            "checkpoints_checked": self.checkpoints_checked,
            "auditor_checkpoints_checked": self.auditor_checkpoints_checked,
        }


@dataclass
class RestoreReport:
    archive: str
    store: str
    target: str
    platforms: dict[str, PlatformCheck] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    keys_included: bool = False
    moved_aside: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "archive": self.archive,
            "store": self.store,
            "target": self.target,
            "keys_included": self.keys_included,
            "platforms": {k: v.as_dict() for k, v in sorted(self.platforms.items())},
            "problems": [p.as_dict() for p in self.problems],
            "warnings": self.warnings,
            "moved_aside": self.moved_aside,
        }


# -- helpers ------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes, *, exclusive: bool = True) -> None:
    """Write a file readable by its owner only (keys, reports naming keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def find_pg_tool(name: str, pg_bin: str | Path | None = None) -> Path | None:
    """`pg_dump`, `pg_restore` or `psql`: in `pg_bin`, else on PATH, else the newest
    /usr/lib/postgresql/*/bin."""
    if pg_bin is not None:
        candidate = Path(pg_bin) / name
        return candidate if candidate.is_file() else None
    found = shutil.which(name)
    if found:
        return Path(found)

    def version(p: str) -> tuple[int, ...]:
        parts = Path(p).parts
        try:
            return tuple(int(x) for x in parts[-3].split("."))
        except ValueError:
            return (0,)

    candidates = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"), key=version)
    return Path(candidates[-1]) if candidates else None


def _pg_tool(name: str, pg_bin: str | Path | None) -> Path:
    tool = find_pg_tool(name, pg_bin)
    if tool is None:
        raise PgToolMissing(
            f"{name} not found (looked in {pg_bin or 'PATH and /usr/lib/postgresql/*/bin'}); "
            "install the PostgreSQL client tools of the server's major version or pass --pg-bin"
        )
    return tool


def _pg_schema(config: Config) -> str:
    schema = config.postgres.get("POSTGRES_SCHEMA") or "public"
    if not _SCHEMA_RE.match(schema):
        raise BackupError(f"schema {schema!r}: backup and restore need a name of [a-z0-9_]")
    return schema


def _pg_env(config: Config) -> dict[str, str]:
    """libpq's environment for pg_dump/pg_restore/psql: the password never goes on a command
    line (it would show in `ps`)."""
    pg = config.postgres
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGHOST=pg.get("POSTGRES_HOST", "127.0.0.1"),
        PGPORT=pg.get("POSTGRES_PORT", "5432"),
        PGUSER=pg.get("POSTGRES_USER", "postgres"),
        PGDATABASE=pg.get("POSTGRES_DBNAME", "postgres"),
        PGCONNECT_TIMEOUT=pg.get("POSTGRES_CONNECT_TIMEOUT", "10"),
        PGAPPNAME="custody-backup",
    )
    if pg.get("POSTGRES_PASSWORD"):
        env["PGPASSWORD"] = pg["POSTGRES_PASSWORD"]
    return env


def _pg_connect(config: Config) -> Any:
    import psycopg

    pg = config.postgres
    return psycopg.connect(
        host=pg.get("POSTGRES_HOST", "127.0.0.1"),
        port=pg.get("POSTGRES_PORT", "5432"),
        user=pg.get("POSTGRES_USER", "postgres"),
        password=pg.get("POSTGRES_PASSWORD", ""),
        dbname=pg.get("POSTGRES_DBNAME", "postgres"),
        connect_timeout=int(pg.get("POSTGRES_CONNECT_TIMEOUT", "10") or 10),
        application_name="custody-backup",
    )


def _heads(cursor: Any, table: str, ph: str) -> dict[str, dict[str, Any]]:
    """Per platform: log size and chain head, read in the caller's snapshot."""
    cursor.execute(
        f"SELECT state FROM {table} WHERE originator_id = {ph} ORDER BY originator_version",
        ("directory",),
    )
    platforms = [bytes(row[0]).decode() for row in cursor.fetchall()]
    out: dict[str, dict[str, Any]] = {}
    for pid in platforms:
        cursor.execute(
            f"SELECT originator_version, state FROM {table} WHERE originator_id = {ph} "
            "ORDER BY originator_version DESC LIMIT 1",
            (f"log:{pid}",),
        )
        row = cursor.fetchone()
        if row is None:
            out[pid] = {"size": 0, "head": None}
        else:
            out[pid] = {"size": int(row[0]) + 1, "head": bytes(row[1])[:32].hex()}
    return out


# -- checkpoints in a data folder ----------------------------------------------------------------


def _read_notes(directory: Path) -> list[tuple[int, bytes]]:
    """(size, note) of every complete line of a checkpoint log (a torn last line never counted),
    plus last.json's note if it is newer, oldest first."""
    notes: dict[int, bytes] = {}
    try:
        data = (directory / "notes.log").read_bytes()
    except FileNotFoundError:
        data = b""
    for line in data.split(b"\n")[:-1]:  # the part after the last LF is torn or empty
        size_text, _, b64 = line.partition(b" ")
        notes[int(size_text)] = base64.b64decode(b64)
    try:
        raw = json.loads((directory / "last.json").read_text())
    except FileNotFoundError:
        raw = None
    if raw is not None:
        notes.setdefault(int(raw["size"]), base64.b64decode(raw["note"]))
    return sorted(notes.items())


def _copy_checkpoints(data_dir: Path, dest: Path) -> dict[str, list[str]]:
    """Copy data_dir/checkpoints/<platform>/{notes.log,last.json}; the complete lines only."""
    copied: dict[str, list[str]] = {}
    root = data_dir / "checkpoints"
    if not root.is_dir():
        return copied
    for pdir in sorted(root.iterdir()):
        if not pdir.is_dir() or not re.fullmatch(_PLATFORM_RE, pdir.name):
            continue
        names: list[str] = []
        notes = pdir / "notes.log"
        if notes.exists():
            data = notes.read_bytes()
            data = data[: data.rfind(b"\n") + 1]  # a torn last append never counted
            out = dest / "checkpoints" / pdir.name / "notes.log"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            names.append("notes.log")
        last = pdir / "last.json"
        if last.exists():
            out = dest / "checkpoints" / pdir.name / "last.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(last.read_bytes())  # replaced atomically by the writer
            names.append("last.json")
        if names:
            copied[pdir.name] = names
    return copied


# -- backup -------------------------------------------------------------------------------------


def backup(
    config: Config,
    out: str | Path,
    *,
    include_keys: bool = False,
    pg_bin: str | Path | None = None,
    after_checkpoints: Callable[[], None] | None = None,
) -> BackupResult:
    """Write a `custody-backup/v1` archive of the ledger `config` names to `out`.

    Safe while `custody serve` runs. The archive is written through `<out>.partial` and renamed
    at the end, so an archive that exists is complete. `after_checkpoints` (tests) runs between
    copying the checkpoint logs and taking the database snapshot.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".custody-backup-", dir=out.parent))
    try:
        # 1. checkpoints first: anything signed later is covered by the later database snapshot
        copied = _copy_checkpoints(config.data_dir, staging)
        if after_checkpoints is not None:
            after_checkpoints()
        # 2. the database, in one consistent snapshot, and the heads read from that snapshot
        if config.store == STORE_POSTGRES:
            db_member = DB_POSTGRES
            heads, source = _pg_dump(config, staging / DB_POSTGRES, pg_bin)
        else:
            db_member = DB_SQLITE
            heads, source = _sqlite_snapshot(config, staging / DB_SQLITE)
        # 3. keys, only when asked for
        keys: list[str] = []
        if include_keys:
            keys = _stage_keys(config, staging)
        manifest = _manifest(config, staging, heads, source, copied, include_keys)
        members = [db_member]
        for pid, names in sorted(copied.items()):
            members.extend(f"checkpoints/{pid}/{name}" for name in names)
        members.extend(keys)
        for name in members:
            digest, size = _sha256_file(staging / name)
            manifest["members"].append({"name": name, "sha256": digest, "bytes": size})
        partial = out.with_name(out.name + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
            body = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
            info = tarfile.TarInfo(MANIFEST)
            info.size = len(body)
            info.mode = 0o600
            info.mtime = manifest["created_ms"] // 1000
            tar.addfile(info, io.BytesIO(body))
            for name in members:
                path = staging / name
                info = tarfile.TarInfo(name)
                info.size = path.stat().st_size
                info.mode = 0o600
                info.mtime = manifest["created_ms"] // 1000
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, out)
        _fsync_dir(out.parent)
        return BackupResult(out, manifest, out.stat().st_size)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sqlite_snapshot(
    config: Config, dest: Path
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    src_path = config.sqlite_path
    if not src_path.is_file():
        raise BackupError(f"no ledger at {src_path}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = sqlite3.connect(src_path, timeout=30)
    try:
        dst = sqlite3.connect(dest)
        try:
            # one step (pages=-1): the whole copy comes from one read snapshot; in WAL mode the
            # writer is not blocked while it runs
            src.backup(dst, pages=-1)
            heads = _heads(dst.cursor(), SQLITE_EVENTS, "?")
            dst.commit()
        finally:
            dst.close()
    finally:
        src.close()
    return heads, {"sqlite_file": src_path.name}


def _pg_dump(
    config: Config, dest: Path, pg_bin: str | Path | None
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    from psycopg import IsolationLevel
    from psycopg.sql import SQL, Identifier

    pg_dump = _pg_tool("pg_dump", pg_bin)
    schema = _pg_schema(config)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _pg_connect(config) as conn:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_export_snapshot(), current_setting('server_version')")
            snapshot, server_version = cur.fetchone()
            table = SQL("{}.{}").format(Identifier(schema), Identifier(PG_EVENTS)).as_string(conn)
            try:
                heads = _heads(cur, table, "%s")
            except Exception as exc:
                raise BackupError(f"no ledger in schema {schema!r}: {exc}") from None
            # pg_dump reads the very snapshot the heads were read in (the transaction stays open)
            proc = subprocess.run(
                [
                    str(pg_dump),
                    "--format=custom",
                    f"--schema={schema}",
                    f"--snapshot={snapshot}",
                    "--no-password",
                    "--file",
                    str(dest),
                ],
                env=_pg_env(config),
                capture_output=True,
                text=True,
                check=False,
            )
        conn.rollback()
    if proc.returncode != 0:
        raise BackupError(f"pg_dump failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    tool_version = subprocess.run(
        [str(pg_dump), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    source = {
        "schema": schema,
        "dbname": config.postgres.get("POSTGRES_DBNAME", "postgres"),
        "server_version": server_version,
        "pg_dump": tool_version,
    }
    return heads, source


def _stage_keys(config: Config, staging: Path) -> list[str]:
    """Copy the key material (never printed, never logged) into the staging folder."""
    staged: list[str] = []
    if config.master_key_b64:
        master = config.master_key_b64.encode() + b"\n"
    else:
        path = config.data_dir / "master.key"
        if not path.is_file():
            raise BackupError(f"--include-keys: no master key at {path} nor CUSTODY_MASTER_KEY")
        master = path.read_bytes()
    _write_private(staging / KEY_MASTER, master)
    staged.append(KEY_MASTER)
    signing = config.signing_key_path
    if signing is None or not signing.is_file():
        raise BackupError(f"--include-keys: no checkpoint signing key at {signing}")
    _write_private(staging / KEY_SIGNING, signing.read_bytes())
    staged.append(KEY_SIGNING)
    return staged


def _vkey(config: Config, platform_id: str) -> str | None:
    """The verifier key for a platform, if the signing key is readable here (it may be kept
    offline; then the manifest carries none and restores use the auditor's --vkey)."""
    path = config.signing_key_path
    if path is None or not path.is_file():
        return None
    try:
        key = load_key(path)
    except Exception:  # an unreadable key is reported elsewhere; the manifest just lacks it
        return None
    return NoteSigner(key, origin_for(config.ledger_id, platform_id)).vkey


def _manifest(
    config: Config,
    staging: Path,
    heads: dict[str, dict[str, Any]],
    source: dict[str, Any],
    copied: dict[str, list[str]],
    include_keys: bool,
) -> dict[str, Any]:
    platforms: dict[str, Any] = {}
    for pid in sorted(set(heads) | set(copied)):
        head = heads.get(pid, {"size": 0, "head": None})
        notes = _read_notes(staging / "checkpoints" / pid) if pid in copied else []
        latest = None
        if notes:
            size, note = notes[-1]
            _, _, root = parse_checkpoint_note(note)
            latest = {
                "size": size,
                "root": base64.b64encode(root).decode(),
                "note": base64.b64encode(note).decode(),
            }
        platforms[pid] = {
            "size": head["size"],
            "head": head["head"],
            "origin": origin_for(config.ledger_id, pid),
            "vkey": _vkey(config, pid),
            "checkpoints": len(notes),
            "checkpoint": latest,
        }
    return {
        "format": FORMAT,
        "created_ms": _now_ms(),
        "ledger_id": config.ledger_id,
        "store": config.store,
        "source": source,
        "keys_included": include_keys,
        "platforms": platforms,
        "members": [],
    }


def keys_note(config: Config) -> str:
    """The loud note printed when a backup excludes the keys (it names paths, never keys)."""
    master = "CUSTODY_MASTER_KEY" if config.master_key_b64 else str(config.data_dir / "master.key")
    return KEYS_NOTE.format(
        master=f"master key: {master}", signing=f"signing key: {config.signing_key_path}"
    )


# -- reading an archive --------------------------------------------------------------------------


def _check_manifest(manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RestoreRefused(f"not a {FORMAT} archive (manifest format)")
    for key in ("ledger_id", "store", "platforms", "members", "keys_included"):
        if key not in manifest:
            raise RestoreRefused(f"manifest lacks {key!r}")
    if manifest["store"] not in (STORE_SQLITE, STORE_POSTGRES):
        raise RestoreRefused(f"manifest names an unknown store {manifest['store']!r}")
    names = [m.get("name") for m in manifest["members"]]
    if len(set(names)) != len(names):
        raise RestoreRefused("manifest lists a member twice")
    for m in manifest["members"]:
        name = m.get("name")
        if not isinstance(name, str) or not _MEMBER_RE.match(name):
            raise RestoreRefused(f"manifest lists an unexpected member {name!r}")
        if not isinstance(m.get("sha256"), str) or not isinstance(m.get("bytes"), int):
            raise RestoreRefused(f"manifest entry for {name} lacks sha256/bytes")
    db = DB_POSTGRES if manifest["store"] == STORE_POSTGRES else DB_SQLITE
    if db not in names:
        raise RestoreRefused(f"manifest lists no {db}")
    key_members = {n for n in names if n.startswith("keys/")}
    if bool(key_members) != bool(manifest["keys_included"]):
        raise RestoreRefused("manifest keys_included does not match its members")
    for pid, info in manifest["platforms"].items():
        if not re.fullmatch(_PLATFORM_RE, pid) or not isinstance(info, dict):
            raise RestoreRefused(f"manifest names a malformed platform {pid!r}")
    return manifest


def _stage_archive(archive: Path, staging: Path) -> dict[str, Any]:
    """Unpack into `staging`, checking every member against the manifest (hash and size);
    raise RestoreRefused on the first difference, on anything unexpected or missing."""
    try:
        tar = tarfile.open(archive, mode="r|*")  # noqa: SIM115 (closed by the `with` below)
    except (OSError, tarfile.TarError) as exc:
        raise RestoreRefused(f"cannot read {archive}: {exc}") from None
    with tar:
        try:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile():
                raise RestoreRefused(f"the archive does not start with {MANIFEST}")
            if first.size > MAX_MANIFEST_BYTES:
                raise RestoreRefused("manifest too large")
            fobj = tar.extractfile(first)
            assert fobj is not None
            try:
                manifest = _check_manifest(json.loads(fobj.read()))
            except ValueError as exc:
                raise RestoreRefused(f"manifest is not JSON: {exc}") from None
            expected = {m["name"]: m for m in manifest["members"]}
            seen: set[str] = set()
            while (member := tar.next()) is not None:  # not `for`: it restarts at the top
                name = member.name
                if name not in expected or name in seen:
                    raise RestoreRefused(f"archive member {name!r} is not in the manifest")
                if not member.isfile():
                    raise RestoreRefused(f"archive member {name!r} is not a regular file")
                seen.add(name)
                want = expected[name]
                src = tar.extractfile(member)
                assert src is not None
                dest = staging / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                size = 0
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    while chunk := src.read(COPY_CHUNK):
                        h.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
                if h.hexdigest() != want["sha256"] or size != want["bytes"]:
                    raise RestoreRefused(
                        f"archive member {name} does not match the manifest "
                        f"(SHA-256 {h.hexdigest()[:16]}..., {size} bytes; manifest "
                        f"{want['sha256'][:16]}..., {want['bytes']} bytes): the archive was "
                        "altered or damaged; nothing was restored"
                    )
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise RestoreRefused(f"damaged archive: {exc}; nothing was restored") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise RestoreRefused(f"archive lacks {', '.join(missing)}; nothing was restored")
    return manifest


def read_manifest(archive: str | Path) -> dict[str, Any]:
    """The manifest of an archive, checked for shape only (no member hashes)."""
    with tarfile.open(archive, mode="r|*") as tar:
        first = tar.next()
        if first is None or first.name != MANIFEST:
            raise RestoreRefused(f"the archive does not start with {MANIFEST}")
        fobj = tar.extractfile(first)
        assert fobj is not None
        return _check_manifest(json.loads(fobj.read()))


def check_archive(archive: str | Path) -> dict[str, Any]:
    """Check every member's hash against the manifest without restoring anything."""
    with tempfile.TemporaryDirectory(prefix="custody-check-") as tmp:
        return _stage_archive(Path(archive), Path(tmp))


# -- restore ------------------------------------------------------------------------------------


def _target_entries(data_dir: Path) -> list[str]:
    try:
        return sorted(p.name for p in data_dir.iterdir())
    except FileNotFoundError:
        return []


def _move_aside(path: Path, aside: Path, data_dir: Path, moved: list[str]) -> None:
    if not path.exists() and not path.is_symlink():
        return
    try:
        rel = path.relative_to(data_dir)
    except ValueError:
        rel = Path(path.name)
    dest = aside / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(dest))
    moved.append(str(dest))


def restore(
    config: Config,
    archive: str | Path,
    *,
    force: bool = False,
    checkpoints: Sequence[bytes] = (),
    vkeys: Sequence[str] = (),
    pg_bin: str | Path | None = None,
) -> RestoreReport:
    """Restore `archive` into the data folder (and, for PostgreSQL, the schema) `config` names,
    then verify it (see the module doc). Raises RestoreRefused when nothing was restored;
    otherwise returns the report, and a report that is not ok leaves the RESTORE-UNVERIFIED
    marker in the data folder."""
    archive = Path(archive)
    data_dir = config.data_dir
    verifiers = _parse_vkeys(vkeys)
    if checkpoints and not verifiers:
        raise RestoreRefused(
            "--checkpoint needs --vkey: a checkpoint counts only if its signature verifies"
        )
    entries = _target_entries(data_dir)
    if entries and not force:
        raise RestoreRefused(
            f"{data_dir} is not empty ({', '.join(entries[:5])}"
            f"{', ...' if len(entries) > 5 else ''}); "
            "restore into an empty folder, or pass --force to move what it replaces aside"
        )
    if config.store == STORE_POSTGRES and not force:
        _pg_check_target(config, pg_bin)
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".restore-staging-", dir=data_dir))
    placed = False
    try:
        manifest = _stage_archive(archive, staging)
        if manifest["store"] != config.store:
            raise RestoreRefused(
                f"the archive is a {manifest['store']} backup but CUSTODY_STORE is {config.store}"
            )
        if config.store == STORE_POSTGRES:
            target = (
                f"postgres schema {_pg_schema(config)} in {config.postgres.get('POSTGRES_DBNAME')}"
            )
        else:
            target = str(config.sqlite_path)
        report = RestoreReport(
            str(archive), config.store, target, keys_included=bool(manifest["keys_included"])
        )
        # from here on data is placed: the marker goes first, so a crash leaves it behind
        _write_marker(data_dir, {"status": "restoring", "archive": str(archive)})
        aside = data_dir / f"before-restore-{_now_ms()}"
        if config.store == STORE_POSTGRES:
            _pg_restore(config, staging / DB_POSTGRES, manifest, force, pg_bin, report)
            placed = True
        else:
            placed = True  # from the first file moved aside on
            for suffix in ("", "-wal", "-shm", "-journal"):
                p = config.sqlite_path.with_name(config.sqlite_path.name + suffix)
                _move_aside(p, aside, data_dir, report.moved_aside)
            config.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staging / DB_SQLITE), str(config.sqlite_path))
        ck_root = data_dir / "checkpoints"
        _move_aside(ck_root, aside, data_dir, report.moved_aside)
        if (staging / "checkpoints").is_dir():
            shutil.move(str(staging / "checkpoints"), str(ck_root))
        _place_keys(config, staging, manifest, aside, report)
        _fsync_dir(data_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not placed:  # refused before any data was placed: leave no marker behind
            (data_dir / MARKER).unlink(missing_ok=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    verify_restored(config, manifest, report, checkpoints=checkpoints, verifiers=verifiers)
    _finish(config, manifest, report)
    return report


def _place_keys(
    config: Config, staging: Path, manifest: dict[str, Any], aside: Path, report: RestoreReport
) -> None:
    data_dir = config.data_dir
    master_path = data_dir / "master.key"
    signing_path = config.signing_key_path
    assert signing_path is not None
    if not manifest["keys_included"]:
        report.warnings.append(
            "the backup holds no keys: install the master key "
            f"({'CUSTODY_MASTER_KEY' if config.master_key_b64 else master_path}) and the "
            f"checkpoint signing key ({signing_path}) from their offline backup BEFORE starting "
            "custody serve; it refuses to start until they are in place"
        )
        return
    master = (staging / KEY_MASTER).read_bytes()
    if config.master_key_b64:
        if master.strip() != config.master_key_b64.encode().strip():
            report.warnings.append(
                "CUSTODY_MASTER_KEY differs from the master key in the backup: personal data "
                "will not decrypt until it is set to the backed-up key"
            )
    else:
        _move_aside(master_path, aside, data_dir, report.moved_aside)
        _write_private(master_path, master)
    if signing_path.exists():
        if signing_path.read_bytes() == (staging / KEY_SIGNING).read_bytes():
            return
        _move_aside(signing_path, aside, data_dir, report.moved_aside)
    _write_private(signing_path, (staging / KEY_SIGNING).read_bytes())


def _write_marker(data_dir: Path, content: dict[str, Any]) -> None:
    _write_private(
        data_dir / MARKER,
        json.dumps(content, indent=1, sort_keys=True).encode() + b"\n",
        exclusive=False,
    )


def _finish(config: Config, manifest: dict[str, Any], report: RestoreReport) -> None:
    data_dir = config.data_dir
    body = {**report.as_dict(), "restored_ms": _now_ms(), "ledger_id": manifest["ledger_id"]}
    if config.ledger_id != manifest["ledger_id"]:
        report.warnings.append(
            f"CUSTODY_LEDGER_ID is {config.ledger_id!r} here but {manifest['ledger_id']!r} in the "
            "backup: set it to the backup's, or the checkpoint logs will not load"
        )
        body["warnings"] = report.warnings
    if not manifest["keys_included"]:
        # `restore_guard` refuses to serve until these keys are installed (and match)
        vkeys = {
            pid: info.get("vkey") for pid, info in manifest["platforms"].items() if info.get("vkey")
        }
        needed = {"ledger_id": manifest["ledger_id"], "vkeys": vkeys}
        _write_private(
            data_dir / KEYS_NEEDED,
            json.dumps(needed, indent=1, sort_keys=True).encode() + b"\n",
            exclusive=False,
        )
    if not report.ok:
        _write_marker(data_dir, {**body, "status": "unverified"})
        _fsync_dir(data_dir)
        return
    text = json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"
    _write_private(data_dir / REPORT, text, exclusive=False)
    (data_dir / MARKER).unlink()
    _fsync_dir(data_dir)


# -- PostgreSQL restore ---------------------------------------------------------------------------


def _pg_relations(conn: Any, schema: str) -> tuple[int] | None:
    """(number of relations) in `schema`, or None if it does not exist."""
    row = conn.execute(
        "SELECT count(c.oid) FROM pg_namespace n LEFT JOIN pg_class c "
        "ON c.relnamespace = n.oid WHERE n.nspname = %s GROUP BY n.oid",
        (schema,),
    ).fetchone()
    return None if row is None else (int(row[0]),)


def _pg_check_target(config: Config, pg_bin: str | Path | None) -> None:
    """Before anything is touched: the tools exist and the target schema is empty."""
    _pg_tool("pg_restore", pg_bin)
    _pg_tool("psql", pg_bin)
    target = _pg_schema(config)
    with _pg_connect(config) as conn:
        row = _pg_relations(conn, target)
    if row is not None and row[0] > 0:
        raise RestoreRefused(
            f"schema {target} is not empty; restore into an empty or new schema, or pass "
            "--force to rename it aside"
        )


def _pg_restore(
    config: Config,
    dump: Path,
    manifest: dict[str, Any],
    force: bool,
    pg_bin: str | Path | None,
    report: RestoreReport,
) -> None:
    """pg_restore the dump as SQL, with the source schema renamed to the target, into psql in
    ONE transaction (all or nothing)."""
    from psycopg.sql import SQL, Identifier

    pg_restore = _pg_tool("pg_restore", pg_bin)
    psql = _pg_tool("psql", pg_bin)
    source = manifest.get("source", {}).get("schema")
    if not isinstance(source, str) or not _SCHEMA_RE.match(source):
        raise RestoreRefused("the manifest names no usable source schema")
    target = _pg_schema(config)
    with _pg_connect(config) as conn:
        conn.autocommit = True
        row = _pg_relations(conn, target)
        if row is not None and row[0] > 0:
            if not force:
                raise RestoreRefused(
                    f"schema {target} is not empty; restore into an empty or new schema, or "
                    "pass --force to rename it aside"
                )
            aside = f"{target[:40]}_before_restore_{_now_ms() % 10**12}"
            conn.execute(
                SQL("ALTER SCHEMA {} RENAME TO {}").format(Identifier(target), Identifier(aside))
            )
            report.moved_aside.append(f"schema {aside}")
        elif row is not None:
            conn.execute(SQL("DROP SCHEMA {}").format(Identifier(target)))  # empty: nothing lost
    env = _pg_env(config)
    with tempfile.TemporaryFile() as restore_err, tempfile.TemporaryFile() as psql_err:
        producer = subprocess.Popen(
            [str(pg_restore), "--no-owner", "--no-privileges", "--file=-", str(dump)],
            stdout=subprocess.PIPE,
            stderr=restore_err,
            env=env,
        )
        consumer = subprocess.Popen(
            [
                str(psql),
                "-X",
                "-q",
                "--no-password",
                "-v",
                "ON_ERROR_STOP=1",
                "--single-transaction",
                "-f",
                "-",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=psql_err,
            env=env,
        )
        assert producer.stdout is not None and consumer.stdin is not None
        try:
            consumer.stdin.write(f'CREATE SCHEMA "{target}";\n'.encode())
            for line in rename_schema(producer.stdout, source, target):
                consumer.stdin.write(line)
            consumer.stdin.close()
        except BrokenPipeError:
            pass  # psql stopped on an error: reported below
        finally:
            producer.stdout.close()
        rc_restore = producer.wait()
        rc_psql = consumer.wait()
        if rc_restore != 0 or rc_psql != 0:
            restore_err.seek(0)
            psql_err.seek(0)
            raise RestoreRefused(
                f"PostgreSQL restore failed (pg_restore {rc_restore}, psql {rc_psql}; the "
                "transaction was rolled back): "
                f"{restore_err.read().decode(errors='replace')[-1500:]}"
                f"{psql_err.read().decode(errors='replace')[-1500:]}"
            )


def rename_schema(lines: IO[bytes], source: str, target: str) -> Iterator[bytes]:
    """The SQL of a `pg_restore --file=-` with schema `source` renamed to `target`.

    Data (between `COPY ... FROM stdin;` and `\\.`) passes through untouched; elsewhere every
    `source.` / `"source".` qualifier becomes the target's, and `CREATE SCHEMA source;` is
    dropped (the caller creates the target first). Both names are plain lowercase identifiers.
    """
    bare = re.compile(rb'(?<![\w$"])' + re.escape(source.encode()) + rb"(?=\.)")
    quoted = re.compile(rb'"' + re.escape(source.encode()) + rb'"(?=\.)')
    create = re.compile(rb"^CREATE SCHEMA (" + re.escape(source.encode()) + rb'|"[^"]*");\s*$')
    t = target.encode()
    in_copy = False
    for line in lines:
        if in_copy:
            if line.rstrip(b"\r\n") == b"\\.":
                in_copy = False
            yield line
            continue
        if create.match(line):
            continue
        if line.startswith(b"COPY ") and line.rstrip().endswith(b"FROM stdin;"):
            in_copy = True
        yield quoted.sub(b'"' + t + b'"', bare.sub(t, line))


# -- verification ---------------------------------------------------------------------------------


def _parse_vkeys(vkeys: Sequence[str]) -> list[Any]:
    from custody_verify.note import VkeyError, parse_vkey

    out = []
    for text in vkeys:
        try:
            out.append(parse_vkey(text))
        except VkeyError as exc:
            raise RestoreRefused(f"--vkey {text[:40]}...: {exc}") from None
    return out


def _open_note(note: bytes, verifiers: Sequence[Any]) -> tuple[str, int, bytes]:
    """Verify a checkpoint note's signature (the auditor's own code) -> (origin, size, root)."""
    from custody_verify.note import open_checkpoint

    cp = open_checkpoint(note, list(verifiers))
    return cp.origin, cp.size, cp.root


def verify_restored(
    config: Config,
    manifest: dict[str, Any],
    report: RestoreReport,
    *,
    checkpoints: Sequence[bytes] = (),
    verifiers: Sequence[Any] = (),
) -> RestoreReport:
    """Reload every platform's restored log as the service does (re-chain and replay), compare
    it with the manifest, and check it against the backup's checkpoints and the auditor's."""
    from custody_verify.note import NoteError
    from ledger.store import LedgerStore

    ledger_id = manifest["ledger_id"]
    # the auditor's checkpoints, by platform (signature first: an unsigned note proves nothing)
    wanted: dict[str, list[tuple[int, bytes, str]]] = {}
    for i, note in enumerate(checkpoints):
        try:
            origin, size, root = _open_note(note, verifiers)
        except NoteError as exc:
            report.problems.append(
                Problem("CHECKPOINT_SIGNATURE", None, f"checkpoint #{i + 1}: {exc}")
            )
            continue
        pid = origin.rsplit("/", 1)[-1]
        if origin != origin_for(ledger_id, pid):
            report.problems.append(
                Problem(
                    "CHECKPOINT_ORIGIN",
                    None,
                    f"checkpoint #{i + 1} is for {origin}, not a log of ledger {ledger_id!r}",
                )
            )
            continue
        wanted.setdefault(pid, []).append((size, root, f"auditor checkpoint #{i + 1}"))
    store = LedgerStore(config)
    try:
        restored = set(store.platform_ids())
        for pid in sorted(set(wanted) - restored):
            sizes = ", ".join(str(s) for s, _, _ in wanted[pid])
            report.problems.append(
                Problem(
                    "OLDER_THAN_CHECKPOINT",
                    pid,
                    f"platform {pid}: the restore is older than a known checkpoint: the "
                    f"platform is missing, but an auditor holds checkpoints of size {sizes}",
                )
            )
        for pid in sorted(set(manifest["platforms"]) - restored):
            if manifest["platforms"][pid].get("size"):
                report.problems.append(
                    Problem(
                        "MANIFEST_MISMATCH",
                        pid,
                        f"platform {pid} is in the manifest but not restored",
                    )
                )
        for pid in sorted(restored):
            report.platforms[pid] = _verify_platform(
                store, pid, manifest, wanted.get(pid, []), verifiers, report
            )
    finally:
        store.close()
    return report


def _verify_platform(
    store: Any,
    pid: str,
    manifest: dict[str, Any],
    auditor: list[tuple[int, bytes, str]],
    verifiers: Sequence[Any],
    report: RestoreReport,
) -> PlatformCheck:
    from custody_verify.note import NoteError, parse_vkey
    from ledger.writer import PlatformWriter

    check = PlatformCheck(pid)
    writer = PlatformWriter(store, pid)
    # a restore proves the whole log: never start from a state snapshot (a cache stored in the
    # same database, so it came with the backup), re-chain and replay every record
    writer.use_snapshots = False
    try:
        writer.load()
    except Exception as exc:  # any failure to reload is a broken log; say where
        report.problems.append(Problem("CHAIN_BROKEN", pid, f"platform {pid}: {exc}"))
        return check
    size = writer.committed_next_seq
    check.size = size
    check.head = writer.head.hex()
    check.balances = {a.id: a.posted_minor for a in writer.state.accounts.values()}
    info = manifest["platforms"].get(pid)
    if info is None:
        report.problems.append(
            Problem("MANIFEST_MISMATCH", pid, f"platform {pid} is not in the manifest")
        )
    elif info.get("size") != size or (size and info.get("head") != check.head):
        report.problems.append(
            Problem(
                "MANIFEST_MISMATCH",
                pid,
                f"platform {pid}: restored log has {size} records, head {check.head[:16]}...; "
                f"the manifest says {info.get('size')} records, "
                f"head {str(info.get('head'))[:16]}...",
            )
        )
    # the backup's own checkpoints: signature (by the manifest's key or a trusted one) and root
    own_verifiers = list(verifiers)
    if info is not None and info.get("vkey"):
        try:
            own_verifiers.append(parse_vkey(info["vkey"]))
        except Exception as exc:
            report.problems.append(Problem("MANIFEST_MISMATCH", pid, f"manifest vkey: {exc}"))
    for cp_size, note in _read_notes(store.config.data_dir / "checkpoints" / pid):
        _, _, root = parse_checkpoint_note(note)
        if own_verifiers:
            try:
                _, _, root = _open_note(note, own_verifiers)
            except NoteError as exc:
                report.problems.append(
                    Problem(
                        "CHECKPOINT_SIGNATURE", pid, f"backup checkpoint of size {cp_size}: {exc}"
                    )
                )
                continue
        _compare(writer, pid, cp_size, root, f"the backup's checkpoint of size {cp_size}", report)
        check.checkpoints_checked += 1
    for cp_size, root, what in auditor:
        _compare(writer, pid, cp_size, root, what, report)
        check.auditor_checkpoints_checked += 1
    return check


def _compare(
    writer: Any, pid: str, size: int, root: bytes, what: str, report: RestoreReport
) -> None:
    restored = writer.committed_next_seq
    if size > restored:
        report.problems.append(
            Problem(
                "OLDER_THAN_CHECKPOINT",
                pid,
                f"platform {pid}: the restore is older than a known checkpoint: {what} covers "
                f"{size} records, the restored log has {restored}",
            )
        )
    elif size > 0 and writer.tree.root(size) != root:
        report.problems.append(
            Problem(
                "FORK",
                pid,
                f"platform {pid}: fork: at size {size} the restored log's root differs from "
                f"{what}; the restored history is not the one that was signed",
            )
        )


# -- the guard `custody serve` calls --------------------------------------------------------------


def restore_guard(config: Config, accept_restore: bool = False) -> str | None:
    """Refuse to serve a restore that did not verify, or whose keys are not installed yet.

    Raises RestoreUnverified with the reason. With `accept_restore` (the operator's decision,
    `custody serve --accept-restore`) an unverified restore is accepted: the marker is renamed
    to RESTORE-ACCEPTED.json (kept as the record of that decision) and a warning is returned.
    Returns None when there is nothing to say.
    """
    data_dir = config.data_dir
    marker = data_dir / MARKER
    if marker.exists():
        try:
            body = json.loads(marker.read_text())
        except ValueError:
            body = {}
        problems = "; ".join(p.get("message", "?") for p in body.get("problems", [])) or body.get(
            "status", "restore did not finish"
        )
        if not accept_restore:
            raise RestoreUnverified(
                f"{marker}: this data folder holds a restore that did not verify ({problems}); "
                "inspect it, then start with --accept-restore to serve it anyway"
            )
        body["accepted_ms"] = _now_ms()
        _write_private(
            data_dir / ACCEPTED,
            json.dumps(body, indent=1, sort_keys=True).encode() + b"\n",
            exclusive=False,
        )
        marker.unlink()
        message = f"serving an UNVERIFIED restore, accepted by the operator: {problems}"
        log.warning(message)
        return message
    needed_path = data_dir / KEYS_NEEDED
    if not needed_path.exists():
        return None
    needed = json.loads(needed_path.read_text())
    missing = []
    if not config.master_key_b64 and not (data_dir / "master.key").exists():
        missing.append(f"master key ({data_dir / 'master.key'} or CUSTODY_MASTER_KEY)")
    signing = config.signing_key_path
    if signing is None or not signing.exists():
        missing.append(f"checkpoint signing key ({signing})")
    if missing:
        raise RestoreUnverified(
            "restored without keys; install " + " and ".join(missing) + " from their offline "
            "backup first (a server started without them would create NEW keys)"
        )
    assert signing is not None
    key = load_key(signing)
    for pid, vkey in needed.get("vkeys", {}).items():
        mine = NoteSigner(key, origin_for(needed.get("ledger_id", config.ledger_id), pid)).vkey
        if mine != vkey and not accept_restore:
            raise RestoreUnverified(
                f"the signing key at {signing} is not the one that signed the backup's "
                f"checkpoints of platform {pid}; install the backed-up key, or start with "
                "--accept-restore to rotate keys deliberately (docs/OPERATIONS.md)"
            )
    needed_path.unlink()
    return None


__all__ = [
    "BackupError",
    "BackupResult",
    "PgToolMissing",
    "PlatformCheck",
    "Problem",
    "RestoreRefused",
    "RestoreReport",
    "RestoreUnverified",
    "backup",
    "check_archive",
    "find_pg_tool",
    "keys_note",
    "read_manifest",
    "rename_schema",
    "restore",
    "restore_guard",
    "verify_restored",
]
