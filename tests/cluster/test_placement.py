"""Platforms across PostgreSQL databases: the placement file, redirects to the right store, and
moving a platform from one database to another (and back) with its chain intact, under load."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import (
    PG_CONNINFO,
    balances,
    deposit,
    make_platform,
    pg_execute,
    require_postgres,
    transfer,
)

from custody_verify.merkle import verify_consistency
from ledger import records
from ledger.api.certs import create_dev_pki
from ledger.api.client import CustodyClient
from ledger.api.server import running_server
from ledger.config import Config, ConfigError
from ledger.lease import LeaseManager
from ledger.move import MoveError, abort_move, move_history, move_platform
from ledger.placement import (
    ABORTED,
    ARRIVING,
    IN,
    OUT_DONE,
    OUT_START,
    Placement,
    PlacementError,
)
from ledger.service import LedgerService, PlatformNotFound, WriterElsewhere
from ledger.store import LedgerStore, log_stream
from ledger.writer import verify_stored_chain

POLL_MS = 100
SECOND_DB = "custody_test_b"
MASTER_KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="  # 32 bytes, base64
ADDRESS_A = "10.0.1.1:7001"
ADDRESS_B = "10.0.2.1:7002"


def _ensure_second_database() -> None:
    if not pg_execute("SELECT 1 FROM pg_database WHERE datname = %s", (SECOND_DB,)):
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another test made it
            pg_execute(f"CREATE DATABASE {SECOND_DB}")


def _execute_in(dbname: str, statement: str) -> None:
    conninfo = PG_CONNINFO.replace("dbname=test", f"dbname={dbname}")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture
def two_stores(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Store `a` in database `test`, store `b` in another database, fresh schemas in each."""
    require_postgres()
    _ensure_second_database()
    schema = "m_" + uuid.uuid4().hex[:16]
    _execute_in("test", f"CREATE SCHEMA {schema}")
    _execute_in(SECOND_DB, f"CREATE SCHEMA {schema}")
    doc = {
        "version": 1,
        "default_store": "a",
        "stores": {
            "a": {
                "postgres": {"POSTGRES_DBNAME": "test", "POSTGRES_SCHEMA": schema},
                "servers": [ADDRESS_A],
            },
            "b": {
                "postgres": {"POSTGRES_DBNAME": SECOND_DB, "POSTGRES_SCHEMA": schema},
                "servers": [ADDRESS_B],
            },
        },
        "platforms": {"pb": "b"},
    }
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(doc))
    try:
        yield {"path": path, "schema": schema, "doc": doc}
    finally:
        _execute_in("test", f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        _execute_in(SECOND_DB, f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _config(stores: dict[str, Any], tmp_path: Path, store: str, name: str) -> Config:
    return Config.from_env(
        {
            "CUSTODY_PLACEMENT": str(stores["path"]),
            "CUSTODY_STORE_NAME": store,
            "CUSTODY_SERVER_ID": name,
            "CUSTODY_ADVERTISE": ADDRESS_A if store == "a" else ADDRESS_B,
            "CUSTODY_DATA_DIR": str(tmp_path / name),
            "CUSTODY_MASTER_KEY": MASTER_KEY,
            "CUSTODY_SIGNING_KEY": str(tmp_path / "checkpoint.key"),  # one key for the ledger
            "CUSTODY_LEASE_POLL_MS": str(POLL_MS),
            "CUSTODY_CHECKPOINT_EVERY": "0",
        }
    )


def _server(stores: dict[str, Any], tmp_path: Path, store: str, name: str) -> LedgerService:
    service = LedgerService(_config(stores, tmp_path, store, name))
    service.start()
    return service


def _until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.02)


def _serves(service: LedgerService, platform_id: str) -> bool:
    try:
        return service.is_writer(platform_id)
    except (WriterElsewhere, PlatformNotFound):
        return False


def _rows(config: Config, platform_id: str) -> list[tuple[int, str, bytes]]:
    store = LedgerStore(config)
    try:
        return list(store.iter_rows(log_stream(platform_id)))
    finally:
        store.close()


# -- the placement file ----------------------------------------------------------------------------


def _placement_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1,
        "default_store": "a",
        "stores": {
            "a": {"postgres": {"POSTGRES_DBNAME": "one"}, "servers": ["h1:1"]},
            "b": {"postgres": {"POSTGRES_DBNAME": "two"}, "servers": ["h2:2", "h3:3"]},
        },
        "platforms": {"x": "b"},
    }
    doc.update(overrides)
    return doc


