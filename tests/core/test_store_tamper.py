"""Tampering with stored records, directly in the database, is found at the first bad position."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    REPO_ROOT,
    FakeClock,
    deposit,
    make_platform,
    ok,
    open_service,
    pg_execute,
    run,
    subprocess_env,
    transfer,
)

from ledger import records
from ledger.config import Config
from ledger.store import LedgerStore, log_stream
from ledger.writer import ChainBroken, verify_stored_chain

PID = "p1"
STREAM = log_stream(PID)


class RawTable:
    """Direct SQL on the event table, bypassing the ledger (as an attacker with DB access)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pg = config.store == "postgres"
        if self.pg:
            schema = config.postgres["POSTGRES_SCHEMA"]
            self.table = f'"{schema}".custody_events'
            self.ph = "%s"
        else:
            self.table = "stored_events"
            self.ph = "?"

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        statement = statement.replace("{t}", self.table).replace("?", self.ph)
        if self.pg:
            return pg_execute(statement, params)
        with sqlite3.connect(self.config.sqlite_path) as conn:
            rows = conn.execute(statement, params).fetchall()
        conn.close()
        return rows

    def rows(self, stream: str = STREAM) -> list[tuple[int, str, bytes]]:
        got = self.sql(
            "SELECT originator_version, topic, state FROM {t} WHERE originator_id = ? "
            "ORDER BY originator_version",
            (stream,),
        )
        return [(v, t, bytes(s)) for v, t, s in got]

    def state(self, position: int, stream: str = STREAM) -> bytes:
        [(state,)] = self.sql(
            "SELECT state FROM {t} WHERE originator_id = ? AND originator_version = ?",
            (stream, position),
        )
        return bytes(state)

    def set_state(self, position: int, state: bytes) -> None:
        self.sql(
            "UPDATE {t} SET state = ? WHERE originator_id = ? AND originator_version = ?",
            (state, STREAM, position),
        )

    def set_topic(self, position: int, topic: str) -> None:
        self.sql(
            "UPDATE {t} SET topic = ? WHERE originator_id = ? AND originator_version = ?",
            (topic, STREAM, position),
        )

    def delete(self, position: int) -> None:
        self.sql(
            "DELETE FROM {t} WHERE originator_id = ? AND originator_version = ?", (STREAM, position)
        )

    def insert(self, position: int, topic: str, state: bytes) -> None:
        self.sql(
            "INSERT INTO {t} (originator_id, originator_version, topic, state) VALUES (?, ?, ?, ?)",
            (STREAM, position, topic, state),
        )

    def shift_from(self, position: int) -> None:
        """Make room at `position` by moving every later record one place up."""
        self.sql(
            "UPDATE {t} SET originator_version = -1 - originator_version "
            "WHERE originator_id = ? AND originator_version >= ?",
            (STREAM, position),
        )
        self.sql(
            "UPDATE {t} SET originator_version = -originator_version "
            "WHERE originator_id = ? AND originator_version < 0",
            (STREAM,),
        )


def _build_log(config: Config) -> int:
    """Two platforms; p1 gets a few hundred records of every common kind. Returns p1's length."""
    clock = FakeClock()
    service = open_service(config, clock)
    try:
        p = make_platform(service)
        other = make_platform(service, "p2")
        ok(service, "p2", deposit(other, "x", "alice", 10))
        ok(service, PID, *(deposit(p, f"d{i}", a, 10_000) for i, a in enumerate(p.customers)))
        cmds = [
            transfer(p, f"t{i}", p.customers[i % 3], p.customers[(i + 1) % 3], 1 + i % 17)
            for i in range(280)
        ]
        run(service, PID, *cmds[:140])
        run(service, PID, transfer(p, "refused", "alice", "bob", 10**9))
        run(service, PID, *cmds[140:])
        next_seq, _ = service.head(PID)
    finally:
        service.close()
    return next_seq


@pytest.fixture
def stored(config: Config) -> tuple[Config, RawTable, int]:
    n = _build_log(config)
    assert n > 290
    raw = RawTable(config)
    assert len(raw.rows()) == n
    return config, raw, n


def _verify(config: Config) -> tuple[int, int | None, str]:
    store = LedgerStore(config)
    try:
        return verify_stored_chain(store, PID)
    finally:
        store.close()


