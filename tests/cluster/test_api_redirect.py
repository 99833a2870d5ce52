"""Redirects over the gRPC API: two real servers (mutual TLS, dev PKI) on one PostgreSQL schema
with write leases. A write that reaches the follower is answered UNAVAILABLE `WRITER_ELSEWHERE`
naming the writer; the Python client follows it with the same client ids, the write is in the
log exactly once, and a failover leaves the client with a clear retryable error, then success.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from helpers import Platform, deposit, make_platform, pg_env, require_postgres

from ledger import records
from ledger.api.certs import create_dev_pki
from ledger.api.client import REDIRECT_LIMIT, REDIRECT_NOT_TRUSTED, CustodyClient, CustodyError
from ledger.api.pb import common_pb, movement_grpc, movement_pb
from ledger.api.server import RunningServer, running_server
from ledger.config import Config
from ledger.service import LedgerService
from ledger.store import log_stream

POLL_MS = 100
CCY = "CNY"
SC = grpc.StatusCode


def _free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _until(cond: Callable[[], bool], timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    create_dev_pki(out, platforms=("p1",))  # server certificate: localhost, 127.0.0.1, ::1
    return out


@dataclass
class Node:
    """One `custody serve` equivalent: a LedgerService (leases on) behind a real gRPC server."""

    name: str
    address: str
    service: LedgerService
    server: RunningServer
    stack: ExitStack

    def stop(self) -> None:
        self.stack.close()  # the gRPC server first, then the service: it releases its leases


@pytest.fixture
def cluster(tmp_path: Path, pki: Path) -> Iterator[Callable[..., Node]]:
    """start(name, host=, advertise=True) -> a node on a fresh loopback port; all stopped after."""
    require_postgres()
    nodes: list[Node] = []
    with pg_env(tmp_path) as env:

        def start(name: str, host: str = "127.0.0.1", advertise: bool = True) -> Node:
            port = _free_port(host)
            address = f"{host}:{port}"
            config = Config.from_env(
                {
                    **env,
                    "CUSTODY_LEASE_POLL_MS": str(POLL_MS),
                    "CUSTODY_SERVER_ID": name,
                    "CUSTODY_ADVERTISE": address if advertise else "",
                    "CUSTODY_DATA_DIR": str(tmp_path / name),
                }
            )
            stack = ExitStack()
            service = LedgerService(config)
            service.start()
            stack.callback(service.close)
            server = stack.enter_context(running_server(service, host=host, port=port, tls_dir=pki))
            node = Node(name, address, service, server, stack)
            nodes.append(node)
            return node

        try:
            yield start
        finally:
            for node in reversed(nodes):
                node.stop()


def _client(pki: Path, node: Node, **kwargs: object) -> CustodyClient:
    return CustodyClient.mtls(
        node.address,
        pki / "ca.pem",
        pki / "platform-p1.pem",
        pki / "platform-p1.key",
        platform_id="p1",
        **kwargs,  # type: ignore[arg-type]
    )


def _accepted_count(service: LedgerService, client_id: str) -> int:
    """How many accepted records of p1's log carry `client_id` (read from the database)."""
    count = 0
    for _seq, kind, packed in service.store.iter_rows(log_stream("p1")):
        if kind != records.REFUSED_KIND:
            if records.decode(records.unpack_state(packed)[1]).get("cid") == client_id:
                count += 1
    return count


def _writer_and_follower(start: Callable[..., Node]) -> tuple[Node, Node, Platform]:
    a = start("a")
    p = make_platform(a.service)
    assert a.service.execute("p1", [deposit(p, "d-seed", "alice", 1_000)], "platform:test")[0].ok
    b = start("b")
    assert a.service.is_writer("p1") and not b.service.is_writer("p1")
    return a, b, p


