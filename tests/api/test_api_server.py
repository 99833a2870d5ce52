"""Server plumbing: health, reflection, size caps, undecodable requests, drain on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from api_helpers import CCY, World
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from ledger.api import codegen, healthcheck
from ledger.api.client import CustodyClient, CustodyError, instruction
from ledger.api.pb import SERVICE_NAMES
from ledger.api.server import ServerOptions, running_server
from ledger.service import LedgerService

REPO = Path(__file__).resolve().parents[2]
SC = grpc.StatusCode


def _secure_channel(world: World, pki: Path, stem: str = "auditor-dev") -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{stem}.key").read_bytes(),
        certificate_chain=(pki / f"{stem}.pem").read_bytes(),
    )
    return grpc.secure_channel(f"127.0.0.1:{world.server.port}", credentials)


def test_health_is_serving(world: World, pki: Path) -> None:
    with _secure_channel(world, pki) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", *SERVICE_NAMES):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert healthcheck.check(f"127.0.0.1:{world.server.port}", tls_dir=pki, cert="regulator-dev")


def test_reflection_lists_services(world: World, pki: Path) -> None:
    with _secure_channel(world, pki) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert set(SERVICE_NAMES) <= services
        assert "grpc.health.v1.Health" in services
        transfer = db.FindFileContainingSymbol("custody.v1.MovementService")
        assert transfer.package == "custody.v1"


def test_maintenance_port_serves_health_without_tls(api_service: LedgerService, pki: Path) -> None:
    with running_server(api_service, port=0, tls_dir=pki, maintenance_port=0) as srv:
        assert srv.maintenance_port
        assert healthcheck.check(f"127.0.0.1:{srv.maintenance_port}")
        assert healthcheck.main(["--address", f"127.0.0.1:{srv.maintenance_port}"]) == 0
    assert not healthcheck.check(f"127.0.0.1:{srv.maintenance_port}", timeout_s=0.5)


def test_oversize_message_is_refused(api_service: LedgerService, pki: Path) -> None:
    options = ServerOptions(max_receive_bytes=64 * 1024)
    with running_server(api_service, port=0, tls_dir=pki, options=options) as srv:
        client = CustodyClient.mtls(
            f"127.0.0.1:{srv.port}",
            pki / "ca.pem",
            pki / "operator-dev.pem",
            pki / "operator-dev.key",
            retries=0,
        )
        client.create_platform("p1", "one")
        items = [
            instruction(
                "transfer",
                client_id=f"c{i}",
                from_account_id="a",
                to_account_id="b",
                amount_minor=1,
                currency=CCY,
            )
            for i in range(5000)
        ]
        with pytest.raises(CustodyError) as err:
            client.submit_batch(items, platform_id="p1")
        assert err.value.code is SC.RESOURCE_EXHAUSTED
        client.close()


def test_undecodable_request_is_invalid_argument(world: World, pki: Path) -> None:
    with _secure_channel(world, pki, "platform-p1") as channel:
        call = channel.unary_unary("/custody.v1.MovementService/Transfer")
        # field 1 (platform_id, a string) carrying invalid UTF-8
        with pytest.raises(grpc.RpcError) as err:
            call(b"\x0a\x02\xff\xfe", timeout=5)
        assert err.value.code() is SC.INVALID_ARGUMENT  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff", timeout=5)
        assert err.value.code() is SC.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_client_retries_unavailable_with_the_same_request() -> None:
    class Unavailable(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return SC.UNAVAILABLE

        def details(self) -> str:
            return "down"

        def trailing_metadata(self) -> tuple[()]:
            return ()

    seen: list[object] = []

    def flaky(request: object, timeout: float, metadata: object) -> str:
        seen.append(request)
        assert timeout == 10.0
        if len(seen) < 3:
            raise Unavailable()
        return "ok"

    client = CustodyClient(grpc.insecure_channel("127.0.0.1:9"), retries=3, backoff_s=0.001)
    request = object()
    assert client._call(flaky, request) == "ok"  # type: ignore[arg-type]
    assert seen == [request] * 3
    seen.clear()
    client.retries = 1
    with pytest.raises(CustodyError) as err:
        client._call(flaky, request)  # type: ignore[arg-type]
    assert err.value.code is SC.UNAVAILABLE and len(seen) == 2
    client.close()


def test_retry_of_a_committed_write_is_replayed(world: World) -> None:
    first = world.p1.transfer("t-retry", "alice", "bob", 5, CCY)
    again = world.p1.transfer("t-retry", "alice", "bob", 5, CCY)
    assert again.replayed and again.position == first.position
    assert world.p1.get_balance("bob").posted_minor == 5


def test_codegen_is_current_and_gitignored() -> None:
    assert codegen.is_current()
    out = subprocess.run(
        ["git", "check-ignore", "-q", "ledger/api/gen/custody/v1/common_pb2.py"], cwd=REPO
    )
    assert out.returncode == 0


def test_stop_ends_log_subscriptions(api_service: LedgerService, pki: Path) -> None:
    srv_cm = running_server(api_service, port=0, tls_dir=pki)
    srv = srv_cm.__enter__()
    op = CustodyClient.mtls(
        f"127.0.0.1:{srv.port}",
        pki / "ca.pem",
        pki / "operator-dev.pem",
        pki / "operator-dev.key",
        retries=0,
    )
    op.create_platform("p1", "one")
    stream = op.subscribe_log(follow=True, timeout_s=30, platform_id="p1")
    assert next(stream).kind == "platform_created"
    started = time.monotonic()
    srv_cm.__exit__(None, None, None)
    with pytest.raises((StopIteration, CustodyError)):
        next(stream)
    assert time.monotonic() - started < 5
    op.close()


def test_sigterm_drains_in_flight_calls(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from ledger.api.server import serve\n"
        "from ledger.config import Config\n"
        "cfg = Config.from_env({'CUSTODY_DATA_DIR': sys.argv[1]})\n"
        "sys.exit(serve(cfg, '127.0.0.1', 0, insecure_dev=True,\n"
        "          ready=lambda s: print('PORT', s.port, flush=True)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT"), proc.stderr.read() if proc.stderr else line
        target = f"127.0.0.1:{int(line.split()[1])}"
        with CustodyClient.insecure_dev(target, "operator", "ops", retries=0) as op:
            op.create_platform("p1", "one")
        p1 = CustodyClient.insecure_dev(target, "platform", "p1", retries=0, timeout_s=30)
        p1.open_account("o-omni", "omni", kind="omnibus", currency=CCY)
        p1.open_account("o-a", "a", kind="customer", currency=CCY, role="lender")
        items = [
            instruction(
                "deposit",
                client_id=f"d{i}",
                mirror_account_id="omni",
                account_id="a",
                amount_minor=1,
                currency=CCY,
            )
            for i in range(8192)
        ]
        result: dict[str, object] = {}

        def big_batch() -> None:
            try:
                result["items"] = p1.submit_batch(items)
            except Exception as exc:
                result["error"] = exc

        worker = threading.Thread(target=big_batch)
        worker.start()
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        worker.join(30)
        assert "error" not in result, result.get("error")
        assert len(result["items"]) == 8192  # type: ignore[arg-type]
        assert proc.wait(30) == 0
        p1.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_without_configuration_uses_a_dev_pki_on_loopback(tmp_path: Path) -> None:
    from ledger.api import certs
    from ledger.api.server import ServeError, serve
    from ledger.config import Config

    config = Config.from_env({"CUSTODY_DATA_DIR": str(tmp_path / "data")})
    with pytest.raises(ServeError):
        serve(config, "0.0.0.0", 0)  # off loopback: an explicit TLS folder is required
    stop = threading.Event()
    ports: list[int] = []
    thread = threading.Thread(
        target=serve,
        args=(config, "127.0.0.1", 0),
        kwargs={"stop_event": stop, "ready": lambda s: ports.append(s.port)},
    )
    thread.start()
    try:
        for _ in range(200):
            if ports:
                break
            time.sleep(0.05)
        tls = tmp_path / "data" / "tls"
        assert (tls / "ca.key").stat().st_mode & 0o777 == 0o600
        ca_before = (tls / "ca.pem").read_bytes()
        assert certs.main(["--out", str(tls), "--platform", "p1"]) == 0
        assert (tls / "ca.pem").read_bytes() == ca_before  # the CA is kept
        assert (tls / "platform-p1.key").stat().st_mode & 0o777 == 0o600
        with CustodyClient.mtls(
            f"127.0.0.1:{ports[0]}",
            tls / "ca.pem",
            tls / "operator-dev.pem",
            tls / "operator-dev.key",
            retries=0,
        ) as op:
            op.create_platform("p1", "one")
        with CustodyClient.mtls(
            f"127.0.0.1:{ports[0]}",
            tls / "ca.pem",
            tls / "platform-p1.pem",
            tls / "platform-p1.key",
            retries=0,
        ) as p1:
            assert p1.list_accounts().items == []
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