def _assert_start_refuses(config: Config, position: int | None) -> None:
    """start() refuses to serve a tampered log: ChainBroken, naming `position` if given."""
    from ledger.service import LedgerService

    service = LedgerService(config, clock_ms=FakeClock())
    try:
        with pytest.raises(ChainBroken) as info:
            service.start()
        if position is not None:
            assert f"record {position}" in str(info.value)
        assert service.platform_ids() == [] or PID not in service.platform_ids()
    finally:
        service.close()


def _flip(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 0x01
    return bytes(b)


def test_untampered_log_verifies(stored: tuple[Config, RawTable, int]) -> None:
    config, _, n = stored
    assert _verify(config) == (n, None, "ok")
    service = open_service(config, FakeClock())
    try:
        assert service.head(PID)[0] == n
    finally:
        service.close()


Tamper = Callable[[RawTable, int], int]  # applies the change, returns the first bad position


def _byte_in_record(position: int, offset: int) -> Tamper:
    def tamper(raw: RawTable, n: int) -> int:
        pos = position % n
        state = raw.state(pos)
        raw.set_state(pos, _flip(state, offset % len(state)))
        return pos

    return tamper


def _amount_digit(raw: RawTable, n: int) -> int:
    pos = 200
    state = raw.state(pos)
    assert b'"entries":[[' in state
    i = state.index(b'"amount_minor":') + len(b'"amount_minor":')
    digit = state[i : i + 1]
    changed = b"9" if digit != b"9" else b"8"
    raw.set_state(pos, state[:i] + changed + state[i + 1 :])
    return pos


def _delete(position: int) -> Tamper:
    def tamper(raw: RawTable, n: int) -> int:
        pos = position % n
        raw.delete(pos)
        return pos

    return tamper


def _insert_forged_middle(raw: RawTable, n: int) -> int:
    pos = 150
    template = records.decode(raw.state(pos)[32:])
    template["cmd"]["amount_minor"] = template["entries"][0][2] = 1
    template["cid"] = template["cmd"]["client_id"] = "forged"
    data = records.encode(template)
    prev_hash = raw.state(pos - 1)[:32]
    raw.shift_from(pos)
    raw.insert(pos, "transferred", hashlib.sha256(prev_hash + data).digest() + data)
    return pos + 1  # the forged record links to its predecessor; its successor no longer does


def _insert_forged_bad_link(raw: RawTable, n: int) -> int:
    pos = 99
    data = raw.state(pos)[32:]
    raw.shift_from(pos)
    raw.insert(pos, "transferred", b"\x11" * 32 + data)
    return pos


def _append_forged(raw: RawTable, n: int) -> int:
    last = records.decode(raw.state(n - 1)[32:])
    last["seq"] = n
    last["cid"] = "forged"
    raw.insert(n, last["kind"], b"\x00" * 32 + records.encode(last))
    return n


def _swap(i: int, j: int) -> Tamper:
    def tamper(raw: RawTable, n: int) -> int:
        a, b = raw.state(i), raw.state(j)
        raw.set_state(i, b)
        raw.set_state(j, a)
        return min(i, j)

    return tamper


def _swap_adjacent_same_kind(raw: RawTable, n: int) -> int:
    return _swap(180, 181)(raw, n)


def _other_platform_record(raw: RawTable, n: int) -> int:
    pos = 5
    foreign = raw.state(pos, stream=log_stream("p2"))
    raw.set_state(pos, foreign)
    return pos


def _non_canonical_reencoding(raw: RawTable, n: int) -> int:
    pos = 120
    state = raw.state(pos)
    pretty = json.dumps(json.loads(state[32:]), indent=1).encode()  # same meaning, other bytes
    raw.set_state(pos, state[:32] + pretty)
    return pos


def _topic_changed(raw: RawTable, n: int) -> int:
    raw.set_topic(77, "deposited")
    return 77


def _truncated_state(raw: RawTable, n: int) -> int:
    raw.set_state(60, raw.state(60)[:20])
    return 60


TAMPERS: dict[str, Tamper] = {
    "byte-in-first-record": _byte_in_record(0, 40),
    "byte-in-hash": _byte_in_record(137, 3),
    "byte-in-data": _byte_in_record(137, 90),
    "byte-last-of-record": _byte_in_record(211, -1),
    "byte-in-last-record": _byte_in_record(-1, 50),
    "amount-digit": _amount_digit,
    "delete-first": _delete(0),
    "delete-middle": _delete(143),
    "delete-second-last": _delete(-2),
    "insert-forged-relinked": _insert_forged_middle,
    "insert-forged-bad-link": _insert_forged_bad_link,
    "append-forged": _append_forged,
    "swap-far": _swap(30, 250),
    "swap-adjacent": _swap_adjacent_same_kind,
    "record-from-other-platform": _other_platform_record,
    "non-canonical-reencoding": _non_canonical_reencoding,
    "topic-changed": _topic_changed,
    "truncated-state": _truncated_state,
}


@pytest.mark.parametrize("tamper", list(TAMPERS.values()), ids=list(TAMPERS))
def test_tamper_found_at_first_bad_position(
    stored: tuple[Config, RawTable, int], tamper: Tamper
) -> None:
    config, raw, n = stored
    expected = tamper(raw, n)
    count, bad, reason = _verify(config)
    assert bad == expected, (count, bad, reason)
    assert count == expected  # every record before it verified
    assert reason and reason != "ok"


@pytest.mark.parametrize(
    "name",
    [
        "byte-in-hash",
        "byte-in-data",
        "amount-digit",
        "delete-middle",
        "insert-forged-relinked",
        "append-forged",
        "swap-far",
        "record-from-other-platform",
        "topic-changed",
    ],
)
def test_start_refuses_a_tampered_store(stored: tuple[Config, RawTable, int], name: str) -> None:
    config, raw, n = stored
    expected = TAMPERS[name](raw, n)
    _assert_start_refuses(config, expected)


@pytest.mark.parametrize("position", [0, 143, -2])
def test_start_names_the_deleted_position(
    stored: tuple[Config, RawTable, int], position: int
) -> None:
    config, raw, n = stored
    expected = _delete(position)(raw, n)
    _assert_start_refuses(config, expected)


def test_start_refuses_a_truncated_record(stored: tuple[Config, RawTable, int]) -> None:
    config, raw, n = stored
    expected = _truncated_state(raw, n)
    _assert_start_refuses(config, expected)


def test_every_single_byte_of_one_record(stored: tuple[Config, RawTable, int]) -> None:
    """Each single-byte change anywhere in a stored record is caught at that record."""
    config, raw, n = stored
    pos = 171
    original = raw.state(pos)
    store = LedgerStore(config)
    try:
        for offset in range(0, len(original), 7):
            raw.set_state(pos, _flip(original, offset))
            assert verify_stored_chain(store, PID)[1] == pos, offset
        raw.set_state(pos, original)
        assert verify_stored_chain(store, PID) == (n, None, "ok")
    finally:
        store.close()


# -- the CLI ------------------------------------------------------------------------------------

CLI = REPO_ROOT / "ledger" / "cli.py"
needs_cli = pytest.mark.skipif(not CLI.exists(), reason="ledger/cli.py not written yet")


def _cli(config: Config, store_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger.cli", "--data-dir", str(Path(config.data_dir)), *args],
        env=subprocess_env(store_env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_cli
def test_cli_chain_verify_names_the_position(
    stored: tuple[Config, RawTable, int], store_env: dict[str, str]
) -> None:
    config, raw, n = stored
    good = _cli(config, store_env, "--json", "chain", "verify", "--platform", PID)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["first_bad_position"] is None
    expected = _delete(143)(raw, n)
    bad = _cli(config, store_env, "--json", "chain", "verify", "--platform", PID)
    assert bad.returncode == 1, (bad.stdout, bad.stderr)
    payload = json.loads(bad.stdout)
    assert payload["first_bad_position"] == expected
    text = _cli(config, store_env, "chain", "verify", "--platform", PID)
    assert text.returncode == 1 and str(expected) in text.stdout + text.stderr


@needs_cli
def test_cli_chain_verify_json_flag_after_subcommand(
    stored: tuple[Config, RawTable, int], store_env: dict[str, str]
) -> None:
    """The invocation the test plan specifies: `--json` after the subcommand's arguments."""
    config, raw, n = stored
    expected = _byte_in_record(42, 60)(raw, n)
    bad = _cli(config, store_env, "chain", "verify", "--platform", PID, "--json")
    assert bad.returncode == 1, (bad.stdout, bad.stderr)
    assert json.loads(bad.stdout)["first_bad_position"] == expected