def test_client_on_the_follower_is_redirected_and_the_write_lands_once(
    cluster: Callable[..., Node], pki: Path
) -> None:
    a, b, _ = _writer_and_follower(cluster)
    with _client(pki, b) as client:
        assert client.get_balance("alice").posted_minor == 1_000  # the follower serves reads
        receipt = client.transfer("t-1", "alice", "bob", 5, CCY)
        assert receipt.status == "accepted" and receipt.position > 0
        assert client.redirects == 1 and client.target == a.address and client.home == b.address
        # later calls go straight to the writer; the same id again is a replay, not a second move
        again = client.transfer("t-1", "alice", "bob", 5, CCY)
        assert again.replayed and again.position == receipt.position
        assert client.redirects == 1
    # a fresh client on the follower: redirected again, answered replayed at the same position
    with _client(pki, b) as other:
        replay = other.transfer("t-1", "alice", "bob", 5, CCY)
        assert replay.replayed and replay.position == receipt.position
    assert _accepted_count(a.service, "t-1") == 1
    with a.service.reading("p1") as state:
        assert state.accounts["bob"].posted_minor == 5


def test_raw_grpc_call_on_the_follower_gets_writer_elsewhere(
    cluster: Callable[..., Node], pki: Path
) -> None:
    a, b, _ = _writer_and_follower(cluster)
    head = a.service.head("p1")
    credentials = grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(),
        (pki / "platform-p1.key").read_bytes(),
        (pki / "platform-p1.pem").read_bytes(),
    )
    request = movement_pb.TransferRequest(
        platform_id="p1",
        instruction=common_pb.Transfer(
            client_id="t-raw",
            from_account_id="alice",
            to_account_id="bob",
            amount_minor=5,
            currency=CCY,
        ),
    )
    with grpc.secure_channel(b.address, credentials) as channel:
        stub = movement_grpc.MovementServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Transfer(request, timeout=10)
    assert err.value.code() is SC.UNAVAILABLE  # type: ignore[attr-defined]
    status = rpc_status.from_call(err.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    retry = error_details_pb2.RetryInfo()
    found = {
        name
        for name, message in (("ErrorInfo", info), ("RetryInfo", retry))
        for detail in status.details
        if detail.Is(message.DESCRIPTOR) and detail.Unpack(message)
    }
    assert found == {"ErrorInfo", "RetryInfo"}
    assert (info.reason, info.domain) == ("WRITER_ELSEWHERE", "custody.v1")
    assert dict(info.metadata) == {
        "platform": "p1",
        "server_id": "a",
        "address": a.address,
        "epoch": "1",
        "retry_after_ms": str(POLL_MS),
    }
    assert retry.retry_delay.ToMilliseconds() == POLL_MS
    # nothing was written anywhere
    assert a.service.head("p1") == head
    assert _accepted_count(a.service, "t-raw") == 0


def test_redirect_policy_is_explicit(cluster: Callable[..., Node], pki: Path) -> None:
    a, b, _ = _writer_and_follower(cluster)
    head = a.service.head("p1")
    with _client(pki, b, follow_redirects=False) as client:
        with pytest.raises(CustodyError) as err:
            client.transfer("t-no", "alice", "bob", 5, CCY)
        assert (err.value.code, err.value.reason) == (SC.UNAVAILABLE, "WRITER_ELSEWHERE")
        assert err.value.metadata["address"] == a.address and err.value.retryable
        assert client.target == b.address
    with _client(pki, b, max_redirects=0) as client:
        with pytest.raises(CustodyError) as err:
            client.transfer("t-no", "alice", "bob", 5, CCY)
        assert err.value.reason == REDIRECT_LIMIT and err.value.retryable
        assert err.value.metadata["address"] == a.address
    with pytest.raises(ValueError):
        _client(pki, b, max_redirects=-1)
    assert a.service.head("p1") == head


def test_no_advertised_address_means_wait_bounded_by_max_redirects(
    cluster: Callable[..., Node], pki: Path
) -> None:
    a = cluster("a", advertise=False)  # holds the lease but tells nobody where it is
    p = make_platform(a.service)
    assert a.service.execute("p1", [deposit(p, "d-seed", "alice", 1_000)], "platform:test")[0].ok
    b = cluster("b")
    with _client(pki, b, max_redirects=2) as client:
        started = time.monotonic()
        with pytest.raises(CustodyError) as err:
            client.transfer("t-wait", "alice", "bob", 5, CCY)
        waited = time.monotonic() - started
    assert err.value.reason == REDIRECT_LIMIT and err.value.metadata["address"] == ""
    assert waited >= 2 * POLL_MS / 1000  # it waited retry_after_ms twice, then gave up
    assert client.target == b.address and client.redirects == 0
    assert _accepted_count(a.service, "t-wait") == 0


def test_redirect_to_an_address_the_certificate_does_not_cover_fails_clearly(
    cluster: Callable[..., Node], pki: Path
) -> None:
    # the writer listens and advertises 127.0.0.2 (loopback, but not in the dev certificate)
    a = cluster("a", host="127.0.0.2")
    p = make_platform(a.service)
    assert a.service.execute("p1", [deposit(p, "d-seed", "alice", 1_000)], "platform:test")[0].ok
    b = cluster("b")
    with _client(pki, b) as client:
        with pytest.raises(CustodyError) as err:
            client.transfer("t-tls", "alice", "bob", 5, CCY)
        assert err.value.reason == REDIRECT_NOT_TRUSTED and not err.value.retryable
        assert a.address in err.value.message and "certificate" in err.value.message
        assert client.target == b.address  # back home; verification was never relaxed
    assert _accepted_count(a.service, "t-tls") == 0


def test_failover_gives_a_retryable_error_then_the_new_writer_accepts(
    cluster: Callable[..., Node], pki: Path
) -> None:
    a, b, _ = _writer_and_follower(cluster)
    with _client(pki, b, retries=2, backoff_s=0.01) as client:
        first = client.transfer("t-1", "alice", "bob", 5, CCY)
        assert client.target == a.address
        a.stop()  # the writer's server and service stop: its lease is released
        _until(lambda: b.service.is_writer("p1"), timeout=5.0)
        # the client still points at the old writer: a clear, retryable error naming it
        with pytest.raises(CustodyError) as err:
            client.transfer("t-2", "alice", "bob", 7, CCY)
        assert err.value.code is SC.UNAVAILABLE and err.value.retryable
        assert a.address in err.value.message and "same client ids" in err.value.message
        assert client.target == b.address  # the next call goes back to where it was built for
        # the retry (same client id) reaches the new writer and is accepted once
        second = client.transfer("t-2", "alice", "bob", 7, CCY)
        assert second.status == "accepted" and second.position > first.position
        assert client.transfer("t-1", "alice", "bob", 5, CCY).position == first.position
    assert _accepted_count(b.service, "t-1") == 1
    assert _accepted_count(b.service, "t-2") == 1
    with b.service.reading("p1") as state:
        assert state.accounts["bob"].posted_minor == 12


def test_client_built_for_the_old_writer_fails_retryably_and_succeeds_at_the_new_one(
    cluster: Callable[..., Node], pki: Path
) -> None:
    a, b, _ = _writer_and_follower(cluster)
    with _client(pki, a, retries=1, backoff_s=0.01) as client:
        client.transfer("t-1", "alice", "bob", 5, CCY)
        a.stop()
        _until(lambda: b.service.is_writer("p1"), timeout=5.0)
        with pytest.raises(CustodyError) as err:
            client.transfer("t-2", "alice", "bob", 7, CCY)
        assert err.value.code is SC.UNAVAILABLE and err.value.retryable
        client.use_target(b.address)  # e.g. the next address of the caller's list
        assert client.transfer("t-2", "alice", "bob", 7, CCY).status == "accepted"
    assert _accepted_count(b.service, "t-2") == 1