def _load(tmp_path: Path, doc: dict[str, Any]) -> Placement:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    return Placement.load(path)


def test_placement_places_and_spreads(tmp_path: Path) -> None:
    p = _load(tmp_path, _placement_doc())
    assert p.stores == ["a", "b"]
    assert (p.home("x"), p.home("anything-else")) == ("b", "a")
    assert p.address("a", "x") == "h1:1"
    assert p.address("b", "x") in ("h2:2", "h3:3")
    assert p.address("b", "x") == p.address("b", "x")  # stable: the same server first


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"version": 2}, "version must be 1"),
        ({"default_store": "c"}, "default_store 'c' is not a store"),
        ({"platforms": {"x": "c"}}, "store 'c' is not named"),
        (
            {"stores": {"a": {"postgres": {"POSTGRES_DBNAME": "one", "POSTGRES_PASSWORD": "s"}}}},
            "POSTGRES_PASSWORD are not allowed",
        ),
        ({"stores": {"a": {"postgres": {}}}}, "POSTGRES_DBNAME is required"),
        (
            {"stores": {"a": {"postgres": {"POSTGRES_DBNAME": "one"}, "servers": ["nohost"]}}},
            "is not HOST:PORT",
        ),
        (
            {
                "stores": {
                    "a": {"postgres": {"POSTGRES_DBNAME": "one"}},
                    "b": {"postgres": {"POSTGRES_DBNAME": "one", "POSTGRES_SCHEMA": "public"}},
                }
            },
            "same database and schema",
        ),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_placement_file_errors_say_what_is_wrong(
    tmp_path: Path, override: dict[str, Any], message: str
) -> None:
    with pytest.raises(PlacementError, match=message):
        _load(tmp_path, _placement_doc(**override))


def test_config_takes_the_store_from_the_placement_and_the_password_from_the_env(
    tmp_path: Path,
) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_placement_doc()))
    env = {"CUSTODY_PLACEMENT": str(path), "CUSTODY_STORE_NAME": "b", "POSTGRES_PASSWORD": "pw"}
    config = Config.from_env(env)
    assert config.store == "postgres" and config.store_name == "b"
    assert config.postgres["POSTGRES_DBNAME"] == "two"
    assert config.postgres["POSTGRES_PASSWORD"] == "pw"
    assert config.for_store("a").postgres["POSTGRES_DBNAME"] == "one"
    with pytest.raises(ConfigError, match="must name a store"):
        Config.from_env({"CUSTODY_PLACEMENT": str(path), "CUSTODY_STORE_NAME": "c"})
    with pytest.raises(ConfigError, match="needs CUSTODY_PLACEMENT"):
        Config.from_env({"CUSTODY_STORE_NAME": "a"})


# -- servers of two databases ----------------------------------------------------------------------


def test_each_store_serves_its_platforms_and_redirects_the_others(
    two_stores: dict[str, Any], tmp_path: Path
) -> None:
    a = _server(two_stores, tmp_path, "a", "a1")
    b = _server(two_stores, tmp_path, "b", "b1")
    try:
        make_platform(a, "pa")
        make_platform(b, "pb")
        # pb belongs to b: a server of a neither creates nor serves it, and says where it is
        with pytest.raises(WriterElsewhere) as err:
            a.create_platform("pb", "Platform pb", "operator:root")
        assert (err.value.server_id, err.value.address) == ("store:b", ADDRESS_B)
        with pytest.raises(WriterElsewhere) as err, a.reading("pb"):
            pass
        assert err.value.address == ADDRESS_B
        with pytest.raises(WriterElsewhere) as err:
            b.execute("pa", [], "operator:root")
        assert err.value.address == ADDRESS_A
        with pytest.raises(PlatformNotFound):  # a's own, but never created
            a.head("nothing-here")
        assert a.platform_ids() == ["pa"] and b.platform_ids() == ["pb"]
        # each log lives in its own database only
        assert _rows(a.config, "pb") == [] and _rows(b.config, "pa") == []
    finally:
        a.close()
        b.close()


def _load_platform(service: LedgerService, platform_id: str) -> Any:
    p = make_platform(service, platform_id)
    ok = service.execute(platform_id, [deposit(p, "d0", "alice", 1_000_000)], "operator:root")
    assert ok[0].ok
    sealed = service.vault.seal(platform_id, "customer:alice", "Alice Zhang")
    return p, sealed


