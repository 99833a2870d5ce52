"""Build and run the custody.v1 gRPC server (grpc.aio).

`build_server` wires everything in one place: a grpc.aio server on an event loop of its own
(one thread, shared by every server of the process), capped message sizes and concurrency, the
servicers behind the call gate (authentication and roles, then deadlines, then request decoding:
see `ledger.api.handlers`), standard health checking and server reflection, and a bounded
worker pool for blocking work (reads that wait for the platform's lock, `execute`). Single
writes await the group committer's futures on the loop, so 32 concurrent calls are 32 cheap
coroutines, not 32 OS threads competing for the GIL.

`serve` runs it as `custody serve` does: production mode needs a TLS folder (mutual TLS);
`insecure_dev` is for local development only and is refused on anything but a loopback address.
On SIGTERM/SIGINT the server reports NOT_SERVING, stops accepting calls, lets in-flight calls
finish within the grace period, ends log subscriptions, and then closes the ledger.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ledger.api import auth
from ledger.api.certs import CA_CERT, SERVER_CERT, SERVER_KEY, create_dev_pki
from ledger.api.dashboard import DashboardServer
from ledger.api.handlers import Gate
from ledger.api.pb import SERVICE_NAMES
from ledger.api.readmodels import ReadModels
from ledger.api.servicers import Core, add_servicers
from ledger.config import Config
from ledger.metrics import MetricsServer
from ledger.service import LedgerService
from projections.runner import EmbeddedRunner, ProjectionRunner
from risk.engine import EmbeddedRisk, RiskEngine
from risk.recon_feed import ReconStoreFeed

log = logging.getLogger("ledger.api.server")

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 50051
DASHBOARD_PORT_ENV: Final = "CUSTODY_DASHBOARD_PORT"
MIB: Final = 1024 * 1024
T = TypeVar("T")


@dataclass(frozen=True)
class ServerOptions:
    max_workers: int = 16  # worker pool for blocking work (reads, execute), not one per call
    max_concurrent_rpcs: int = 1024
    max_receive_bytes: int = 4 * MIB
    max_send_bytes: int = 16 * MIB
    max_streams: int = 16
    require_deadline: bool = True
    reflection: bool = True
    grace_s: float = 10.0
    log_poll_interval_s: float = 0.05
    batch_via: str = "execute"  # SubmitBatch via execute() in the pool, or "submit" (committer)
    # Statements, as-of balances, audit trail: a query whose read model is behind projects the
    # missing records itself ("catch_up") or waits for a projection worker elsewhere ("wait"),
    # at most this long and never past its deadline; then PROJECTION_BEHIND.
    read_models: str = "catch_up"
    read_model_wait_s: float = 5.0
    # GetCustomerProof's proof files; None: $CUSTODY_LIABILITIES_DIR or <data dir>/liabilities
    liabilities_dir: str | None = None


class ServeError(RuntimeError):
    """The server cannot start as asked (bad TLS folder, refused address, port in use)."""


class InsecureBindRefused(ServeError):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _address(host: str, port: int) -> str:
    bare = host.strip("[]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def server_credentials(tls_dir: Path) -> grpc.ServerCredentials:
    """Mutual TLS: our certificate, and clients must present one issued by our CA."""
    try:
        ca = (tls_dir / CA_CERT).read_bytes()
        cert = (tls_dir / SERVER_CERT).read_bytes()
        key = (tls_dir / SERVER_KEY).read_bytes()
    except OSError as exc:
        raise ServeError(f"TLS folder {tls_dir} is incomplete: {exc}") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


class _Loop:
    """The event loop every grpc.aio server of this process runs on, in a daemon thread.

    One loop for the process (started on first use, never closed) keeps grpc.aio on a single
    loop, which is what it supports best; callers on other threads submit coroutines to it.
    """

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                threading.Thread(target=run, name="grpc-aio-loop", daemon=True).start()
                ready.wait()
                cls._loop = loop
            return cls._loop


def _on_loop(coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
    return asyncio.run_coroutine_threadsafe(coro, _Loop.get()).result(timeout_s)


class RunningServer:
    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        core: Core,
        health_servicer: health.aio.HealthServicer,
        options: ServerOptions,
        pool: futures.ThreadPoolExecutor,
        maintenance: tuple[grpc.aio.Server, int] | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.core = core
        self.health = health_servicer
        self.options = options
        self.pool = pool
        self.maintenance = maintenance
        self.dashboard: DashboardServer | None = None
        self.metrics: MetricsServer | None = None
        self._stopped = False

    @property
    def dashboard_port(self) -> int | None:
        return None if self.dashboard is None else self.dashboard.port

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics is None else self.metrics.port

    @property
    def maintenance_port(self) -> int | None:
        return None if self.maintenance is None else self.maintenance[1]

    def start(self) -> None:
        _on_loop(self._start())
        if self.dashboard is not None:
            self.dashboard.start()
        if self.metrics is not None:
            self.metrics.start()

    async def _start(self) -> None:
        await self.server.start()
        if self.maintenance is not None:
            await self.maintenance[0].start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, stop accepting, drain in-flight calls within the grace, end streams."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.options.grace_s if grace_s is None else grace_s
        self.core.stopping.set()
        try:
            if self.dashboard is not None:
                self.dashboard.close()
            _on_loop(self._stop(grace), grace + 10)
            if self.metrics is not None:  # last: a scrape may watch the drain
                self.metrics.close()
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.core.read_models.close()

    async def _stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        stops = [self.server.stop(grace)]
        if self.maintenance is not None:
            stops.append(self.maintenance[0].stop(grace))
        await asyncio.gather(*stops)


def build_server(
    service: LedgerService,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    tls_dir: str | Path | None = None,
    insecure_dev: bool = False,
    options: ServerOptions | None = None,
    maintenance_port: int | None = None,
    projector: ProjectionRunner | None = None,
    dashboard_port: int | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> RunningServer:
    """A bound (not yet started) server; the caller owns the LedgerService.

    `projector`: the projection runner queries catch up with (the embedded follower's, so they
    take turns); without one the server makes its own. `dashboard_port`: also serve the risk
    dashboard read-only over HTTP on 127.0.0.1:PORT (`ledger.api.dashboard`; 0 picks a port).
    `metrics_port`: also answer GET /metrics (Prometheus text format, `ledger.metrics`) on
    metrics_host:PORT (loopback unless told otherwise; 0 picks a port).
    """
    options = options or ServerOptions()
    tls_dir = None if tls_dir is None else Path(tls_dir)
    if insecure_dev and tls_dir is not None:
        raise ServeError("choose either a TLS folder (mutual TLS) or --insecure-dev")
    if insecure_dev and not is_loopback(host):
        raise InsecureBindRefused(
            f"--insecure-dev binds only to loopback; refusing {host!r} (use mutual TLS)"
        )
    if not insecure_dev and tls_dir is None:
        raise ServeError("production mode needs a TLS folder (or --insecure-dev on loopback)")
    credentials = None if insecure_dev else server_credentials(tls_dir)  # type: ignore[arg-type]
    source: auth.IdentitySource = (
        auth.identity_from_metadata if insecure_dev else auth.identity_from_tls
    )
    gate = Gate(source, auth.METHOD_ACCESS, options.require_deadline)
    pool = futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="rpc")
    core = Core(
        service,
        pool=pool,
        max_streams=options.max_streams,
        poll_interval_s=options.log_poll_interval_s,
        batch_via=options.batch_via,
        read_models=ReadModels(
            service, projector, mode=options.read_models, wait_s=options.read_model_wait_s
        ),
        liabilities_dir=None if options.liabilities_dir is None else Path(options.liabilities_dir),
    )
    dashboard: DashboardServer | None = None
    metrics: MetricsServer | None = None
    try:
        if dashboard_port is not None:
            try:
                dashboard = DashboardServer(service, dashboard_port)
            except OSError as exc:
                raise ServeError(str(exc)) from None
        if metrics_port is not None:
            try:
                metrics = MetricsServer(service, metrics_port, metrics_host)
            except OSError as exc:
                raise ServeError(str(exc)) from None
        running = _on_loop(
            _build(host, port, credentials, gate, core, pool, options, maintenance_port)
        )
    except BaseException:
        if dashboard is not None:
            dashboard.close()
        if metrics is not None:
            metrics.close()
        pool.shutdown(wait=False)
        core.read_models.close()
        raise
    running.dashboard = dashboard
    running.metrics = metrics
    return running


async def _build(
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None,
    gate: Gate,
    core: Core,
    pool: futures.ThreadPoolExecutor,
    options: ServerOptions,
    maintenance_port: int | None,
) -> RunningServer:
    grpc_options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", options.max_receive_bytes),
        ("grpc.max_send_message_length", options.max_send_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(
        migration_thread_pool=pool,
        options=grpc_options,
        maximum_concurrent_rpcs=options.max_concurrent_rpcs,
    )
    add_servicers(server, core, gate)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if options.reflection:
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    address = _address(host, port)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise ServeError(f"cannot bind {address}: {exc}") from None
    if bound == 0:
        raise ServeError(f"cannot bind {address}")
    maintenance = None
    if maintenance_port is not None:
        side = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, side)
        try:
            side_bound = side.add_insecure_port(_address("127.0.0.1", maintenance_port))
        except RuntimeError:
            side_bound = 0
        if side_bound == 0:
            await server.stop(None)
            raise ServeError(f"cannot bind maintenance port {maintenance_port}")
        maintenance = (side, side_bound)
    return RunningServer(server, bound, core, health_servicer, options, pool, maintenance)


@contextmanager
def running_server(
    service: LedgerService,
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    tls_dir: str | Path | None = None,
    insecure_dev: bool = False,
    options: ServerOptions | None = None,
    maintenance_port: int | None = None,
    projector: ProjectionRunner | None = None,
    dashboard_port: int | None = None,
    metrics_port: int | None = None,
) -> Iterator[RunningServer]:
    """A started server (port 0 picks a free port: see `.port`), always stopped on exit."""
    srv = build_server(
        service,
        host=host,
        port=port,
        tls_dir=tls_dir,
        insecure_dev=insecure_dev,
        options=options,
        maintenance_port=maintenance_port,
        projector=projector,
        dashboard_port=dashboard_port,
        metrics_port=metrics_port,
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(grace_s=1.0)


def dev_tls_dir(config: Config) -> Path:
    """`<data dir>/tls`, with a development CA, server and staff certificates if it has none."""
    tls_dir = config.data_dir / "tls"
    if not (tls_dir / CA_CERT).exists():
        create_dev_pki(tls_dir, platforms=())
        log.warning(
            "created a DEVELOPMENT certificate authority in %s; add platform certificates with "
            "`custody certs --out %s --platform <id>`",
            tls_dir,
            tls_dir,
        )
    return tls_dir


def serve(
    config: Config,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    tls_dir: str | Path | None = None,
    insecure_dev: bool = False,
    *,
    options: ServerOptions | None = None,
    maintenance_port: int | None = None,
    ready: Callable[[RunningServer], None] | None = None,
    stop_event: threading.Event | None = None,
    dashboard_port: int | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or `stop_event`), then drain and close. Returns an exit code.

    With neither a TLS folder nor `insecure_dev`, a loopback server uses mutual TLS with a
    development PKI in `<data dir>/tls`, created on first use (so `custody serve` needs no
    configuration); any other address needs an explicit TLS folder. `dashboard_port` (else
    $CUSTODY_DASHBOARD_PORT, else none) serves the risk dashboard on 127.0.0.1 (read-only);
    CUSTODY_METRICS_PORT (`config.metrics_port`, 0 = off) the Prometheus metrics.
    """
    if insecure_dev and not is_loopback(host):  # refuse before touching any data
        raise InsecureBindRefused(
            f"--insecure-dev binds only to loopback; refusing {host!r} (use mutual TLS)"
        )
    if dashboard_port is None and os.environ.get(DASHBOARD_PORT_ENV):
        text = os.environ[DASHBOARD_PORT_ENV]
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ServeError(f"{DASHBOARD_PORT_ENV} must be a port number, not {text!r}")
        dashboard_port = int(text)
    if tls_dir is None and not insecure_dev:
        if not is_loopback(host):
            raise ServeError(f"serving on {host!r} needs a TLS folder (mutual TLS)")
        tls_dir = dev_tls_dir(config)
    service = LedgerService(config)
    projector: EmbeddedRunner | None = None
    risk: EmbeddedRisk | None = None
    try:
        service.start(sweep=True)  # the server releases expired holds on schedule
        if config.projections == "embedded":
            # small batches: on SQLite the read models share the ledger's write lock
            projector = EmbeddedRunner(service.store, batch_size=2000).start()
        else:  # projection workers run elsewhere: queries wait for them, never project
            options = dataclasses.replace(options or ServerOptions(), read_models="wait")
        if config.risk == "embedded":
            # early warning: follows the logs, raises alerts and restricts on RED per policy
            risk = EmbeddedRisk(RiskEngine(service, feed=ReconStoreFeed(service))).start()
        srv = build_server(
            service,
            host=host,
            port=port,
            tls_dir=tls_dir,
            insecure_dev=insecure_dev,
            options=options,
            maintenance_port=maintenance_port,
            projector=None if projector is None else projector.runner,
            dashboard_port=dashboard_port,
            metrics_port=config.metrics_port or None,
            metrics_host=config.metrics_host,
        )
        stop = stop_event or threading.Event()
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
        try:
            srv.start()
            log.info(
                "serving custody.v1 on %s (%s)",
                _address(host, srv.port),
                "INSECURE development mode" if insecure_dev else "mutual TLS",
            )
            if srv.dashboard_port is not None:
                log.info("risk dashboard on http://127.0.0.1:%d/dashboard", srv.dashboard_port)
            if srv.metrics is not None:
                address = _address(srv.metrics.host, srv.metrics.port)
                log.info("metrics on http://%s/metrics", address)
            if ready is not None:
                ready(srv)
            stop.wait()
            log.info("stopping: draining in-flight calls")
            srv.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if risk is not None:
            risk.close()
        if projector is not None:
            projector.close()
        service.close()
    return 0
