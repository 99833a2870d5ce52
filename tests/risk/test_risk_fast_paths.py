"""The engine's fast paths give exactly what the reference paths give.

- `Rules(fast=True)` (single-leg movements through `Rules._move`) raises the same findings in
  the same order, leaves the same stored state and the same indicator figures as
  `Rules(fast=False)` (every record through `_body` / `_legs`), on random workloads with tight
  thresholds so that every movement rule fires many times.
- `RiskEngine.verify_chain` (W17's scheduled check, reading the event table directly) reports
  what the ledger's `verify_stored_chain` reports: an intact log, a changed byte, a deleted row,
  and a record rewritten with its chain recomputed (fields differ from where it is stored).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import msgspec
import pytest
from helpers import CHECKER, OPERATOR, FakeClock, Platform, deposit, ok, run1, transfer
from risk_helpers import DAY, HOUR, engine

from ledger import commands as c
from ledger import records
from ledger.service import LedgerService
from ledger.store import log_stream
from ledger.writer import verify_stored_chain
from risk import store as rs
from risk.engine import RiskEngine
from risk.rules import REC_DECODER, Output, Rules, changes, encode_state, new_state
from risk.ruleset import DEFAULT_RULES, RULES, RuleSet, decode_rules, encode_rules
from risk.store import open_db

_ENCODE = msgspec.json.Encoder(order="sorted").encode
_DECODE = msgspec.json.Decoder().decode
LVT = 1_000_000


def _tight() -> RuleSet:
    """All rules on, thresholds small enough that W07-W10 fire often on a few accounts."""
    doc = msgspec.json.decode(encode_rules(DEFAULT_RULES))
    doc["enabled"] = sorted(RULES)
    doc["fan"].update(min_distinct=3, max_other=2, window_ms=6 * HOUR)
    doc["rapid"].update(min_inflow_minor=500_000, window_ms=3 * HOUR, repeat_count=2)
    doc["dormant"].update(dormant_ms=2 * DAY, window_ms=DAY, min_amount_minor=300_000, min_count=3)
    doc["structuring"].update(near_window_ms=DAY, near_count=2)
    return decode_rules(msgspec.json.encode(doc))


def _workload(seed: int, n: int) -> list[bytes]:
    """Records as the ledger writes them (the fields the rules read), seeded."""
    rnd = random.Random(seed)
    ts = 1_700_000_000_000
    recs: list[dict[str, Any]] = []

    def add(kind: str, **fields: Any) -> None:
        recs.append({"seq": len(recs), "kind": kind, "platform": "p", "ts": ts, **fields})

    lvt = {"CNY": {"individual_minor": LVT, "corporate_minor": 3 * LVT}}
    add("platform_created", policy={"day_offset_ms": 8 * HOUR, "auto_restrict": 0, "lvt": lvt})
    add("account_opened", account={"id": "omni", "kind": "omnibus", "ccy": "CNY"}, cmd={})
    names = [f"c{i}" for i in range(rnd.randrange(4, 12))]
    for name in names:
        holder = "corporate" if rnd.random() < 0.2 else "individual"
        add(
            "account_opened",
            account={"id": name, "kind": "customer", "ccy": "CNY"},
            cmd={"holder_type": holder},
        )
    for i in range(n):
        x = rnd.random()
        ts += rnd.choice((0, 1, 1_000, 60_000, 20 * 60_000, HOUR, 5 * HOUR))
        if rnd.random() < 0.003:
            ts += 3 * DAY  # a quiet spell: accounts fall dormant (W10)
        a, b = rnd.sample(names, 2)
        if x < 0.03:  # the boundaries of W07's band and split test
            amount = rnd.choice((LVT * 9 // 10 - 1, LVT * 9 // 10, LVT * 9999 // 10_000, LVT // 3))
        elif x < 0.05:  # W08 at exactly its share: in, then exactly 80 % out
            add("transferred", ccy="CNY", cmd={}, entries=[[b, a, 1_000_000]])
            amount = 800_000
        elif x < 0.15:
            amount = rnd.randrange(LVT * 9 // 10, LVT)  # near the threshold (W07)
        elif x < 0.3:
            amount = rnd.randrange(300_000, 2_000_000)  # large (W08, W10)
        else:
            amount = rnd.randrange(1, 400_000)  # split under the threshold (W07)
        y = rnd.random()
        if y < 0.1:
            add("deposited", ccy="CNY", cmd={}, entries=[["omni", a, amount]])
        elif y < 0.15:
            add("withdrawn", ccy="CNY", cmd={}, entries=[[a, "omni", amount]])
        elif y < 0.18:
            fee = [b, names[0], 1] if b != names[0] else [b, "omni", 1]
            add("transferred", ccy="CNY", cmd={}, entries=[[a, b, amount], fee])
        elif y < 0.2:
            add("transferred", ccy="CNY", cmd={}, entries=[[a, "nobody", amount]])
        else:
            purpose = "bid" if rnd.random() < 0.1 else "transfer"
            cmd = {"purpose": purpose, "client_id": f"t{i}", "op": "transfer"}
            tags = []
            if rnd.random() < 0.05:
                tags = [{"account": b, "side": "in", "due_ms": ts + DAY, "day_total_minor": 1}]
            add("transferred", ccy="CNY", cmd=cmd, entries=[[a, b, amount]], tags=tags)
    return [_ENCODE(r) for r in recs]


def _run(rules: Rules, data: list[bytes]) -> tuple[Any, ...]:
    state, out = new_state(), Output()
    for d in data:
        rec = REC_DECODER.decode(d)
        if Rules.general(rec):
            rules.apply(state, _DECODE(d), out)
        else:
            rules.apply_rec(state, rec, out)
    return out.findings, changes(state), encode_state(state), out.counters, out.gauges


@pytest.mark.parametrize("seed", range(12))
def test_fast_path_raises_exactly_what_the_reference_raises(seed: int) -> None:
    data = _workload(seed, 3_000)
    for ruleset in (_tight(), DEFAULT_RULES):
        fast, ref = _run(Rules(ruleset), data), _run(Rules(ruleset, fast=False), data)
        assert fast[0] == ref[0]  # findings (ids, levels, subjects, windows, summaries), in order
        assert fast[1:] == ref[1:]  # stored rows, platform part, indicator figures


def test_the_workload_makes_every_movement_rule_fire() -> None:
    """The comparison above is only worth something if the rules fire: they do, many times."""
    fired: dict[str, int] = {}
    for seed in range(12):
        for f in _run(Rules(_tight()), _workload(seed, 3_000))[0]:
            fired[f.rule] = fired.get(f.rule, 0) + 1
    for rule in ("W06", "W07", "W08", "W09", "W10"):
        assert fired.get(rule, 0) >= 10, fired


# -- the scheduled chain verification ---------------------------------------------------------


def _events(service: LedgerService) -> tuple[Any, str]:
    db = open_db(service.store)
    table = service.store.recorder.events_table_name  # type: ignore[attr-defined]
    return db, f'"{db.schema}".{table}' if db.schema else table


def _rewrite(service: LedgerService, seq: int, data: bytes | None) -> None:
    """Replace the record at `seq` with `data`, recomputing the chain after it so that only the
    record's own fields are wrong; or, with None, delete the row."""
    rows = list(service.store.iter_rows(log_stream("p1")))
    db, name = _events(service)
    ph = db.ph
    with db.tx() as cur:
        if data is None:
            cur.execute(
                f"DELETE FROM {name} WHERE originator_id = {ph} AND originator_version = {ph}",
                (log_stream("p1"), seq),
            )
            return
        head = rows[seq - 1][2][: records.HASH_LEN] if seq else records.CHAIN_GENESIS
        for pos, _kind, packed in rows[seq:]:
            body = data if pos == seq else packed[records.HASH_LEN :]
            head = hashlib.sha256(head + body).digest()
            cur.execute(
                f"UPDATE {name} SET state = {ph} WHERE originator_id = {ph} AND "
                f"originator_version = {ph}",
                (head + body, log_stream("p1"), pos),
            )