def test_move_under_load_loses_nothing_and_keeps_the_chain(
    two_stores: dict[str, Any], tmp_path: Path
) -> None:
    a1 = _server(two_stores, tmp_path, "a", "a1")
    a2 = _server(two_stores, tmp_path, "a", "a2")  # a follower of the same store
    b1 = _server(two_stores, tmp_path, "b", "b1")
    servers = {ADDRESS_A: a1, ADDRESS_B: b1}
    try:
        p, sealed = _load_platform(a1, "pa")
        before = a1.sign_checkpoint("pa")
        acked: list[str] = []
        errors: Counter[str] = Counter()
        stop = threading.Event()

        def client(n: int) -> None:
            target = a1
            i = 0
            while not stop.is_set():
                cid = f"t{n}-{i}"
                cmd = transfer(p, cid, "alice", "bob", 1)
                while True:  # the same client id until it is answered
                    try:
                        outcome = target.submit("pa", [cmd], "platform:pa").result(30)[0]
                        break
                    except WriterElsewhere as exc:
                        errors["elsewhere"] += 1
                        target = servers.get(exc.address, target)
                        time.sleep(exc.retry_after_ms / 1000 if not exc.address else 0)
                    except PlatformNotFound:
                        errors["not-found"] += 1  # b has not discovered it yet
                        time.sleep(0.05)
                assert outcome.status in ("accepted", "replayed"), outcome
                acked.append(cid)
                i += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        _until(lambda: len(acked) >= 50)
        report = move_platform(a1.config, "pa", "b", "operator:mover", lease_wait_s=30)
        _until(lambda: _serves(b1, "pa"))
        count_at_move = len(acked)
        _until(lambda: len(acked) >= count_at_move + 50)
        stop.set()
        for t in threads:
            t.join(60)
        assert errors["elsewhere"] > 0  # the clients did meet the move

        assert report.state == OUT_DONE and report.records > 0
        assert report.side_rows["custody_pii_keys"] >= 1
        # every acknowledged transfer is in b's log exactly once; a's log stopped at the move
        b_rows = _rows(b1.config, "pa")
        a_rows = _rows(a1.config, "pa")
        assert len(a_rows) == report.records
        assert b_rows[: len(a_rows)] == a_rows  # byte for byte, same positions
        client_ids = Counter(
            records.decode(records.unpack_state(packed)[1])["cid"]
            for _, kind, packed in b_rows
            if kind != records.REFUSED_KIND
        )
        missing = [cid for cid in acked if client_ids[cid] != 1]
        assert not missing, (missing[:5], list(client_ids.items())[-5:])
        assert verify_stored_chain(LedgerStore(b1.config), "pa") == (len(b_rows), None, "ok")
        bal = balances(b1, "pa")
        assert bal["bob"][0] == len(acked) and bal["alice"][0] == 1_000_000 - len(acked)
        # customers' data keys came along: b opens what a sealed
        assert b1.vault.open("pa", sealed) == "Alice Zhang"
        # an auditor's checkpoint from before the move is consistent with b's tree (same key)
        after = b1.sign_checkpoint("pa")
        assert (
            after.size == len(b_rows) and after.note.split(b"\n")[0] == before.note.split(b"\n")[0]
        )
        assert b1.checkpoint("pa", before.size) == before  # the notes came along
        proof = b1.consistency_proof("pa", before.size, after.size)
        assert verify_consistency(before.size, after.size, before.root, after.root, proof)
        # both servers of a now redirect to b, for reads and writes, and no longer list it
        for server in (a1, a2):
            _until(lambda s=server: "pa" not in s.platform_ids())  # type: ignore[misc]
            assert not server.is_writer("pa")
            with pytest.raises(WriterElsewhere) as err:
                server.execute("pa", [deposit(p, "late", "alice", 1)], "operator:root")
            assert (err.value.server_id, err.value.address) == ("store:b", ADDRESS_B)
        states = [m.state for m in move_history(a1.config, "pa")]
        assert states == [OUT_START, OUT_DONE]
        assert [m.state for m in move_history(b1.config, "pa")] == [ARRIVING, IN]
    finally:
        for s in (a1, a2, b1):
            s.close()


