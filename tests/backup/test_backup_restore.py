"""custody backup / restore on SQLite and PostgreSQL (real stores, real signatures, real pg_dump).

The `store_env` fixture (tests/conftest.py) gives a fresh source store of each kind; the restore
target is a fresh data folder (and, for PostgreSQL, a fresh schema in the same database).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import stat
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backup_helpers import (
    Writer,
    fold_posted,
    manifest_of,
    members,
    rewrite_archive,
    run_cli,
    state_posted,
    stored_rows,
    target_env,
)
from helpers import ACTOR, FakeClock, Platform, deposit, make_platform, open_service, transfer

from ledger import backup as bk
from ledger.checkpoint import NoteSigner, generate_key
from ledger.cli_backup import EXIT_REFUSED
from ledger.config import Config
from ledger.service import LedgerService
from ledger.store import LedgerStore
from ledger.writer import verify_stored_chain


def _source(store_env: dict[str, str]) -> Config:
    return Config.from_env(store_env)


def _seed(config: Config) -> tuple[LedgerService, Platform]:
    service = open_service(config, FakeClock())
    p = make_platform(service)
    outcomes = service.execute(
        p.id, [deposit(p, f"seed-{c}", c, 1_000_000) for c in p.customers], ACTOR
    )
    assert all(o.status == "accepted" for o in outcomes)
    service.sign_checkpoint(p.id)
    return service, p


# -- 1. backup while writes continue -------------------------------------------------------------


def test_backup_while_writing_restores_and_verifies(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    config = _source(store_env)
    service, p = _seed(config)
    writer = Writer(service, p)
    archive = tmp_path / "ledger.backup"
    try:
        writer.start()
        while writer.batches < 10:
            time.sleep(0.01)
        result = bk.backup(config, archive, include_keys=True)
        at_backup = writer.batches
        while writer.batches < at_backup + 10:  # keep writing after the snapshot
            time.sleep(0.01)
    finally:
        writer.finish()
    size = result.manifest["platforms"]["p1"]["size"]
    source_rows = stored_rows(config, "p1")
    assert 0 < size < len(source_rows), "the backup is a snapshot taken in the middle of writes"
    assert result.manifest["platforms"]["p1"]["head"] == source_rows[size - 1][:32].hex()
    latest = result.manifest["platforms"]["p1"]["checkpoint"]
    assert latest is not None and latest["size"] <= size
    vkey = service.vkey("p1")
    assert result.manifest["platforms"]["p1"]["vkey"] == vkey
    service.close()

    with target_env(store_env, tmp_path / "restored") as env:
        code, out, err = run_cli(["restore", str(archive), "--vkey", vkey], env)
        assert code == 0, out + err
        assert "VERIFIED" in out
        restored_config = Config.from_env(env)
        # the restored log is exactly the source's first `size` records, and it chains
        assert stored_rows(restored_config, "p1") == source_rows[:size]
        st = LedgerStore(restored_config)
        try:
            assert verify_stored_chain(st, "p1") == (size, None, "ok")
        finally:
            st.close()
        assert not (restored_config.data_dir / bk.MARKER).exists()
        assert bk.restore_guard(restored_config) is None
        # balances equal the source's at the backup's recorded position
        restored = open_service(restored_config, FakeClock(2_000_000_000_000))
        try:
            assert state_posted(restored, "p1") == fold_posted(source_rows[:size])
            assert restored.vkey("p1") == vkey  # the key came back with the archive
            # the restored checkpoint log accepts the next checkpoint: one history, continued
            a, b = p.customers[0], p.customers[1]
            [o] = restored.execute("p1", [transfer(p, "after", a, b, 5)], ACTOR)
            assert o.status == "accepted"
            cp = restored.sign_checkpoint("p1")
            assert cp.size == size + 1
        finally:
            restored.close()


# -- 2. a tampered archive ----------------------------------------------------------------------


@pytest.mark.parametrize("member", ["db", "checkpoint"])
def test_tampered_member_is_refused_before_anything_is_restored(
    store_env: dict[str, str], tmp_path: Path, member: str
) -> None:
    config = _source(store_env)
    service, _ = _seed(config)
    service.close()
    archive = tmp_path / "ledger.backup"
    bk.backup(config, archive)
    files = members(archive)
    name = next(n for n in files if n.startswith("db/" if member == "db" else "checkpoints/"))
    data = bytearray(files[name])
    data[len(data) // 2] ^= 0x01  # one bit
    bad = tmp_path / "tampered.backup"
    rewrite_archive(archive, bad, {name: bytes(data)})
    with target_env(store_env, tmp_path / "restored") as env:
        code, _, err = run_cli(["restore", str(bad)], env)
        assert code == EXIT_REFUSED
        assert "does not match the manifest" in err and name in err
        target = Config.from_env(env)
        # nothing placed: no database file, no checkpoints, no marker, no staging left behind
        assert sorted(p.name for p in target.data_dir.iterdir()) == []
        if target.store == "postgres":
            from helpers import pg_execute

            tables = pg_execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s",
                (env["POSTGRES_SCHEMA"],),
            )
            assert tables == [(0,)]


def test_record_edited_with_consistent_manifest_is_caught_by_the_chain(tmp_path: Path) -> None:
    """Someone who rewrites a record AND the manifest's hash passes the hash check; the chain
    (and the backup's signed checkpoints) still catch it."""
    from helpers import sqlite_env

    config = Config.from_env(sqlite_env(tmp_path / "src"))
    service, _ = _seed(config)
    service.close()
    archive = tmp_path / "ledger.backup"
    bk.backup(config, archive)
    files = members(archive)
    db = tmp_path / "db.sqlite3"
    db.write_bytes(files[bk.DB_SQLITE])
    conn = sqlite3.connect(db)
    (state,) = conn.execute(
        "SELECT state FROM stored_events WHERE originator_id='log:p1' AND originator_version=9"
    ).fetchone()
    edited = state.replace(b",1000000]", b",9000000]")
    assert edited != state
    conn.execute(
        "UPDATE stored_events SET state=? WHERE originator_id='log:p1' AND originator_version=9",
        (edited,),
    )
    conn.commit()
    conn.close()
    new_db = db.read_bytes()
    manifest = json.loads(files[bk.MANIFEST])
    for m in manifest["members"]:
        if m["name"] == bk.DB_SQLITE:
            m["sha256"] = hashlib.sha256(new_db).hexdigest()
            m["bytes"] = len(new_db)
    forged = tmp_path / "forged.backup"
    rewrite_archive(
        archive, forged, {bk.DB_SQLITE: new_db, bk.MANIFEST: json.dumps(manifest).encode()}
    )
    target = Config.from_env(sqlite_env(tmp_path / "restored"))
    report = bk.restore(target, forged)
    assert not report.ok
    assert [p.code for p in report.problems] == ["CHAIN_BROKEN"]
    with pytest.raises(bk.RestoreUnverified, match="did not verify"):
        bk.restore_guard(target)


# -- 3. older than an auditor's checkpoint ------------------------------------------------------


def test_restore_older_than_the_auditors_checkpoint_is_detected(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    config = _source(store_env)
    service, p = _seed(config)
    archive = tmp_path / "old.backup"
    bk.backup(config, archive, include_keys=True)
    a, b, _ = p.customers
    service.execute("p1", [transfer(p, f"later-{i}", a, b, 10) for i in range(20)], ACTOR)
    cp = service.sign_checkpoint("p1")
    vkey = service.vkey("p1")
    service.close()
    note = tmp_path / "auditor.note"
    note.write_bytes(cp.note)
    with target_env(store_env, tmp_path / "restored") as env:
        code, out, err = run_cli(
            ["--json", "restore", str(archive), "--checkpoint", str(note), "--vkey", vkey], env
        )
        assert code == 1, out + err
        report = json.loads(out)
        assert not report["ok"]
        [problem] = report["problems"]
        assert problem["code"] == "OLDER_THAN_CHECKPOINT"
        assert "older than a known checkpoint" in problem["message"]
        assert f"covers {cp.size} records" in problem["message"]
        target = Config.from_env(env)
        # the data stays for inspection, marked; serve refuses it unless accepted
        assert (target.data_dir / bk.MARKER).exists()
        assert stored_rows(target, "p1")
        with pytest.raises(bk.RestoreUnverified, match="older than a known checkpoint"):
            bk.restore_guard(target)
        message = bk.restore_guard(target, accept_restore=True)
        assert message is not None and "UNVERIFIED" in message
        assert not (target.data_dir / bk.MARKER).exists()
        accepted = json.loads((target.data_dir / bk.ACCEPTED).read_text())
        assert accepted["problems"][0]["code"] == "OLDER_THAN_CHECKPOINT"
        assert bk.restore_guard(target) is None


def test_checkpoint_without_a_trusted_signature_counts_for_nothing(tmp_path: Path) -> None:
    from helpers import sqlite_env

    config = Config.from_env(sqlite_env(tmp_path / "src"))
    service, _ = _seed(config)
    archive = tmp_path / "b.backup"
    bk.backup(config, archive)
    cp = service.sign_checkpoint("p1")
    service.close()
    origin = cp.note.split(b"\n")[0].decode()
    other = NoteSigner(generate_key(tmp_path / "other.key"), origin)
    target = Config.from_env(sqlite_env(tmp_path / "restored"))
    report = bk.restore(target, archive, checkpoints=[cp.note], vkeys=[other.vkey])
    assert [p.code for p in report.problems] == ["CHECKPOINT_SIGNATURE"]
    with pytest.raises(bk.RestoreRefused, match="needs --vkey"):
        bk.restore(Config.from_env(sqlite_env(tmp_path / "r2")), archive, checkpoints=[cp.note])


# -- 4. a fork ----------------------------------------------------------------------------------


def test_fork_is_detected(store_env: dict[str, str], tmp_path: Path) -> None:
    """A ledger restored from a backup and then written to diverges from the original, which
    went on after the backup: the original's checkpoint does not match the restored history."""
    config = _source(store_env)
    service, p = _seed(config)
    base = tmp_path / "base.backup"
    bk.backup(config, base, include_keys=True)
    a, b, c = p.customers
    service.execute("p1", [transfer(p, f"orig-{i}", a, b, 10) for i in range(5)], ACTOR)
    original_cp = service.sign_checkpoint("p1")
    vkey = service.vkey("p1")
    service.close()
    note = tmp_path / "original.note"
    note.write_bytes(original_cp.note)

    with target_env(store_env, tmp_path / "diverged") as env_b:
        # B: the old backup restored (it verifies on its own) and then written differently
        code, out, err = run_cli(["restore", str(base)], env_b)
        assert code == 0, out + err
        config_b = Config.from_env(env_b)
        diverged = open_service(config_b, FakeClock(2_000_000_000_000))
        diverged.execute("p1", [transfer(p, f"fork-{i}", b, c, 7) for i in range(8)], ACTOR)
        diverged.sign_checkpoint("p1")
        assert diverged.vkey("p1") == vkey  # same key: only the history differs
        diverged.close()
        fork_archive = tmp_path / "diverged.backup"
        bk.backup(config_b, fork_archive)
        with target_env(store_env, tmp_path / "inspect") as env_c:
            code, out, err = run_cli(
                ["restore", str(fork_archive), "--checkpoint", str(note), "--vkey", vkey], env_c
            )
            assert code == 1, out + err
            assert "FORK" in out and "fork" in out
            assert f"at size {original_cp.size}" in out
            with pytest.raises(bk.RestoreUnverified, match="fork"):
                bk.restore_guard(Config.from_env(env_c))


# -- 5. keys ------------------------------------------------------------------------------------


def test_keys_are_excluded_by_default(store_env: dict[str, str], tmp_path: Path) -> None:
    config = _source(store_env)
    service, _ = _seed(config)
    vkey = service.vkey("p1")
    service.close()
    master = (config.data_dir / "master.key").read_bytes()
    assert config.signing_key_path is not None
    signing = config.signing_key_path.read_bytes()
    archive = tmp_path / "b.backup"
    code, out, err = run_cli(["backup", "--out", str(archive)], store_env)
    assert code == 0, err
    assert "KEYS NOT INCLUDED" in err
    names = set(members(archive))
    assert not any(n.startswith("keys/") for n in names)
    raw = archive.read_bytes()
    secret = base64.b64decode(master.strip())
    for needle in (master.strip(), secret, signing, signing.split(b"\n")[1]):
        assert needle not in raw
        assert needle.decode("latin-1") not in out + err
    assert manifest_of(archive)["keys_included"] is False
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600

    with target_env(store_env, tmp_path / "restored") as env:
        code, out, err = run_cli(["restore", str(archive)], env)
        assert code == 0, out + err
        assert "install the master key" in out
        target = Config.from_env(env)
        # serve refuses until the keys are installed, and refuses a different signing key
        with pytest.raises(bk.RestoreUnverified, match="master key"):
            bk.restore_guard(target)
        assert target.signing_key_path is not None
        generate_key(target.signing_key_path)
        (target.data_dir / "master.key").write_bytes(master)
        with pytest.raises(bk.RestoreUnverified, match="not the one that signed"):
            bk.restore_guard(target)
        target.signing_key_path.unlink()
        target.signing_key_path.write_bytes(signing)
        target.signing_key_path.chmod(0o600)
        assert bk.restore_guard(target) is None
        restored = open_service(target, FakeClock(2_000_000_000_000))
        try:
            assert restored.vkey("p1") == vkey
        finally:
            restored.close()


def test_include_keys_packs_them_private(tmp_path: Path) -> None:
    from helpers import sqlite_env

    config = Config.from_env(sqlite_env(tmp_path / "src"))
    service, _ = _seed(config)
    service.close()
    archive = tmp_path / "b.backup"
    code, out, err = run_cli(
        ["backup", "--out", str(archive), "--include-keys"], sqlite_env(config.data_dir)
    )
    assert code == 0 and "KEYS INCLUDED" in out and "KEYS NOT INCLUDED" not in err
    files = members(archive)
    assert files[bk.KEY_MASTER] == (config.data_dir / "master.key").read_bytes()
    target = Config.from_env(sqlite_env(tmp_path / "restored"))
    report = bk.restore(target, archive)
    assert report.ok
    for path in (target.data_dir / "master.key", target.signing_key_path):
        assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bk.restore_guard(target) is None


# -- 6. targets, PostgreSQL tools ---------------------------------------------------------------


def test_non_empty_target_is_refused_and_force_moves_aside(tmp_path: Path) -> None:
    from helpers import sqlite_env

    config = Config.from_env(sqlite_env(tmp_path / "src"))
    service, _ = _seed(config)
    service.close()
    archive = tmp_path / "b.backup"
    bk.backup(config, archive)
    target_dir = tmp_path / "busy"
    target_dir.mkdir()
    (target_dir / "ledger.sqlite3").write_bytes(b"someone else's ledger")
    env = sqlite_env(target_dir)
    code, _, err = run_cli(["restore", str(archive)], env)
    assert code == EXIT_REFUSED and "not empty" in err
    assert (target_dir / "ledger.sqlite3").read_bytes() == b"someone else's ledger"
    code, out, err = run_cli(["restore", str(archive), "--force"], env)
    assert code == 0, out + err
    [aside] = [p for p in target_dir.iterdir() if p.name.startswith("before-restore-")]
    assert (aside / "ledger.sqlite3").read_bytes() == b"someone else's ledger"


def test_data_dir_option_after_the_subcommand(tmp_path: Path) -> None:
    from helpers import sqlite_env

    config = Config.from_env(sqlite_env(tmp_path / "src"))
    service, _ = _seed(config)
    service.close()
    archive = tmp_path / "b.backup"
    bk.backup(config, archive)
    elsewhere = tmp_path / "elsewhere"
    code, out, err = run_cli(
        ["restore", str(archive), "--data-dir", str(elsewhere)], sqlite_env(tmp_path / "unused")
    )
    assert code == 0, out + err
    assert (elsewhere / "ledger.sqlite3").is_file()
    assert not (tmp_path / "unused").exists()


def test_missing_pg_tools_skip_with_a_clear_message(tmp_path: Path) -> None:
    env = {
        "CUSTODY_STORE": "postgres",
        "CUSTODY_DATA_DIR": str(tmp_path / "d"),
        "POSTGRES_DBNAME": "test",
        "POSTGRES_SCHEMA": "does_not_matter",
    }
    empty = tmp_path / "bin"
    empty.mkdir()
    code, _, err = run_cli(["backup", "--out", str(tmp_path / "x"), "--pg-bin", str(empty)], env)
    assert code == 4
    assert "pg_dump not found" in err and "skipped" in err
    assert bk.find_pg_tool("pg_dump", empty) is None


def test_rename_schema_leaves_data_alone() -> None:
    import io

    script = (
        b"CREATE SCHEMA src;\n"
        b"CREATE TABLE src.custody_events (x text);\n"
        b'AS $$BEGIN INSERT INTO "src"."custody_events" VALUES (1); END$$;\n'
        b"COPY src.custody_events (x) FROM stdin;\n"
        b"src.custody_events\tsrc.\n"
        b"\\.\n"
        b"SELECT pg_catalog.setval('src.custody_events_seq', 5, true);\n"
        b"CREATE INDEX mysrc.idx ON src_other.t (a);\n"
    )
    out = b"".join(bk.rename_schema(io.BytesIO(script), "src", "dst"))
    assert out == (
        b"CREATE TABLE dst.custody_events (x text);\n"
        b'AS $$BEGIN INSERT INTO "dst"."custody_events" VALUES (1); END$$;\n'
        b"COPY dst.custody_events (x) FROM stdin;\n"
        b"src.custody_events\tsrc.\n"
        b"\\.\n"
        b"SELECT pg_catalog.setval('dst.custody_events_seq', 5, true);\n"
        b"CREATE INDEX mysrc.idx ON src_other.t (a);\n"
    )


def test_restore_refuses_another_stores_archive(tmp_path: Path) -> None:
    from helpers import sqlite_env

    config = Config.from_env(sqlite_env(tmp_path / "src"))
    service, _ = _seed(config)
    service.close()
    archive = tmp_path / "b.backup"
    bk.backup(config, archive)
    pg = Config.from_env(
        {
            "CUSTODY_STORE": "postgres",
            "CUSTODY_DATA_DIR": str(tmp_path / "pg"),
            "POSTGRES_DBNAME": "test",
        }
    )
    with pytest.raises(bk.RestoreRefused, match="sqlite backup but CUSTODY_STORE is postgres"):
        bk.restore(pg, archive)
    assert os.listdir(tmp_path / "pg") == []


def test_postgres_non_empty_schema_is_refused_and_force_renames_it_aside(
    tmp_path: Path,
) -> None:
    from helpers import pg_env, pg_execute, require_postgres

    require_postgres()
    with pg_env(tmp_path / "src") as env:
        config = Config.from_env(env)
        service, _ = _seed(config)
        service.close()
        archive = tmp_path / "b.backup"
        bk.backup(config, archive)
        # the target is the source's own (non-empty) schema
        target_env_ = dict(env, CUSTODY_DATA_DIR=str(tmp_path / "restored"))
        code, _, err = run_cli(["restore", str(archive)], target_env_)
        assert code == EXIT_REFUSED and "is not empty" in err
        assert not (tmp_path / "restored").exists() or os.listdir(tmp_path / "restored") == []
        code, out, err = run_cli(["restore", str(archive), "--force"], target_env_)
        assert code == 0, out + err
        aside = [
            name
            for (name,) in pg_execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s",
                (env["POSTGRES_SCHEMA"] + "_before_restore_%",),
            )
        ]
        try:
            assert len(aside) == 1 and f"schema {aside[0]}" in out
            [(moved,)] = pg_execute(f"SELECT count(*) FROM {aside[0]}.custody_events")
            assert moved == len(stored_rows(Config.from_env(target_env_), "p1")) + 1
        finally:
            for name in aside:
                pg_execute(f"DROP SCHEMA {name} CASCADE")
