"""Shared helpers for the observability tests: a real server with a /metrics port, scraping.

A plain module (not conftest) because several test folders have a conftest module."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from ledger.api.client import CustodyClient
from ledger.api.server import RunningServer, running_server
from ledger.config import Config
from ledger.service import LedgerService

CCY = "CNY"
Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Served:
    service: LedgerService
    server: RunningServer
    clients: list[CustodyClient] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def client(self, role: str, name: str, **kwargs: object) -> CustodyClient:
        kwargs.setdefault("retries", 0)
        client = CustodyClient.insecure_dev(self.target, role, name, **kwargs)
        self.clients.append(client)
        return client

    def scrape_text(self, path: str = "/metrics") -> str:
        port = self.server.metrics_port
        assert port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            assert answer.status == 200
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body: bytes = answer.read()
        return body.decode("utf-8")

    def scrape(self) -> dict[Key, float]:
        return samples(self.scrape_text())


def samples(text: str) -> dict[Key, float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scraped: dict[Key, float], name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (yet)."""
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: dict[Key, float], before: dict[Key, float], name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@contextmanager
def served(env: dict[str, str]) -> Iterator[Served]:
    """A started LedgerService (real clock) behind a loopback server in insecure development
    mode, with its metrics on an ephemeral loopback port."""
    service = LedgerService(Config.from_env(env))
    service.start()
    try:
        with running_server(service, insecure_dev=True, port=0, metrics_port=0) as server:
            s = Served(service, server)
            try:
                yield s
            finally:
                for client in s.clients:
                    client.close()
    finally:
        service.close()