def test_move_back_appends_only_the_tail_and_the_old_store_serves_again(
    two_stores: dict[str, Any], tmp_path: Path
) -> None:
    a = _server(two_stores, tmp_path, "a", "a1")
    b = _server(two_stores, tmp_path, "b", "b1")
    try:
        p, _ = _load_platform(a, "pa")
        move_platform(a.config, "pa", "b", "operator:mover", lease_wait_s=30)
        _until(lambda: _serves(b, "pa"))
        for i in range(5):
            assert b.execute("pa", [transfer(p, f"b{i}", "alice", "bob", 10)], "platform:pa")[0].ok
        report = move_platform(b.config, "pa", "a", "operator:mover", lease_wait_s=30)
        assert report.copied == 5  # the prefix was already in a, compared by its chain hash
        _until(lambda: _serves(a, "pa"))
        assert a.execute("pa", [transfer(p, "a-again", "alice", "bob", 1)], "platform:pa")[0].ok
        assert balances(a, "pa")["bob"][0] == 51
        rows = _rows(a.config, "pa")
        assert verify_stored_chain(LedgerStore(a.config), "pa") == (len(rows), None, "ok")
        assert [m.state for m in move_history(a.config, "pa")] == [
            OUT_START,
            OUT_DONE,
            ARRIVING,
            IN,
        ]
        with pytest.raises(WriterElsewhere) as err:
            b.execute("pa", [], "operator:root")
        assert err.value.address == ADDRESS_A
    finally:
        a.close()
        b.close()


def test_an_interrupted_move_can_be_aborted_or_finished(
    two_stores: dict[str, Any], tmp_path: Path
) -> None:
    a = _server(two_stores, tmp_path, "a", "a1")
    b = _server(two_stores, tmp_path, "b", "b1")
    try:
        p, _ = _load_platform(a, "pa")
        from ledger.move import _record  # the first step alone: as if the mover died after it

        _record(a.config, "pa", OUT_START, "b", 0, "", "operator:mover")
        _until(lambda: not _serves(a, "pa"))
        with pytest.raises(WriterElsewhere) as err:  # moving: nobody to name, retry later
            a.execute("pa", [deposit(p, "d1", "alice", 1)], "operator:root")
        assert err.value.address == ""
        with pytest.raises(MoveError, match="already in store a"):
            move_platform(a.config, "pa", "a", "operator:mover")  # same store: refused
        # while a mover holds the lease (copying), nobody can abort under its feet
        busy = LeaseManager(replace(a.config, server_id="busy-mover", advertise=""))
        busy.connect()
        try:
            _until(lambda: busy.try_acquire("pa"))
            with pytest.raises(MoveError, match="in progress"):
                abort_move(a.config, "pa", "operator:mover")
        finally:
            busy.close()
        abort_move(a.config, "pa", "operator:mover")
        _until(lambda: _serves(a, "pa"))
        assert a.execute("pa", [deposit(p, "d1", "alice", 1)], "operator:root")[0].ok
        # interrupted again, then finished by running the move once more
        _record(a.config, "pa", OUT_START, "b", 0, "", "operator:mover")
        report = move_platform(a.config, "pa", "b", "operator:mover", lease_wait_s=30)
        _until(lambda: _serves(b, "pa"))
        with pytest.raises(MoveError, match="not moving out"):
            abort_move(a.config, "pa", "operator:mover")
        with pytest.raises(MoveError, match="already moved"):
            move_platform(a.config, "pa", "b", "operator:mover")
        assert [m.state for m in move_history(a.config, "pa")] == [
            OUT_START,
            ABORTED,
            OUT_START,
            OUT_DONE,
        ]
        assert report.records == len(_rows(b.config, "pa"))
    finally:
        a.close()
        b.close()


