"""Configuration by environment (documented in docs/CONFIG.md).

CUSTODY_STORE            sqlite (default) | postgres
CUSTODY_DATA_DIR         folder for the SQLite file and local keys (default ./custody-data)
CUSTODY_SQLITE_PATH      explicit SQLite file (default $CUSTODY_DATA_DIR/ledger.sqlite3)
CUSTODY_PG_DSN_*         POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER, POSTGRES_PASSWORD,
                         POSTGRES_DBNAME, POSTGRES_SCHEMA (eventsourcing's own keys, passed through)
CUSTODY_MASTER_KEY       base64 32-byte key wrapping per-customer data keys (default: a key file
                         created with mode 0600 in the data folder)
CUSTODY_LEDGER_ID        names this ledger in checkpoint origins (default "local")
CUSTODY_SIGNING_KEY      Ed25519 checkpoint key file (default $CUSTODY_DATA_DIR/keys/checkpoint.key,
                         created on first start with mode 0600)
CUSTODY_CHECKPOINT_EVERY sign a checkpoint after this many new records (default 10000, 0 = never)
CUSTODY_CHECKPOINT_INTERVAL_S  ... or after this many seconds with new records (default 60)
CUSTODY_SNAPSHOT_EVERY   store a state snapshot after this many new records (default 1000000,
                         0 = never); restarts load it and replay only the tail
CUSTODY_SWEEP_INTERVAL_S release expired holds every this many seconds in `custody serve`
                         (default 60, 0 = never; the sweep is an `expire_holds` record)
CUSTODY_PROJECTIONS      embedded (default: `custody serve` keeps the read models current) | off
                         (run `custody project run --follow` as separate workers instead)
CUSTODY_RISK             embedded (default: `custody serve` runs the early-warning engine) | off
CUSTODY_GROUP_MAX        most instructions in one database transaction (default 8192)
CUSTODY_QUEUE_MAX        most instructions waiting for a platform's writer (default 100000)
CUSTODY_SERVER_ID        names this server in the writers table (default <hostname>-<pid>-<random>)
CUSTODY_ADVERTISE        HOST:PORT clients use to reach this server; written to the writers table
                         when it takes a platform's write role, and handed to callers that ask
                         another server to write that platform (default: empty = unknown)
CUSTODY_LEASE_POLL_MS    PostgreSQL: how often a server checks its write leases' connection and
                         tries to take the leases of platforms nobody writes (default 1000)
CUSTODY_LEASE_BALANCE    PostgreSQL: 1 = each server holds at most its fair share of the write
                         leases (ceil(platforms / live servers)) and hands over the rest
                         (default 0: the first server takes every free lease)
CUSTODY_METRICS_PORT     `custody serve` answers GET /metrics (Prometheus text format) on
                         127.0.0.1:PORT, or HOST:PORT when given so (default 0 = off)
CUSTODY_LOG_FORMAT       json | text | auto (default: text on a terminal, else JSON lines)
CUSTODY_PLACEMENT        a placement file spreading platforms over several PostgreSQL databases
                         (`ledger/placement.py`, docs/OPERATIONS.md); implies CUSTODY_STORE=postgres
CUSTODY_STORE_NAME       with a placement: the store (database) this process serves; its
                         POSTGRES_* keys come from the file, POSTGRES_PASSWORD from the environment
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from ledger.placement import Placement, PlacementError

STORE_SQLITE: Final = "sqlite"
STORE_POSTGRES: Final = "postgres"
_PG_KEYS: Final = (
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DBNAME",
    "POSTGRES_SCHEMA",
    "POSTGRES_POOL_SIZE",
    "POSTGRES_MAX_OVERFLOW",
    "POSTGRES_CONNECT_TIMEOUT",
    "POSTGRES_LOCK_TIMEOUT",
)


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, choices[0])
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}")
    return value


def _ledger_id(value: str) -> str:
    if not value or len(value) > 64 or not all(ch.isalnum() or ch in "-_." for ch in value):
        raise ConfigError("CUSTODY_LEDGER_ID must be 1..64 of [A-Za-z0-9._-]")
    return value


def _int(env: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key} must be an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{key} must be in {low}..{high}")
    return value


def _server_id(env: Mapping[str, str]) -> str:
    value = env.get("CUSTODY_SERVER_ID") or (
        f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"
    )
    if len(value) > 64 or not all(ch.isalnum() or ch in "-_.:" for ch in value):
        raise ConfigError("CUSTODY_SERVER_ID must be 1..64 of [A-Za-z0-9._:-]")
    return value


def _advertise(env: Mapping[str, str]) -> str:
    value = env.get("CUSTODY_ADVERTISE", "")
    if not value:
        return ""
    host, sep, port = value.rpartition(":")
    if (
        not sep
        or not host
        or len(value) > 255
        or not port.isdigit()
        or not 1 <= int(port) <= 65_535
        or any(ch.isspace() or ch in "/@?#" for ch in host)
    ):
        raise ConfigError("CUSTODY_ADVERTISE must be HOST:PORT")
    return value


def _metrics_address(env: Mapping[str, str]) -> tuple[str, int]:
    """CUSTODY_METRICS_PORT: PORT (on 127.0.0.1) or HOST:PORT; 0 or empty = no endpoint."""
    value = env.get("CUSTODY_METRICS_PORT", "").strip()
    host, sep, port = value.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]")
    if (
        (value and not port.isdigit())
        or (port.isdigit() and int(port) > 65_535)
        or (sep and not host)
        or any(ch.isspace() or ch in "/@?#" for ch in host)
    ):
        raise ConfigError("CUSTODY_METRICS_PORT must be PORT or HOST:PORT (0 = off)")
    return host, int(port) if port else 0


@dataclass(frozen=True)
class Config:
    store: str
    data_dir: Path
    sqlite_path: Path
    postgres: dict[str, str] = field(default_factory=dict)
    master_key_b64: str | None = None
    group_max: int = 8192
    queue_max: int = 100_000
    ledger_id: str = "local"
    signing_key_path: Path | None = None
    checkpoint_every: int = 10_000
    checkpoint_interval_s: int = 60
    sweep_interval_s: int = 60
    snapshot_every: int = 1_000_000
    projections: str = "embedded"
    risk: str = "embedded"
    server_id: str = "local"
    advertise: str = ""
    lease_poll_ms: int = 1000
    lease_balance: int = 0  # 1 = spread write leases over the live servers (ledger/balance.py)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0 = no /metrics endpoint
    log_format: str = "auto"  # json | text | auto (text on a terminal)
    placement: Placement | None = None  # several databases: CUSTODY_PLACEMENT
    store_name: str = ""  # the placement's store this process serves

    def for_store(self, store_name: str) -> Config:
        """This configuration pointed at another store of the placement (moves, operators)."""
        if self.placement is None:
            raise ConfigError("no placement (CUSTODY_PLACEMENT) is configured")
        return replace(
            self,
            store=STORE_POSTGRES,
            postgres=_store_postgres(self.placement, store_name, self.postgres),
            store_name=store_name,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        store = env.get("CUSTODY_STORE", STORE_SQLITE)
        if store not in (STORE_SQLITE, STORE_POSTGRES):
            raise ConfigError("CUSTODY_STORE must be 'sqlite' or 'postgres'")
        data_dir = Path(env.get("CUSTODY_DATA_DIR", "custody-data"))
        sqlite_path = Path(env.get("CUSTODY_SQLITE_PATH", str(data_dir / "ledger.sqlite3")))
        postgres = {k: env[k] for k in _PG_KEYS if k in env}
        if store == STORE_POSTGRES:
            postgres.setdefault("POSTGRES_HOST", "127.0.0.1")
            postgres.setdefault("POSTGRES_PORT", "5432")
            postgres.setdefault("POSTGRES_USER", "postgres")
            postgres.setdefault("POSTGRES_PASSWORD", "")
            postgres.setdefault("POSTGRES_DBNAME", "postgres")
        metrics = _metrics_address(env)
        placement, store_name = _placement(env)
        if placement is not None:
            store = STORE_POSTGRES
            postgres = _store_postgres(placement, store_name, postgres)
        return cls(
            store=store,
            data_dir=data_dir,
            sqlite_path=sqlite_path,
            postgres=postgres,
            master_key_b64=env.get("CUSTODY_MASTER_KEY"),
            group_max=_int(env, "CUSTODY_GROUP_MAX", 8192, 1, 65_536),
            queue_max=_int(env, "CUSTODY_QUEUE_MAX", 100_000, 8_192, 10_000_000),
            ledger_id=_ledger_id(env.get("CUSTODY_LEDGER_ID", "local")),
            signing_key_path=Path(
                env.get("CUSTODY_SIGNING_KEY", str(data_dir / "keys" / "checkpoint.key"))
            ),
            checkpoint_every=_int(env, "CUSTODY_CHECKPOINT_EVERY", 10_000, 0, 10_000_000),
            checkpoint_interval_s=_int(env, "CUSTODY_CHECKPOINT_INTERVAL_S", 60, 1, 86_400),
            sweep_interval_s=_int(env, "CUSTODY_SWEEP_INTERVAL_S", 60, 0, 86_400),
            snapshot_every=_int(env, "CUSTODY_SNAPSHOT_EVERY", 1_000_000, 0, 1_000_000_000),
            projections=_choice(env, "CUSTODY_PROJECTIONS", ("embedded", "off")),
            risk=_choice(env, "CUSTODY_RISK", ("embedded", "off")),
            server_id=_server_id(env),
            advertise=_advertise(env),
            lease_poll_ms=_int(env, "CUSTODY_LEASE_POLL_MS", 1000, 50, 60_000),
            lease_balance=_int(env, "CUSTODY_LEASE_BALANCE", 0, 0, 1),
            metrics_host=metrics[0],
            metrics_port=metrics[1],
            log_format=_choice(env, "CUSTODY_LOG_FORMAT", ("auto", "json", "text")),
            placement=placement,
            store_name=store_name,
        )


def _placement(env: Mapping[str, str]) -> tuple[Placement | None, str]:
    path = env.get("CUSTODY_PLACEMENT", "")
    name = env.get("CUSTODY_STORE_NAME", "")
    if not path:
        if name:
            raise ConfigError("CUSTODY_STORE_NAME needs CUSTODY_PLACEMENT")
        return None, ""
    try:
        placement = Placement.load(path)
    except PlacementError as exc:
        raise ConfigError(str(exc)) from None
    if name not in placement.stores:
        raise ConfigError(
            f"CUSTODY_STORE_NAME must name a store of the placement: {', '.join(placement.stores)}"
        )
    return placement, name


def _store_postgres(placement: Placement, name: str, env_pg: Mapping[str, str]) -> dict[str, str]:
    """The store's keys from the file; only the password (never in the file) from the env."""
    try:
        pg = placement.postgres(name)
    except PlacementError as exc:
        raise ConfigError(str(exc)) from None
    pg.setdefault("POSTGRES_HOST", "127.0.0.1")
    pg.setdefault("POSTGRES_PORT", "5432")
    pg.setdefault("POSTGRES_USER", "postgres")
    pg["POSTGRES_PASSWORD"] = env_pg.get("POSTGRES_PASSWORD", "")
    return pg
