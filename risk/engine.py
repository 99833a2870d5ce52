"""The early-warning engine: follows each platform's log, runs the rules, raises alerts.

One step for a platform:

1. Read the next page of the log after the engine's position (`LedgerStore.read`, read-only)
   and check it continues what was read: positions without gaps, every chain link from the
   stored head, `seq`/`kind`/`platform` inside each record. A broken link is itself a finding
   (W17, RED) and the engine stays before it.
2. Run the rules over the records; write, in ONE transaction behind a compare-and-set on the
   old position: the new position and head, the rule state, the read-model rows (alerts,
   reconciliations, indicators) and the commands to give the ledger (the outbox).
3. Time-based rules (deadlines, ageing, the reconciliation feed, the scheduled chain
   verification) run after the log is caught up, at `now` = the later of the clock and the last
   record's time, in the same kind of transaction.
4. The outbox is given to the ledger through `LedgerService.execute` as `system:early-warning`:
   `RaiseAlert` (client id `risk:<alert id>`), and for a RED alert read back from the log,
   `SetGate RESTRICTED` when the platform's policy says `auto_restrict` (client id
   `risk-gate:<alert id>`). The ledger's idempotency makes a re-sent command a replay, so a crash
   between the ledger's commit and the outbox update raises nothing twice.

Given the log (and, for time-based rules, the times the ticks ran), the findings, their ids and
the read model are deterministic: no random ids, no wall clock in the records' rules.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from psycopg.rows import tuple_row as _tuple_row

from controls.codes import Code
from controls.policy import GATE_ORDER
from ledger import commands as c
from ledger import records
from ledger.service import LedgerService
from ledger.store import READ_PAGE_MAX, log_stream
from ledger.writer import verify_stored_chain
from risk import store as rs
from risk.feed import NullFeed, ReconciliationFeed
from risk.rules import (
    REC_DECODER,
    STATE_FORMAT,
    Finding,
    Output,
    Rules,
    State,
    changes,
    decode_state,
    encode_state,
    load_rows,
    new_state,
)
from risk.ruleset import DEFAULT_RULES, RuleSet

log = logging.getLogger("custody.risk")

ACTOR: Final = "system:early-warning"
# Records per step (one transaction). Larger steps amortise the state write (every account a
# step touched is written once per step, its windows whole: 20,000 -> 50,000 took a third off
# the commits of bench/risk.py); alerts wait at most one step.
DEFAULT_BATCH: Final = 50_000
BATCH_MAX: Final = 100_000
SEND_CHUNK: Final = 500  # commands per ledger request
GENESIS_HEX: Final = records.CHAIN_GENESIS.hex()
_DECODE: Final = msgspec.json.Decoder().decode
_REC_DECODE: Final = REC_DECODER.decode
_CMD_ENCODE: Final = msgspec.json.Encoder(order="sorted").encode
VERIFY_PAGE: Final = 20_000  # rows per read of the scheduled full-chain verification


class _Ident(msgspec.Struct):
    """The three fields of a record the chain verification compares with where it is stored."""

    seq: int
    kind: str
    platform: str


_IDENT_DECODE: Final = msgspec.json.Decoder(_Ident).decode


class PositionConflict(RuntimeError):
    """Another engine moved this platform's position: our batch rolled back, nothing lost."""


@dataclass
class _Pos:
    position: int
    head: bytes
    state: State


