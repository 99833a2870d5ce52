"""End-to-end load on the custody.v1 gRPC API, against the in-process ledger in the same run.

The script starts a real server (`ledger.api.server.running_server`) on a free loopback port
with mutual TLS (a development PKI made by `ledger.api.certs` in a temp folder) on a fresh
store (SQLite in a temp folder, or a fresh PostgreSQL schema dropped afterwards), seeds a
platform `bench` with `--accounts` customer accounts of 1,000,000 minor units each, and drives it
from several client PROCESSES (multiprocessing, spawn), each running grpc.aio channels with
many calls in flight (asyncio tasks):

  --mode single   `--clients` concurrent callers in total (default 32), each a loop of one
                  Transfer RPC after another. Reports transfers/s and p50/p99/max latency.
  --mode batch    `--batch-callers` concurrent callers in total, each a loop of SubmitBatch
                  RPCs of `--batch` transfers (default 1,000). Reports transfers/s.
  --mode both     (default) both, one after the other, each on a fresh store.
  --mode floor    the single-mode load against a do-nothing grpc.aio server with the same mutual
                  TLS (Transfer answers a constant; no gate, no ledger): what Python gRPC itself
                  costs per call here, i.e. the ceiling for any Python servicer. Not verified.
  --mode all      single, batch and floor.

Every mode runs for `--warmup` + `--seconds` (default 2 + 15 s); throughput and latency count
only the calls that complete inside the measured window, but every call is verified. Then, in the
same invocation and process, the in-process baselines of bench/transfers.py run on a fresh store:
`LedgerService.execute` with batches of `--batch` (for the batch mode) and `LedgerService.submit`
from `--clients` threads (for the single mode); the ratio API / in-process is printed.

Checks after every API run (exit status 2 if any fails): every call answered (no error status),
one record position per transfer, an independent replay of the accepted transfers in record
order gives every account's balance, debits equal credits, the omnibus mirror equals the
customer money, the sum of balances is unchanged, and the record count in the state and in the
database is exactly 2 + 2 x accounts + transfers.

Each result carries the load average and CPU pressure (the machine is shared), the server
process's CPU per transfer (also split by thread: event loop, grpc's poller and event engine,
the group committer's decide and commit threads, the worker pool), the client processes' CPU per
transfer, the garbage collections in the window, and (single mode) the average number of
transfers per database commit and per `LedgerService.submit` call.

Examples:
  /work/venv/bin/python bench/grpc_load.py                       # both modes, SQLite
  /work/venv/bin/python bench/grpc_load.py --mode single --repeat 3
  /work/venv/bin/python bench/grpc_load.py --store postgres --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import multiprocessing as mp
import os
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import transfers as tb  # noqa: E402  (bench/transfers.py: workload, seeding, verification)

PLATFORM = tb.PLATFORM
CCY = tb.CCY
TRANSFER = "/custody.v1.MovementService/Transfer"
SUBMIT_BATCH = "/custody.v1.MovementService/SubmitBatch"
TARGETS = {"single": 5_000, "batch": 50_000, "floor": 5_000}
P99_TARGET_MS = 20.0


# -- client processes ----------------------------------------------------------------------------


def _channel_credentials(tls_dir: str) -> Any:
    import grpc

    d = Path(tls_dir)
    return grpc.ssl_channel_credentials(
        root_certificates=(d / "ca.pem").read_bytes(),
        private_key=(d / f"platform-{PLATFORM}.key").read_bytes(),
        certificate_chain=(d / f"platform-{PLATFORM}.pem").read_bytes(),
    )


async def _client_main(spec: dict[str, Any]) -> dict[str, Any]:
    """One client process: `tasks` callers over `channels` channels until the stop time."""
    import grpc

    from ledger.api.pb import common_pb, movement_pb

    creds = _channel_credentials(spec["tls_dir"])
    target = f"127.0.0.1:{spec['port']}"
    channels = [
        grpc.aio.secure_channel(target, creds, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(spec["channels"])
    ]
    for ch in channels:
        await ch.channel_ready()
    accounts = spec["accounts"]
    mode = spec["mode"]
    batch = spec["batch"]
    t_start, t_stop = spec["t_start"], spec["t_stop"]
    # per call: (end time, latency); per transfer: (a, b, amount, position, status)
    calls: list[tuple[float, float, int]] = []
    done: list[tuple[int, int, int, int, str]] = []
    errors: dict[str, int] = {}

    def pick(rng: random.Random) -> tuple[int, int, int]:
        a = rng.randrange(accounts)
        b = rng.randrange(accounts - 1)
        if b >= a:
            b += 1
        return a, b, rng.randint(1, 1000)

    async def single(k: int, channel: Any) -> None:
        call = channel.unary_unary(TRANSFER)  # bytes in, bytes out: the client stays cheap
        rng = random.Random(f"{spec['seed']}-{spec['proc']}-{k}")
        prefix = f"s{spec['proc']}.{k}."
        parse = movement_pb.TransferResponse.FromString
        clock = time.perf_counter
        mono = time.monotonic
        i = 0
        while mono() < t_stop:
            a, b, amt = pick(rng)
            req = movement_pb.TransferRequest(
                instruction=common_pb.Transfer(
                    client_id=f"{prefix}{i}",
                    from_account_id=tb.account_id(a),
                    to_account_id=tb.account_id(b),
                    amount_minor=amt,
                    currency=CCY,
                )
            ).SerializeToString()
            i += 1
            t = clock()
            try:
                answer = parse(await call(req, timeout=spec["timeout_s"]))
            except grpc.aio.AioRpcError as exc:
                key = exc.code().name
                errors[key] = errors.get(key, 0) + 1
                if sum(errors.values()) > 100:
                    return
                continue
            lat = clock() - t
            calls.append((mono(), lat, 1))
            done.append((a, b, amt, answer.receipt.position, "accepted"))

    async def batches(k: int, channel: Any) -> None:
        call = channel.unary_unary(SUBMIT_BATCH)
        rng = random.Random(f"{spec['seed']}-{spec['proc']}-{k}")
        prefix = f"b{spec['proc']}.{k}."
        parse = movement_pb.SubmitBatchResponse.FromString
        clock = time.perf_counter
        mono = time.monotonic
        n = 0
        while mono() < t_stop:
            items = []
            work = []
            for _ in range(batch):
                a, b, amt = pick(rng)
                work.append((a, b, amt))
                items.append(
                    common_pb.Instruction(
                        transfer=common_pb.Transfer(
                            client_id=f"{prefix}{n}",
                            from_account_id=tb.account_id(a),
                            to_account_id=tb.account_id(b),
                            amount_minor=amt,
                            currency=CCY,
                        )
                    )
                )
                n += 1
            req = movement_pb.SubmitBatchRequest(instructions=items).SerializeToString()
            t = clock()
            try:
                answer = parse(await call(req, timeout=spec["timeout_s"]))
            except grpc.aio.AioRpcError as exc:
                key = exc.code().name
                errors[key] = errors.get(key, 0) + 1
                if sum(errors.values()) > 10:
                    return
                continue
            lat = clock() - t
            calls.append((mono(), lat, len(work)))
            for (a, b, amt), r in zip(work, answer.results, strict=True):
                status = {1: "accepted", 2: "replayed", 3: "refused", 4: "invalid"}.get(
                    r.status, "?"
                )
                done.append((a, b, amt, r.position, status))

    run = single if mode == "single" else batches
    await asyncio.sleep(max(0.0, t_start - time.monotonic()))
    cpu0 = time.process_time()
    await asyncio.gather(
        *(run(k, channels[k % len(channels)]) for k in range(spec["tasks"])),
    )
    cpu = time.process_time() - cpu0
    for ch in channels:
        await ch.close()
    return {"calls": calls, "done": done, "errors": errors, "cpu_s": cpu}


def _client_process(spec: dict[str, Any], ready: Any, results: Any) -> None:
    try:
        ready.wait()  # the start time arrives with the spec update below
        spec = {**spec, **_start_times(spec)}
        out = asyncio.run(_client_main(spec))
    except BaseException as exc:  # reported by the parent
        out = {"fatal": f"{type(exc).__name__}: {exc}"}
    results.put((spec["proc"], out))


def _start_times(spec: dict[str, Any]) -> dict[str, float]:
    """Start/stop times are in the shared file written by the parent (CLOCK_MONOTONIC is global)."""
    data = json.loads(Path(spec["clock_file"]).read_text())
    return {"t_start": float(data["t_start"]), "t_stop": float(data["t_stop"])}


# -- one API run ---------------------------------------------------------------------------------


@dataclass
class ApiResult:
    mode: str
    store: str
    transfers: int  # inside the measured window
    seconds: float
    tps: float
    calls: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    total_transfers: int  # every verified transfer, warm-up and tail included
    server_cpu_us: float
    client_cpu_us: float
    extra: dict[str, Any] = field(default_factory=dict)


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, by thread name (digits folded): Linux only."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return out
    names = {t.native_id: t.name for t in threading.enumerate()}
    for tid in tasks:
        try:
            comm = names.get(int(tid)) or Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = "".join("#" if ch.isdigit() else ch for ch in comm)
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _thread_share(a: dict[str, float], b: dict[str, float], per: int) -> dict[str, float]:
    """µs of CPU per transfer spent by each thread name between two snapshots."""
    diff = {k: b.get(k, 0.0) - a.get(k, 0.0) for k in b}
    return {k: round(1e6 * v / max(1, per), 1) for k, v in sorted(diff.items()) if v > 0}


class GcStats:
    """Collections per generation and the time they take (gc.callbacks), in this process."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._t = 0.0
        self.on = False

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if not self.on:
            return
        if phase == "start":
            self._t = time.perf_counter()
        else:
            gen = info["generation"]
            self.count[gen] += 1
            self.seconds[gen] += time.perf_counter() - self._t

    def summary(self) -> str:
        return " ".join(
            f"gen{g}:{n}/{1000 * s:.0f}ms"
            for g, (n, s) in enumerate(zip(self.count, self.seconds, strict=True))
        )


