"""One ledger server of the failover tests: a LedgerService behind a tiny JSON-lines TCP API.

Usage: cluster_node.py (the store, CUSTODY_SERVER_ID, CUSTODY_ADVERTISE=127.0.0.1:PORT and
CUSTODY_LEASE_POLL_MS come from the environment; it listens on the advertised port).

Prints, flushed, one line per event:
  ready <server id> <wall ms>
  role <platform> writer <epoch> <from position> <wall ms>     (it took the write role)
  role <platform> follower - - <wall ms>                        (it lost it)

Protocol: a request line {"platform": P, "cids": [..]} asks for one transfer of 1 minor unit from
`alice` to `bob` per client id, submitted to the platform's group committer. The answer line is
{"server": ID, "ok": [[cid, status, seq], ..]} once committed, or {"server": ID, "elsewhere":
ADDRESS, "writer": ID} when another server writes the platform (ADDRESS empty: nobody does yet),
or {"server": ID, "retry": WHY} when the request did not happen (retry with the same ids).
"""

from __future__ import annotations

import json
import socketserver
import sys
import threading
import time
from typing import Any

from ledger import commands as c
from ledger.config import Config
from ledger.lease import WriterElsewhere, WriterInfo
from ledger.service import LedgerService

ACTOR = "platform:test"
_OUT = threading.Lock()


def emit(line: str) -> None:
    with _OUT:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def main() -> int:
    config = Config.from_env()
    host, _, port = config.advertise.rpartition(":")
    service = LedgerService(config)

    def on_role(platform_id: str, role: str, info: WriterInfo | None) -> None:
        if info is not None:
            emit(f"role {platform_id} {role} {info.epoch} {info.from_seq} {wall_ms()}")
        else:
            emit(f"role {platform_id} {role} - - {wall_ms()}")

    service.role_listener = on_role

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for raw in self.rfile:
                try:
                    answer = serve_one(json.loads(raw))
                except Exception as exc:  # a retryable failure of this request only
                    answer = {"retry": f"{type(exc).__name__}: {exc}"}
                answer["server"] = config.server_id
                self.wfile.write(json.dumps(answer).encode() + b"\n")
                self.wfile.flush()

    def serve_one(request: dict[str, Any]) -> dict[str, Any]:
        cmds: list[c.Command] = [
            c.Transfer(
                client_id=cid,
                from_account_id="alice",
                to_account_id="bob",
                amount_minor=1,
                currency="CNY",
            )
            for cid in request["cids"]
        ]
        try:
            outcomes = service.submit(request["platform"], cmds, ACTOR).result(timeout=60)
        except WriterElsewhere as exc:
            return {"elsewhere": exc.address, "writer": exc.server_id}
        return {"ok": [[o.client_id, o.status, o.seq] for o in outcomes]}

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    server = socketserver.ThreadingTCPServer((host, int(port)), Handler)
    service.start()
    emit(f"ready {config.server_id} {wall_ms()}")
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