class RiskEngine:
    def __init__(
        self,
        service: LedgerService,
        rules: RuleSet = DEFAULT_RULES,
        feed: ReconciliationFeed | None = None,
        clock_ms: Callable[[], int] | None = None,
        batch_size: int = DEFAULT_BATCH,
        actor: str = ACTOR,
    ) -> None:
        assert 1 <= batch_size <= BATCH_MAX
        self.service = service
        self.store = service.store
        self.ruleset = rules
        self.rules = Rules(rules)
        self.feed: ReconciliationFeed = feed if feed is not None else NullFeed()
        self.clock_ms = clock_ms if clock_ms is not None else lambda: int(time.time() * 1000)
        self.batch_size = batch_size
        self.actor = actor
        self.db = rs.open_db(self.store)
        self._pos: dict[str, _Pos] = {}
        self._lock = threading.RLock()

    # -- positions and state --------------------------------------------------------------------

    def _load(self, platform: str) -> _Pos:
        cached = self._pos.get(platform)
        if cached is not None:
            return cached
        db, ph = self.db, self.db.ph
        with db.tx() as cur:
            cur.execute(
                f"INSERT INTO {db.t('risk_positions')} (platform, position, head, state) "
                f"VALUES ({ph}, -1, {ph}, {ph}) ON CONFLICT DO NOTHING",
                (platform, GENESIS_HEX, encode_state(new_state())),
            )
            row = db.fetchone(
                cur,
                f"SELECT position, head, state FROM {db.t('risk_positions')} WHERE platform = {ph}",
                (platform,),
            )
            assert row is not None
            state = decode_state(bytes(row[2]))
            if state.format != STATE_FORMAT:
                # stored by an engine before per-account rows: evaluate the log again (alerts
                # already in the log are read back, not raised again)
                log.info("risk state of %s is format %d: rebuilding", platform, state.format)
                self._reset(cur, platform)
                row, state = (-1, GENESIS_HEX), new_state()
            else:
                load_rows(
                    state,
                    (
                        (str(k), bytes(v))
                        for k, v in db.fetchall(
                            cur,
                            f"SELECT key, value FROM {db.t('risk_state')} WHERE platform = {ph} "
                            "ORDER BY key",
                            (platform,),
                        )
                    ),
                )
        pos = _Pos(int(row[0]), bytes.fromhex(row[1]), state)
        self._pos[platform] = pos
        return pos

    def _reset(self, cur: Any, platform: str) -> None:
        """Forget the platform's rule state and read model (not the outbox) in `cur`'s
        transaction: the next batch starts again from the first record."""
        db, ph = self.db, self.db.ph
        for table, _ in rs.READ_MODEL:
            cur.execute(f"DELETE FROM {db.t(table)} WHERE platform = {ph}", (platform,))
        cur.execute(f"DELETE FROM {db.t('risk_state')} WHERE platform = {ph}", (platform,))
        cur.execute(
            f"UPDATE {db.t('risk_positions')} SET position = -1, head = {ph}, state = {ph} "
            f"WHERE platform = {ph}",
            (GENESIS_HEX, encode_state(new_state()), platform),
        )

    def _commit(
        self,
        platform: str,
        old: _Pos,
        position: int,
        head: bytes,
        recs: list[dict[str, Any]],
        out: Output,
    ) -> None:
        """Position, state, read model and outbox in one transaction (compare-and-set). The
        state: its platform-wide part whole, and only the keyed rows that changed."""
        db, ph = self.db, self.db.ph
        commands = self._commands(out)
        upsert, delete = changes(old.state)
        with db.tx() as cur:
            cur.execute(
                f"UPDATE {db.t('risk_positions')} SET position = {ph}, head = {ph}, state = {ph} "
                f"WHERE platform = {ph} AND position = {ph}",
                (position, head.hex(), encode_state(old.state), platform, old.position),
            )
            if cur.rowcount != 1:
                raise PositionConflict(f"{platform}: risk position moved from {old.position}")
            state_table = db.t("risk_state")
            if upsert:
                cur.executemany(
                    f"INSERT INTO {state_table} (platform, key, value) VALUES ({ph}, {ph}, {ph}) "
                    "ON CONFLICT (platform, key) DO UPDATE SET value = excluded.value",
                    [(platform, k, v) for k, v in upsert],
                )
            if delete:
                cur.executemany(
                    f"DELETE FROM {state_table} WHERE platform = {ph} AND key = {ph}",
                    [(platform, k) for k in delete],
                )
            rs.apply_records(db, cur, platform, recs)
            rs.write_indicators(db, cur, platform, out.counters, out.gauges)
            if commands:  # one executemany: a step can queue thousands of alerts
                cur.executemany(
                    f"INSERT INTO {db.t('risk_outbox')} (platform, client_id, position, n, op, "
                    f"body, status, result) VALUES ({ph}, {ph}, {ph}, {ph}, {ph}, {ph}, "
                    "'queued', '') ON CONFLICT DO NOTHING",
                    [
                        (platform, client_id, position, n, op, body)
                        for n, (client_id, op, body) in enumerate(commands)
                    ],
                )
        old.position, old.head = position, head

    def _commands(self, out: Output) -> list[tuple[str, str, str]]:
        cmds: list[tuple[str, str, str]] = []
        for f in out.findings:
            cmd = alert_command(f)
            cmds.append((cmd.client_id, "raise_alert", _CMD_ENCODE(cmd).decode()))
        for alert in out.restrict:
            gate = c.SetGate(
                client_id=f"risk-gate:{alert}",
                gate="RESTRICTED",
                reason=f"RED alert {alert} (early warning, policy auto_restrict)",
            )
            cmds.append((gate.client_id, "set_gate", _CMD_ENCODE(gate).decode()))
        return cmds

    # -- one batch of the log -------------------------------------------------------------------

    def run_once(self, platform: str) -> int:
        """Read and evaluate at most one page of `platform`'s log; records read."""
        with self._lock:
            try:
                return self._batch(platform)
            except BaseException:
                self._pos.pop(platform, None)  # the transaction may have rolled back: reload
                raise

    def _read(self, platform: str, after: int) -> list[tuple[int, str, bytes]]:
        """The next page of the log after `after`, read straight from the event table (like the
        projections' runner: no eventsourcing `StoredEvent` per row, which costs about as much
        as the rules). Bounded above by position as `LedgerStore.read` is; if the recorder does
        not expose its table, `LedgerStore.read` page by page."""
        if self._events_table() is None:
            rows: list[tuple[int, str, bytes]] = []
            while len(rows) < self.batch_size:
                page = self.store.read(
                    log_stream(platform),
                    after=rows[-1][0] if rows else after,
                    limit=min(READ_PAGE_MAX, self.batch_size - len(rows)),
                )
                rows += page
                if len(page) < READ_PAGE_MAX:
                    break
            return rows
        return self._rows(platform, after, self.batch_size)

    def _events_table(self) -> str | None:
        """The event table's qualified name, or None if the recorder does not expose it."""
        table = getattr(self.store.recorder, "events_table_name", None)
        if not isinstance(table, str) or not table.replace("_", "").isalnum():
            return None
        return f'"{self.db.schema}".{table}' if self.db.schema else table

    def _rows(
        self, platform: str, after: int, limit: int, bounded: bool = True
    ) -> list[tuple[int, str, bytes]]:
        """Up to `limit` rows of the log after `after`, in order; `bounded`: only positions up
        to `after + limit` (keeps PostgreSQL on the primary key index, as `LedgerStore.read`)."""
        name = self._events_table()
        assert name is not None and limit >= 1
        db = self.db
        upper = f"AND originator_version <= {db.ph} " if bounded else ""
        params: tuple[Any, ...] = (log_stream(platform), after)
        if bounded:
            params += (after + limit,)
        sql = (
            f"SELECT originator_version, topic, state FROM {name} "
            f"WHERE originator_id = {db.ph} AND originator_version > {db.ph} {upper}"
            f"ORDER BY originator_version LIMIT {int(limit)}"
        )
        with db.reading() as cur:
            # plain tuples (the pool's cursors build a `sqlite3.Row` / dict per row otherwise);
            # PostgreSQL in binary: `state` as its bytes, not twice as many hex digits
            if db.is_pg:
                cur.row_factory = _tuple_row
                cur.execute(sql, params, binary=True)
            else:
                cur.row_factory = None
                cur.execute(sql, params)
            fetched: list[tuple[int, str, bytes]] = cur.fetchall()
        if db.is_pg:
            return [(v, t, bytes(st)) for v, t, st in fetched]
        return fetched

    def verify_chain(self, platform: str) -> tuple[int, int | None, str]:
        """W17's scheduled check of the whole stored chain: what `verify_stored_chain` checks
        (positions without gaps, every link, each record's seq/kind/platform), reading the event
        table directly and decoding only those three fields (the ledger's walk decodes every
        record whole through `StoredEvent`s: about a fifth of a catch-up). Anything irregular
        is handed to `verify_stored_chain`, so a failure is reported in its exact words."""
        if self._events_table() is None:
            return verify_stored_chain(self.store, platform)
        head = records.CHAIN_GENESIS
        expected = 0
        sha256 = hashlib.sha256
        hash_len = records.HASH_LEN
        while True:
            rows = self._rows(platform, expected - 1, VERIFY_PAGE)
            for seq, kind, packed in rows:
                if seq != expected or len(packed) <= hash_len:
                    return verify_stored_chain(self.store, platform)
                data = packed[hash_len:]
                head = sha256(head + data).digest()
                if head != packed[:hash_len]:
                    return verify_stored_chain(self.store, platform)
                try:
                    ident = _IDENT_DECODE(data)
                except msgspec.MsgspecError:
                    return verify_stored_chain(self.store, platform)
                if ident.seq != seq or ident.kind != kind or ident.platform != platform:
                    return verify_stored_chain(self.store, platform)
                expected += 1
            if len(rows) < VERIFY_PAGE:
                # a short page ends the log, unless a row follows a gap (a deleted row)
                if self._rows(platform, expected - 1, 1, bounded=False):
                    return verify_stored_chain(self.store, platform)
                return expected, None, "ok"

    def _batch(self, platform: str) -> int:
        pos = self._load(platform)
        rows = self._read(platform, pos.position)
        if not rows:
            return 0
        # each record decoded once, into the typed fields the rules read, and evaluated as it is
        # checked; the few governance kinds (`Rules.general`) are also decoded whole
        out = Output()
        state = pos.state
        apply, apply_rec, general = self.rules.apply, self.rules.apply_rec, Rules.general
        whole_recs: list[dict[str, Any]] = []
        head = pos.head
        first = expected = pos.position + 1
        broken: tuple[int, str] | None = None
        sha256 = hashlib.sha256
        hash_len = records.HASH_LEN
        for seq, kind, packed in rows:
            if seq != expected:
                break  # a gap: not visible yet (or deleted: the scheduled verify names it)
            link, data = packed[:hash_len], packed[hash_len:]
            if sha256(head + data).digest() != link:
                broken = (seq, "chain link does not match the record and its predecessor")
                break
            try:
                rec = _REC_DECODE(data)
            except msgspec.MsgspecError:
                rec = None
            if rec is None or rec.seq != seq or rec.kind != kind or rec.platform != platform:
                broken = (seq, "record position, kind or platform differs from where it is stored")
                break
            if general(rec):
                whole = _DECODE(data)
                whole_recs.append(whole)
                apply(state, whole, out)
            else:
                apply_rec(state, rec, out)
            head = link
            expected += 1
        if broken is not None:
            self.rules.integrity_failure(state, broken[0], broken[1], out)
        self._commit(platform, pos, expected - 1, head, whole_recs, out)
        return expected - first

    # -- time -----------------------------------------------------------------------------------

    def tick(self, platform: str, now_ms: int | None = None) -> int:
        """Deadlines, ageing, the reconciliation feed, the scheduled chain verification."""
        with self._lock:
            try:
                pos = self._load(platform)
                state = pos.state
                now = max(self.clock_ms() if now_ms is None else now_ms, state.last_ts)
                out = Output()
                self.rules.tick(state, now, self.feed, platform, out)
                interval = self.ruleset.integrity.verify_interval_ms
                if "W17" in self.ruleset.enabled and now >= state.last_verify_ms + interval:
                    state.last_verify_ms = now
                    _count, bad, reason = self.verify_chain(platform)
                    if bad is not None:
                        self.rules.integrity_failure(state, bad, reason, out)
                self._commit(platform, pos, pos.position, pos.head, [], out)
                return len(out.findings)
            except BaseException:
                self._pos.pop(platform, None)
                raise

    # -- the outbox -----------------------------------------------------------------------------

    def drain(self, platform: str) -> int:
        """Give queued commands to the ledger; returns how many records they produced."""
        db, ph = self.db, self.db.ph
        with db.reading() as cur:
            rows = db.fetchall(
                cur,
                f"SELECT client_id, op, body FROM {db.t('risk_outbox')} WHERE platform = {ph} "
                "AND status = 'queued' ORDER BY position, n",
                (platform,),
            )
        written = 0
        done: list[tuple[str, str, str]] = []  # (status, result, client_id)
        alerts = [(cid, body) for cid, op, body in rows if op == "raise_alert"]
        for start in range(0, len(alerts), SEND_CHUNK):
            chunk = alerts[start : start + SEND_CHUNK]
            cmds = [c.decode_command_json(body.encode()) for _, body in chunk]
            outcomes = self.service.execute(platform, cmds, self.actor)
            for (cid, _), o in zip(chunk, outcomes, strict=True):
                done.append((*_outbox_status(o), cid))
                written += o.status == "accepted"
        for cid, op, body in rows:
            if op != "set_gate":
                continue
            cmd = c.decode_command_json(body.encode())
            assert isinstance(cmd, c.SetGate)
            with self.service.reading(platform) as live:
                tighter = GATE_ORDER.index(cmd.gate) > GATE_ORDER.index(live.gate)
                allowed = bool(live.policy.auto_restrict)
            if not (tighter and allowed):
                why = "gate already at or beyond" if not tighter else "auto_restrict is off"
                done.append(("skipped", f"{why} {cmd.gate}", cid))
                continue
            [o] = self.service.execute(platform, [cmd], self.actor)
            done.append((*_outbox_status(o), cid))
            written += o.status == "accepted"
        if done:
            with db.tx() as cur:
                cur.executemany(
                    f"UPDATE {db.t('risk_outbox')} SET status = {ph}, result = {ph} "
                    f"WHERE platform = {ph} AND client_id = {ph}",
                    [(status, result, platform, cid) for status, result, cid in done],
                )
        return written

    # -- loops ----------------------------------------------------------------------------------

    def catch_up(
        self,
        platform: str | None = None,
        stop: threading.Event | None = None,
        now_ms: int | None = None,
    ) -> dict[str, int]:
        """Evaluate every platform (or one) up to its log head, tick, and send the outbox, until
        the engine's own records (alerts, gate changes) have been read back too. Returns the
        number of records read per platform."""
        done: dict[str, int] = {}
        for pid in [platform] if platform is not None else self.service.platform_ids():
            if not self.service.is_writer(pid):
                continue  # several servers: only the one that writes a platform raises its alerts
            done[pid] = 0
            for _round in range(10):  # alerts -> gate -> gate_set read back: a few rounds
                if stop is not None and stop.is_set():
                    break
                while True:
                    try:
                        n = self.run_once(pid)
                    except PositionConflict:
                        log.info("risk position of %s moved under us; reloading", pid)
                        continue
                    done[pid] += n
                    if n < self.batch_size:
                        break
                self.tick(pid, now_ms)
                if not self.drain(pid):
                    break
        return done

    def follow(
        self, stop: threading.Event, platform: str | None = None, poll_s: float = 1.0
    ) -> None:
        """Catch up, then keep up, until `stop` is set. Failures are logged and retried."""
        while not stop.is_set():
            try:
                moved = sum(self.catch_up(platform, stop=stop).values())
            except Exception:
                log.exception("early-warning step failed; retrying")
                moved = 0
                stop.wait(min(10.0, poll_s * 5))
            if not moved:
                stop.wait(poll_s)

    def status(self, platform: str) -> dict[str, Any]:
        pos = self._load(platform)
        last = self.store.last_row(log_stream(platform))
        head = -1 if last is None else last[0]
        return {
            "platform": platform,
            "position": pos.position,
            "log_position": head,
            "lag": head - pos.position,
        }

    def rebuild(self, platform: str) -> dict[str, int]:
        """Forget this platform's rule state and read model (not the outbox's history) and
        evaluate the log again; alerts already in the log are not raised again (their ids are
        read back from it)."""
        self.reset(platform)
        return self.catch_up(platform)

    def reset(self, platform: str) -> None:
        """Forget this platform's rule state and read model (not the outbox's history); the
        next step evaluates the log from its first record."""
        with self._lock, self.db.tx() as cur:
            self._reset(cur, platform)
            self._pos.pop(platform, None)

    def dump(self, platform: str) -> list[bytes]:
        """The read model's rows, canonical and in key order (rebuilds compare these)."""
        db = self.db
        lines: list[bytes] = []
        with db.reading() as cur:
            for table, key in rs.READ_MODEL:
                for row in db.fetchall(
                    cur,
                    f"SELECT * FROM {db.t(table)} WHERE platform = {db.ph} "
                    f"ORDER BY {', '.join(key)}",
                    (platform,),
                ):
                    lines.append(table.encode() + b" " + msgspec.json.encode(list(row)))
        return lines


def alert_command(f: Finding) -> c.RaiseAlert:
    return c.RaiseAlert(
        client_id=f"risk:{f.alert_id}",
        alert_id=f.alert_id,
        rule=f.rule,
        level=f.level,
        subject=f.subject,
        summary=f.summary,
    )


def _outbox_status(o: Any) -> tuple[str, str]:
    if o.status in ("accepted", "replayed"):
        return "sent", f"{o.status} at {o.seq}"
    if o.status == "refused" and o.code == Code.ALERT_EXISTS:
        return "sent", "already in the log"
    return "failed", f"{o.status} {o.code} {o.message}"[:256]


class EmbeddedRisk:
    """The engine's follow loop on a daemon thread (for `custody serve`; stop with `close`)."""

    def __init__(self, engine: RiskEngine, poll_s: float = 1.0) -> None:
        self.engine = engine
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=engine.follow,
            args=(self.stop,),
            kwargs={"poll_s": poll_s},
            name="early-warning",
            daemon=True,
        )

    def start(self) -> EmbeddedRisk:
        self.thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        self.stop.set()
        self.thread.join(timeout_s)