@contextlib.contextmanager
def _floor_server(tls: Path) -> Iterator[Any]:
    """The floor: a grpc.aio server with the same mutual TLS whose Transfer answers a constant.

    No gate, no ledger: what Python gRPC itself costs per call on this machine, measured with
    the same client processes. The ledger's API cannot be faster than this.
    """
    import grpc

    from ledger.api.pb import common_pb, movement_pb
    from ledger.api.server import _on_loop, server_credentials

    answer = movement_pb.TransferResponse(
        receipt=common_pb.Receipt(client_id="floor", status=1, position=1, kind="transferred")
    ).SerializeToString()

    async def transfer(request: bytes, context: Any) -> bytes:
        return answer

    async def build() -> tuple[Any, int]:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(transfer)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "custody.v1.MovementService", {"Transfer": handler}
                ),
            )
        )
        port = server.add_secure_port("127.0.0.1:0", server_credentials(tls))
        await server.start()
        return server, port

    server, port = _on_loop(build())
    try:
        yield SimpleNamespace(port=port)
    finally:
        _on_loop(server.stop(0))


def _count_submits(svc: Any) -> list[int]:
    """Count LedgerService.submit calls (requests handed to the group committer) from here on."""
    counter = [0]
    submit = svc.submit

    def counting_submit(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return submit(*args, **kwargs)

    svc.submit = counting_submit
    return counter


def _spread(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_api(args: argparse.Namespace, mode: str, store: str, say: Any) -> ApiResult:
    from ledger.api.certs import create_dev_pki
    from ledger.api.server import running_server
    from ledger.service import LedgerService

    total_tasks = args.batch_callers if mode == "batch" else args.clients
    procs = max(1, min(args.procs, total_tasks))
    with (
        tempfile.TemporaryDirectory(prefix="custody-grpc-bench-") as tmp,
        tb.fresh_config(store) as cfg,
    ):
        tls = Path(tmp) / "tls"
        create_dev_pki(tls, platforms=(PLATFORM,))
        svc = LedgerService(cfg)
        svc.start()
        try:
            tb.seed_ledger(svc, args.accounts)
            commits = tb.count_commits(svc)
            submits = _count_submits(svc)
            options = None
            if args.batch_via:
                from ledger.api.server import ServerOptions

                options = ServerOptions(batch_via=args.batch_via)
            floor = mode == "floor"
            serving = (
                _floor_server(tls)
                if floor
                else running_server(svc, host="127.0.0.1", port=0, tls_dir=tls, options=options)
            )
            with serving as srv:
                ctx = mp.get_context("spawn")
                ready = ctx.Event()
                results = ctx.Queue()
                clock_file = Path(tmp) / "clock.json"
                workers = []
                for p, tasks in enumerate(_spread(total_tasks, procs)):
                    spec = {
                        "proc": p,
                        "mode": "single" if floor else mode,
                        "tasks": tasks,
                        "channels": max(1, min(args.channels, tasks)),
                        "port": srv.port,
                        "tls_dir": str(tls),
                        "accounts": args.accounts,
                        "batch": args.batch,
                        "seed": args.seed,
                        "timeout_s": args.timeout,
                        "clock_file": str(clock_file),
                    }
                    w = ctx.Process(target=_client_process, args=(spec, ready, results))
                    w.start()
                    workers.append(w)
                time.sleep(args.spawn_wait)  # let the interpreters import grpc and connect
                before = tb.contention()
                t_start = time.monotonic() + 1.0
                t_measure = t_start + args.warmup
                t_stop = t_measure + args.seconds
                clock_file.write_text(json.dumps({"t_start": t_start, "t_stop": t_stop}))
                ready.set()
                time.sleep(max(0.0, t_measure - time.monotonic()))
                cpu_a = resource.getrusage(resource.RUSAGE_SELF)
                threads_a = thread_cpu()
                commits_a = commits[0]
                submits_a = submits[0]
                gc_stats = GcStats()
                gc.callbacks.append(gc_stats)
                gc_stats.on = True
                time.sleep(max(0.0, t_stop - time.monotonic()))
                gc_stats.on = False
                gc.callbacks.remove(gc_stats)
                cpu_b = resource.getrusage(resource.RUSAGE_SELF)
                threads_b = thread_cpu()
                commits_b = commits[0]
                submits_b = submits[0]
                after = tb.contention()
                outs: dict[int, dict[str, Any]] = {}
                deadline = time.monotonic() + args.timeout + 60
                while len(outs) < len(workers) and time.monotonic() < deadline:
                    try:
                        p, out = results.get(timeout=1.0)
                    except Exception:
                        if not any(w.is_alive() for w in workers) and results.empty():
                            break
                        continue
                    outs[p] = out
                for w in workers:
                    w.join(5)
                    if w.is_alive():
                        w.kill()
            tb.check(bool(outs) or not workers, "no client process reported")
        except BaseException:
            svc.close()
            raise
        try:
            fatal = [o["fatal"] for o in outs.values() if "fatal" in o]
            tb.check(not fatal, f"client process failed: {fatal[:2]}")
            tb.check(len(outs) == len(workers), "a client process did not report")
            errors: dict[str, int] = {}
            for o in outs.values():
                for k, v in o["errors"].items():
                    errors[k] = errors.get(k, 0) + v
            tb.check(not errors, f"error statuses: {errors}")
            work = [(a, b, amt) for o in outs.values() for (a, b, amt, _, _) in o["done"]]
            outcomes = [
                SimpleNamespace(status=st, seq=pos)
                for o in outs.values()
                for (_, _, _, pos, st) in o["done"]
            ]
            if floor:  # nothing was written: the floor server answers without the ledger
                info = {"records": 0}
            else:
                info = tb.verify_ledger(svc, cfg, args.accounts, work, outcomes, args.reload)
            accepted = sum(o.status == "accepted" for o in outcomes)
        finally:
            svc.close()
    window = [
        (lat, n) for o in outs.values() for (t, lat, n) in o["calls"] if t_measure <= t < t_stop
    ]
    lats = sorted(lat for lat, _ in window)
    n_window = sum(n for _, n in window)
    server_cpu = (cpu_b.ru_utime + cpu_b.ru_stime) - (cpu_a.ru_utime + cpu_a.ru_stime)
    client_cpu = sum(o["cpu_s"] for o in outs.values())
    total = len(work)
    n_commits = commits_b - commits_a

    def pct(q: float) -> float:
        return round(1000 * lats[min(len(lats) - 1, int(len(lats) * q))], 2) if lats else 0.0

    return ApiResult(
        mode=mode,
        store=store,
        transfers=n_window,
        seconds=args.seconds,
        tps=n_window / args.seconds,
        calls=len(window),
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        max_ms=round(1000 * lats[-1], 2) if lats else 0.0,
        total_transfers=total,
        server_cpu_us=round(1e6 * server_cpu / max(1, n_window), 1),
        client_cpu_us=round(1e6 * client_cpu / max(1, total), 1),
        extra={
            "accepted": accepted,
            "records": info["records"],
            "procs": len(workers),
            "concurrency": total_tasks,
            "avg_group": round(n_window / n_commits, 1) if n_commits else None,
            "per_submit": round(n_window / (submits_b - submits_a), 1)
            if submits_b > submits_a
            else None,
            "server_gc": gc_stats.summary(),
            "server_threads_us": _thread_share(threads_a, threads_b, n_window),
            "contention": f"{before} -> {after}",
        },
    )


# -- in-process baselines ------------------------------------------------------------------------


def run_inprocess(args: argparse.Namespace, mode: str, store: str) -> dict[str, Any]:
    before = tb.contention()
    if mode == "batch":
        work = tb.make_workload(args.inproc_transfers, args.accounts, args.seed + 7)
        r = tb.run_ledger_batched(store, args.accounts, work, args.batch, False)
        name = f"execute(batch={args.batch})"
    else:
        work = tb.make_workload(args.inproc_group_transfers, args.accounts, args.seed + 8)
        r = tb.run_ledger_group(store, args.accounts, work, args.clients, False)
        name = f"submit({args.clients} threads)"
    out = {"name": name, "tps": r.tps, "transfers": r.transfers, "seconds": r.seconds}
    out.update({k: v for k, v in r.extra.items() if k in ("cpu_us", "p50_ms", "p99_ms")})
    out["avg_group"] = r.extra.get("avg_group")
    out["contention"] = f"{before} -> {tb.contention()}"
    return out


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--mode",
        choices=("single", "batch", "both", "floor", "all"),
        default="both",
        help="both = single + batch; all = single + batch + floor",
    )
    p.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--seconds", type=float, default=15.0, help="measured window per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured load before the window")
    p.add_argument("--repeat", type=int, default=1, help="runs of each mode; medians reported")
    p.add_argument("--clients", type=int, default=32, help="concurrent single-transfer callers")
    p.add_argument("--batch-callers", type=int, default=4, help="concurrent SubmitBatch callers")
    p.add_argument("--batch", type=int, default=1_000, help="transfers per SubmitBatch / execute")
    p.add_argument("--procs", type=int, default=4, help="client processes (callers are spread)")
    p.add_argument("--channels", type=int, default=2, help="grpc.aio channels per client process")
    p.add_argument("--accounts", type=int, default=1_000, help="customer accounts")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of every RPC (s)")
    p.add_argument("--spawn-wait", type=float, default=3.0, help="time for clients to connect")
    p.add_argument(
        "--inproc-transfers", type=int, default=50_000, help="transfers for in-process execute"
    )
    p.add_argument(
        "--inproc-group-transfers",
        type=int,
        default=15_000,
        help="transfers for in-process submit from --clients threads",
    )
    p.add_argument(
        "--batch-via",
        choices=("submit", "execute"),
        help="server's SubmitBatch path (ServerOptions.batch_via; default: the server's)",
    )
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process baselines")
    p.add_argument("--reload", action="store_true", help="also reload the log and compare state")
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    args = p.parse_args(argv)
    if args.accounts < 2 or args.repeat < 1 or args.seconds <= 0 or args.clients < 1:
        p.error("need --accounts >= 2, --repeat >= 1, --seconds > 0, --clients >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = (lambda s: print(s, file=sys.stderr)) if args.json else print
    modes = {"both": ["single", "batch"], "all": ["single", "batch", "floor"]}.get(
        args.mode, [args.mode]
    )
    say(
        f"{dt.datetime.now().isoformat(timespec='seconds')}  cpus={os.cpu_count()}  "
        f"code {tb.code_version()}  store={args.store}  {tb.contention()}"
    )
    api_runs: dict[str, list[ApiResult]] = {}
    inproc_runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for rep in range(args.repeat):
            for mode in modes:
                r = run_api(args, mode, args.store, say)
                api_runs.setdefault(mode, []).append(r)
                say(
                    f"  run {rep + 1}/{args.repeat} api-{mode:6s} {r.tps:>9,.0f} transfers/s  "
                    f"p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms max {r.max_ms:.1f} ms  "
                    f"calls {r.calls}  server cpu {r.server_cpu_us} µs/transfer  "
                    f"clients cpu {r.client_cpu_us} µs/transfer  "
                    + " ".join(f"{k}={v}" for k, v in r.extra.items())
                )
                if not args.no_inprocess and mode != "floor":
                    b = run_inprocess(args, mode, args.store)
                    inproc_runs.setdefault(mode, []).append(b)
                    say(
                        f"  run {rep + 1}/{args.repeat} in-process {b['name']:18s} "
                        f"{b['tps']:>9,.0f} transfers/s  "
                        + " ".join(f"{k}={v}" for k, v in b.items() if k not in ("name", "tps"))
                    )
    except tb.VerificationFailed as exc:
        print(f"VERIFICATION FAILED: {exc}", file=sys.stderr)
        return 2

    summary: dict[str, Any] = {}
    for mode, rs in api_runs.items():
        entry: dict[str, Any] = {
            "median_tps": round(statistics.median(r.tps for r in rs)),
            "runs_tps": [round(r.tps) for r in rs],
            "p50_ms": statistics.median(r.p50_ms for r in rs),
            "p99_ms": statistics.median(r.p99_ms for r in rs),
            "server_cpu_us": statistics.median(r.server_cpu_us for r in rs),
            "client_cpu_us": statistics.median(r.client_cpu_us for r in rs),
            "target_tps": TARGETS[mode],
        }
        base = inproc_runs.get(mode)
        if base:
            entry["inprocess"] = base[0]["name"]
            entry["inprocess_median_tps"] = round(statistics.median(b["tps"] for b in base))
            # per-repeat ratio (same moment, same load), then the median
            entry["ratio_api_over_inprocess"] = round(
                statistics.median(r.tps / b["tps"] for r, b in zip(rs, base, strict=True)), 3
            )
        summary[mode] = entry
    if args.json:
        doc = {
            "benchmark": "grpc_load",
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": tb.machine(),
            "code": tb.code_version(),
            "params": {k: v for k, v in vars(args).items() if k != "json"},
            "summary": summary,
            "runs": {m: [asdict(r) for r in rs] for m, rs in api_runs.items()},
            "inprocess": inproc_runs,
        }
        print(json.dumps(doc, indent=2))
        return 0
    print("median:")
    for mode, e in summary.items():
        line = (
            f"  api-{mode:6s} {e['median_tps']:>9,} transfers/s  p50 {e['p50_ms']:.2f} ms  "
            f"p99 {e['p99_ms']:.2f} ms  (target {e['target_tps']:,}/s"
            + (f", p99 <= {P99_TARGET_MS:.0f} ms)" if mode == "single" else ")")
        )
        if "inprocess_median_tps" in e:
            line += (
                f"  in-process {e['inprocess']} {e['inprocess_median_tps']:,}/s"
                f"  ratio {e['ratio_api_over_inprocess']:.3f}"
            )
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