def test_a_target_with_a_different_history_is_refused_and_nothing_is_copied(
    two_stores: dict[str, Any], tmp_path: Path
) -> None:
    a = _server(two_stores, tmp_path, "a", "a1")
    try:
        _load_platform(a, "pa")
        # a log of the same platform id in b, created before the placement said otherwise
        other = LedgerService(_config(two_stores, tmp_path, "b", "rogue"), lease=False)
        other._refuse_if_placed_elsewhere = lambda platform_id: None  # type: ignore[method-assign]
        other.start()
        try:
            make_platform(other, "pa", customers=("zed",))
        finally:
            other.close()
        b_config = a.config.for_store("b")
        b_rows_before = _rows(b_config, "pa")
        with pytest.raises(MoveError, match="already serves"):
            move_platform(a.config, "pa", "b", "operator:mover", lease_wait_s=30)
        from ledger.move import _record

        _record(b_config, "pa", OUT_DONE, "a", len(b_rows_before), "", "operator:root")
        with pytest.raises(MoveError, match="different history"):
            move_platform(a.config, "pa", "b", "operator:mover", lease_wait_s=30)
        assert _rows(b_config, "pa") == b_rows_before
        with psycopg.connect(PG_CONNINFO.replace("dbname=test", f"dbname={SECOND_DB}")) as conn:
            found = conn.execute(
                f"SELECT count(*) FROM {two_stores['schema']}.custody_pii_keys "
                "WHERE platform = 'pa'"
            ).fetchone()
        assert found is not None and found[0] == 0  # no side data copied either
        abort_move(a.config, "pa", "operator:mover")
        _until(lambda: _serves(a, "pa"))
    finally:
        a.close()


# -- over the gRPC API -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_grpc_clients_are_sent_to_the_store_that_holds_the_platform_even_after_a_move(
    two_stores: dict[str, Any], tmp_path: Path
) -> None:
    pki = tmp_path / "pki"
    create_dev_pki(pki, platforms=("p1",))
    ports = {"a": _free_port(), "b": _free_port()}
    doc = json.loads(json.dumps(two_stores["doc"]))
    for name, port in ports.items():
        doc["stores"][name]["servers"] = [f"127.0.0.1:{port}"]
    placement = tmp_path / "grpc-placement.json"
    placement.write_text(json.dumps(doc))
    services: dict[str, LedgerService] = {}
    with ExitStack() as stack:
        for name, port in ports.items():
            config = replace(
                _config(two_stores, tmp_path, name, f"{name}-grpc"),
                placement=Placement.load(placement),
                advertise=f"127.0.0.1:{port}",
            )
            service = LedgerService(config)
            service.start()
            stack.callback(service.close)
            stack.enter_context(running_server(service, host="127.0.0.1", port=port, tls_dir=pki))
            services[name] = service
        p = make_platform(services["a"], "p1")
        assert (
            services["a"].execute("p1", [deposit(p, "d0", "alice", 1_000)], "operator:root")[0].ok
        )
        client = stack.enter_context(
            CustodyClient.mtls(
                f"127.0.0.1:{ports['b']}",  # the wrong database's server
                pki / "ca.pem",
                pki / "platform-p1.pem",
                pki / "platform-p1.key",
                platform_id="p1",
            )
        )
        assert client.get_balance("alice").posted_minor == 1_000
        assert client.transfer("g-1", "alice", "bob", 5, "CNY").status == "accepted"
        assert client.target == f"127.0.0.1:{ports['a']}"
        move_platform(services["a"].config, "p1", "b", "operator:mover", lease_wait_s=30)
        _until(lambda: _serves(services["b"], "p1"))
        # the client still talks to a: a sends it to b, where the write lands, once
        receipt = client.transfer("g-2", "alice", "bob", 7, "CNY")
        assert receipt.status == "accepted"
        assert client.target == f"127.0.0.1:{ports['b']}"
        assert client.transfer("g-2", "alice", "bob", 7, "CNY").replayed
        assert client.get_balance("bob").posted_minor == 12
        b_cids = [
            records.decode(records.unpack_state(packed)[1])["cid"]
            for _, kind, packed in _rows(services["b"].config, "p1")
            if kind != records.REFUSED_KIND
        ]
        assert b_cids.count("g-1") == 1 and b_cids.count("g-2") == 1


# -- the command line ------------------------------------------------------------------------------


