"""Helpers for the backup tests: a second (restore target) store, a CLI runner, log folds."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import (
    ACTOR,
    Platform,
    deposit,
    pg_env,
    sqlite_env,
    transfer,
)

from ledger import records
from ledger.cli_backup import register
from ledger.config import Config
from ledger.service import LedgerService
from ledger.store import LedgerStore, log_stream


@contextmanager
def target_env(store_env: dict[str, str], where: Path) -> Iterator[dict[str, str]]:
    """A fresh, empty restore target of the same kind as `store_env` (a new data folder; for
    PostgreSQL also a new schema, dropped afterwards)."""
    if store_env["CUSTODY_STORE"] == "sqlite":
        yield sqlite_env(where)
        return
    with pg_env(where) as env:
        yield env


def run_cli(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run `custody backup|restore` as `custody` would (global --data-dir/--json, then the
    subcommand) with the given store environment; returns (exit, stdout, stderr)."""
    import os

    parser = argparse.ArgumentParser(prog="custody")
    parser.add_argument("--data-dir")
    parser.add_argument("--json", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = register(sub)
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith(("CUSTODY_", "POSTGRES_"))]:
            del os.environ[key]
        os.environ.update(env)
        with redirect_stdout(out), redirect_stderr(err):
            code = handlers[args.command](args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


def stored_rows(config: Config, platform_id: str, upto: int | None = None) -> list[bytes]:
    """The platform's stored rows (chain link + record bytes), positions 0 .. upto-1."""
    store = LedgerStore(config)
    try:
        rows = [
            packed
            for seq, _, packed in store.iter_rows(log_stream(platform_id))
            if upto is None or seq < upto
        ]
    finally:
        store.close()
    return rows


def fold_posted(rows: list[bytes]) -> dict[str, tuple[int, int]]:
    """account -> (debits, credits) posted, folded from the records alone (this workload has
    deposits and transfers only, no holds)."""
    out: dict[str, list[int]] = {}
    for packed in rows:
        rec = records.decode(records.unpack_state(packed)[1])
        if rec["kind"] == records.REFUSED_KIND:
            continue
        assert "resolve" not in rec, "the fold covers postings only"
        for debit, credit, amount in rec.get("entries", ()):
            out.setdefault(debit, [0, 0])[0] += amount
            out.setdefault(credit, [0, 0])[1] += amount
    return {k: (v[0], v[1]) for k, v in out.items()}


def state_posted(service: LedgerService, platform_id: str) -> dict[str, tuple[int, int]]:
    with service.reading(platform_id) as st:
        return {
            a.id: (a.debits_posted_minor, a.credits_posted_minor)
            for a in st.accounts.values()
            if a.debits_posted_minor or a.credits_posted_minor
        }


@dataclass
class Writer:
    """A thread moving money through LedgerService (and signing checkpoints now and then)
    until stopped."""

    service: LedgerService
    platform: Platform
    batches: int = 0
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="test-writer", daemon=True)

    def _run(self) -> None:
        p = self.platform
        a, b, c = p.customers
        try:
            while not self.stop.is_set():
                i = self.batches
                cmds = [
                    transfer(p, f"w{i}-{j}", a if j % 2 else b, c, 1 + j % 7) for j in range(50)
                ]
                cmds.append(deposit(p, f"wd{i}", a, 1000))
                outcomes = self.service.submit(p.id, cmds, ACTOR).result(timeout=60)
                assert all(o.status == "accepted" for o in outcomes), outcomes
                if i % 5 == 0:
                    self.service.sign_checkpoint(p.id)
                self.batches += 1
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive()
        assert not self.errors, self.errors


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        out = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
        return out


def rewrite_archive(archive: Path, out: Path, changed: dict[str, bytes]) -> None:
    """A copy of `archive` with some members' bytes replaced (order and names kept)."""
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for m in src.getmembers():
            f = src.extractfile(m)
            assert f is not None
            data = changed.get(m.name, f.read())
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            info.mode = m.mode
            dst.addfile(info, io.BytesIO(data))


def manifest_of(archive: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(members(archive)["MANIFEST.json"])
    return data