def _same_report(service: LedgerService, clock: FakeClock) -> tuple[int, int | None, str]:
    eng = engine(service, clock, {"W17"})
    report = eng.verify_chain("p1")
    assert report == verify_stored_chain(service.store, "p1")
    return report


def _log(service: LedgerService, p: Platform) -> None:
    ok(service, "p1", deposit(p, "d", "alice", 1_000))
    for i in range(5):
        ok(service, "p1", transfer(p, f"t{i}", "alice", "bob", 10))


def test_chain_verification_intact(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    _log(service, platform)
    count, bad, reason = _same_report(service, clock)
    assert (bad, reason) == (None, "ok")
    assert count == len(list(service.store.iter_rows(log_stream("p1"))))


def test_chain_verification_changed_byte(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    _log(service, platform)
    [row] = service.store.read(log_stream("p1"), after=4, limit=1)
    state = bytearray(row[2])
    state[-3] ^= 0x01
    db, name = _events(service)
    with db.tx() as cur:
        cur.execute(
            f"UPDATE {name} SET state = {db.ph} WHERE originator_id = {db.ph} AND "
            f"originator_version = {db.ph}",
            (bytes(state), log_stream("p1"), 5),
        )
    assert _same_report(service, clock)[1] == 5


def test_chain_verification_deleted_row(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    _log(service, platform)
    _rewrite(service, 4, None)
    assert _same_report(service, clock)[1:] == (4, "position 4 missing (next stored is 5)")


def test_chain_verification_last_row_deleted_is_not_a_gap(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    _log(service, platform)
    last = service.head("p1")[0]
    _rewrite(service, last, None)
    assert _same_report(service, clock)[1] is None


def test_chain_verification_record_fields_differ(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    _log(service, platform)
    [row] = service.store.read(log_stream("p1"), after=5, limit=1)
    rec = _DECODE(row[2][records.HASH_LEN :])
    rec["platform"] = "p2"
    _rewrite(service, 6, _ENCODE(rec))
    _count, bad, reason = _same_report(service, clock)
    assert bad == 6 and "differs" in reason


# -- the read model written in runs of statements -------------------------------------------


def test_alert_lifecycle_read_in_one_step_or_one_record_at_a_time_gives_the_same_rows(
    service: LedgerService, clock: FakeClock, platform: Platform
) -> None:
    """`apply_records` batches the alert statements: raised, acknowledged and closed records of
    one alert in the same step must give the rows that one step per record gives."""
    eng = engine(service, clock, {"W15"})
    ok(service, "p1", deposit(platform, "fund", "alice", 10_000))
    for i in range(3):
        o = run1(service, "p1", transfer(platform, f"s{i}", "alice", platform.own, 100))
        assert o.code == "SEGREGATION_BREACH", o
    eng.catch_up()
    ids = [a["alert_id"] for a in rs.alerts(eng.db, "p1")]
    assert len(ids) == 2
    for n, alert in enumerate(ids):
        for cmd, actor in (
            (c.AcknowledgeAlert(client_id=f"k{n}", alert_id=alert, note="seen"), OPERATOR),
            (c.CloseAlert(client_id=f"c{n}", alert_id=alert, reason="done"), CHECKER),
        ):
            [o] = service.execute("p1", [cmd], actor)
            assert o.status == "accepted", o
    eng.rebuild("p1")  # every alert record in one step
    whole = eng.dump("p1")
    one = RiskEngine(service, RuleSet(enabled=frozenset({"W15"})), clock_ms=clock, batch_size=1)
    one.rebuild("p1")  # one record per step
    assert one.dump("p1") == whole
    assert sum(b"closed" in line for line in whole) >= 2
