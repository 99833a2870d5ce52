"""Health probe: exit 0 only if the server reports SERVING (for Docker HEALTHCHECK and scripts).

python -m ledger.api.healthcheck --address 127.0.0.1:50052            # maintenance port
python -m ledger.api.healthcheck --address host:50051 --tls-dir DIR --cert operator-dev
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(
    address: str,
    service: str = "",
    timeout_s: float = 3.0,
    tls_dir: Path | None = None,
    cert: str = "",
) -> bool:
    if tls_dir is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(tls_dir / "ca.pem").read_bytes(),
            private_key=(tls_dir / f"{cert}.key").read_bytes(),
            certificate_chain=(tls_dir / f"{cert}.pem").read_bytes(),
        )
        channel = grpc.secure_channel(address, credentials)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            answer: health_pb2.HealthCheckResponse = stub.Check(  # type: ignore[attr-defined]
                request, timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ledger.api.healthcheck")
    parser.add_argument("--address", default="127.0.0.1:50052")
    parser.add_argument("--service", default="")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--tls-dir", type=Path)
    parser.add_argument("--cert", default="operator-dev", help="client certificate stem")
    args = parser.parse_args(argv)
    ok = check(args.address, args.service, args.timeout, args.tls_dir, args.cert)
    print("SERVING" if ok else "NOT SERVING", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