def test_cli_moves_a_platform_and_then_says_where_it_is(
    two_stores: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ledger.cli import EXIT_OK, EXIT_REFUSED, main

    monkeypatch.setenv("CUSTODY_PLACEMENT", str(two_stores["path"]))
    monkeypatch.setenv("CUSTODY_STORE_NAME", "a")
    monkeypatch.setenv("CUSTODY_DATA_DIR", str(tmp_path / "cli"))
    monkeypatch.setenv("CUSTODY_MASTER_KEY", MASTER_KEY)
    assert main(["platform", "create", "demo", "--name", "Demo"]) == EXIT_OK
    capsys.readouterr()
    assert main(["--json", "platform", "move", "demo", "--to", "b"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert (report["source"], report["target"], report["records"]) == ("a", "b", 1)
    assert report["state"] == OUT_DONE and len(report["head"]) == 64
    assert main(["platform", "move", "demo", "--to", "b"]) == EXIT_REFUSED
    assert "already moved from a to b" in capsys.readouterr().err
    assert main(["balance", "--platform", "demo"]) == EXIT_REFUSED
    assert "platform demo is in store b, another database" in capsys.readouterr().err
    assert main(["--json", "platform", "moves", "demo"]) == EXIT_OK
    assert [m["state"] for m in json.loads(capsys.readouterr().out)] == [OUT_START, OUT_DONE]
    monkeypatch.setenv("CUSTODY_STORE_NAME", "b")
    assert main(["--json", "platform", "list"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == ["demo"]


def test_a_mover_stopped_before_or_after_the_commit_point_is_finished_by_a_rerun(
    two_stores: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ledger.move as mv

    a = _server(two_stores, tmp_path, "a", "a1")
    b = _server(two_stores, tmp_path, "b", "b1")
    try:
        _load_platform(a, "pa")
        commit, finish = mv._commit_move, mv._finish_arrival

        def crash(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the mover died here")

        # 1. the whole log is in b, the source has not committed: b must not serve it
        monkeypatch.setattr(mv, "_commit_move", crash)
        with pytest.raises(RuntimeError):
            move_platform(a.config, "pa", "b", "operator:mover", lease_wait_s=30)
        time.sleep(3 * POLL_MS / 1000)
        assert "pa" not in b.platform_ids() and not _serves(b, "pa")
        assert [m.state for m in move_history(b.config, "pa")] == [ARRIVING]
        # 2. the source committed, the target's `in` is missing: the rerun records it
        monkeypatch.setattr(mv, "_commit_move", commit)
        monkeypatch.setattr(mv, "_finish_arrival", crash)
        with pytest.raises(RuntimeError):
            move_platform(a.config, "pa", "b", "operator:mover", lease_wait_s=30)
        assert [m.state for m in move_history(a.config, "pa")][-1] == OUT_DONE
        assert not _serves(b, "pa")
        monkeypatch.setattr(mv, "_finish_arrival", finish)
        report = move_platform(a.config, "pa", "b", "operator:mover", lease_wait_s=30)
        assert report.state == OUT_DONE and report.records == len(_rows(b.config, "pa"))
        _until(lambda: _serves(b, "pa"))
        assert [m.state for m in move_history(b.config, "pa")] == [ARRIVING, IN]
    finally:
        a.close()
        b.close()


def test_a_copy_longer_than_the_idle_session_timeout_keeps_the_lease(
    two_stores: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL ends a silent lease session; the mover keeps its own talking, so nobody can
    abort (or write) under its feet however long the copy takes."""
    import ledger.move as mv

    a = _server(two_stores, tmp_path, "a", "a1")
    try:
        _load_platform(a, "pa")
        copy_side_tables = mv._copy_side_tables
        session_timeout_s = LeaseManager(a.config).session_timeout_s
        aborts: list[str] = []

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(session_timeout_s + 1.5)
            try:
                abort_move(a.config, "pa", "operator:other")
                aborts.append("aborted")
            except MoveError as exc:
                aborts.append(str(exc))
            return copy_side_tables(*args, **kwargs)

        monkeypatch.setattr(mv, "_copy_side_tables", slow)
        report = move_platform(a.config, "pa", "b", "operator:mover", lease_wait_s=30)
        assert report.state == OUT_DONE
        assert len(aborts) == 1 and "in progress" in aborts[0]
        assert [m.state for m in move_history(a.config, "pa")] == [OUT_START, OUT_DONE]
    finally:
        a.close()


def test_a_source_server_with_a_stale_view_never_writes_a_moved_platform(
    two_stores: dict[str, Any], tmp_path: Path
) -> None:
    """Its tick read the moves just before the mover committed and released the lease: taking
    the free lease then must not let it write where nobody reads any more."""
    a = _server(two_stores, tmp_path, "a", "a1")
    try:
        _load_platform(a, "pa")
        move_platform(a.config, "pa", "b", "operator:mover", lease_wait_s=30)
        platform = a._platforms["pa"]
        lease = a._lease
        assert lease is not None
        a._moves = {}  # the stale read of a tick that started before the move's commit
        assert lease.try_acquire("pa")  # the mover has released it
        a._promote(platform)
        assert "pa" not in lease.held and platform.role != "writer"
        assert a._gone("pa") and not a.is_writer("pa")
    finally:
        a.close()
