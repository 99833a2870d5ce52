"""Benchmark: what the pre-commit controls cost on durable, chained, batched transfers.

The workload and the checks are those of `bench/transfers.py` (1,000 customer accounts seeded
with 1,000,000 minor units, then random transfers of 1..1000 between distinct accounts, batches
of 1,000 through `LedgerService.execute()`, each batch one durable transaction). In ONE process
and in the same run, each repeat measures these configurations (their order rotates from one
repeat to the next so that no configuration is always first):

  off          No control runs: `controls.registry.checks_for` and `annotators_for` are replaced
               by functions that return nothing (in this process only, for this run only). The
               platform's policy is the strict default, and the transfers carry no customer
               authorisation: they are all accepted, which shows that no control ran.
  bookkeeping  Every control runs under the bookkeeping policy of the tests
               (`tests.helpers.BOOKKEEPING_POLICY`: integrity, funds, account state, roles,
               segregation, gate, screening; no customer signature, no limits, no maker-checker).
  standing     Every control runs under the strict default policy (version 0). Each customer
               granted a standing authorisation (signed with its key, during the untimed setup)
               and every transfer names it: no per-instruction signature.
  signed       Every control runs under the strict default policy and every transfer carries a
               fresh Ed25519 signature by the debited customer's key over its authorisation
               payload, with its own nonce. Signing happens before the clock starts; the
               verification memo (`customer_authorisation._verified`) is emptied first, and
               every signature is distinct, so every transfer pays one real verification.
  off-auth     (optional, --configs) as `off`, but with the `standing` commands: separates the
               cost of carrying an authorisation in the record from the cost of the checks.

Ratios are taken per repeat (same moment, same load) and their median is reported: the target
of issue 3 is standing/off >= 0.70 (all controls cost at most 30 %). The signature cost is
signed - standing, in µs per transfer (wall and CPU).

--retry also measures what re-deciding a batch costs when its signatures are in the
verification memo: a batch of signed transfers whose commit fails (injected) is decided again
when the caller retries it; the retry is timed with the memo warm (as it is) and, for another
batch, with the memo emptied just before the retry. The difference is what the memo saves.

--micro prints the unit costs that the signature path is made of: Ed25519 verification, the
memoised `signature_valid` (miss and hit), and building the signed payload. --per-control times
each check (and the large-value annotator and the maker-checker question) alone on 5,000
standing-path proposals against a live state of 20,000 transfers.

Every run uses a fresh database and is verified afterwards (see bench/transfers.py); it also
checks the records: policy version 0 on every transfer, the authorisation it carried, and, with
the controls back on, that the strict policy refuses an unsigned debit, a signature that does
not match its instruction and a replayed nonce.

Examples:
  python bench/controls.py                                   # SQLite, the four configurations
  python bench/controls.py --store both --repeat 3 --retry --micro
  python bench/controls.py --configs standing --repeat 1 --no-reload     # to profile one path
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import os
import platform as pyplatform
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
# This script is named like the `controls` package: take its own folder off the path so that
# `import controls` finds the package, and load the transfer benchmark by its file name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _load_transfers() -> Any:
    spec = importlib.util.spec_from_file_location("transfers", BENCH / "transfers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["transfers"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


tb = _load_transfers()

import msgspec  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: E402
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402

import controls.customer_authorisation as ca  # noqa: E402
import controls.registry as registry  # noqa: E402
from controls.policy import DAY_MS, DEFAULT_POLICY, Policy  # noqa: E402
from ledger import commands as c  # noqa: E402
from ledger import records  # noqa: E402
from ledger.service import LedgerService  # noqa: E402
from ledger.store import log_stream  # noqa: E402
from ledger.writer import CommitFailed  # noqa: E402
from tests.helpers import BOOKKEEPING_POLICY  # noqa: E402

PLATFORM = tb.PLATFORM
ACTOR = tb.ACTOR  # platform:bench
OPERATOR = "operator:bench"
CONFIGS = ("off", "bookkeeping", "standing", "signed", "off-auth")
DEFAULT_CONFIGS = ("off", "bookkeeping", "standing", "signed")
# what each configuration runs: (policy, controls on, transfer authorisation)
SETUP: dict[str, tuple[Policy, bool, str]] = {
    "off": (DEFAULT_POLICY, False, "none"),
    "bookkeeping": (BOOKKEEPING_POLICY, True, "none"),
    "standing": (DEFAULT_POLICY, True, "standing"),
    "signed": (DEFAULT_POLICY, True, "signed"),
    "off-auth": (DEFAULT_POLICY, False, "standing"),
}
check = tb.check


# -- customer keys and signatures ---------------------------------------------------------------


class Keys:
    """One Ed25519 key per customer account (deterministic from the account index)."""

    def __init__(self, accounts: int) -> None:
        self.private = [Ed25519PrivateKey.from_private_bytes(_seed(i)) for i in range(accounts)]
        self.public = [
            ca.b64url_encode(k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
            for k in self.private
        ]

    def sign(self, i: int, cmd: Any) -> Any:
        """`cmd` with its auth's signature filled in: account i signs the authorisation payload
        exactly as the writer rebuilds it (controls.customer_authorisation.payload)."""
        message = ca.payload(PLATFORM, msgspec.to_builtins(cmd))
        signature = ca.b64url_encode(self.private[i].sign(message))
        return msgspec.structs.replace(
            cmd, auth=msgspec.structs.replace(cmd.auth, signature=signature)
        )


def _seed(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- setup and workload -------------------------------------------------------------------------


def seed_platform(
    svc: LedgerService, accounts: int, policy: Policy, keys: Keys, grants: bool
) -> int:
    """Platform, omnibus, keyed customer accounts, deposits (and standing grants); returns the
    number of records written."""
    out = svc.create_platform(PLATFORM, "Benchmark platform", OPERATOR, policy)
    check(out.status == "accepted", f"create_platform: {out}")
    setup: list[c.Command] = [
        c.OpenAccount(client_id="open-omni", account_id=tb.OMNIBUS, kind="omnibus", currency=tb.CCY)
    ]
    for i in range(accounts):
        setup.append(
            c.OpenAccount(
                client_id=f"open-{i}",
                account_id=tb.account_id(i),
                kind="customer",
                currency=tb.CCY,
                role="lender",
                public_key=keys.public[i],
            )
        )
    for i in range(accounts):
        setup.append(
            c.Deposit(
                client_id=f"seed-{i}",
                mirror_account_id=tb.OMNIBUS,
                account_id=tb.account_id(i),
                amount_minor=tb.SEED_MINOR,
                currency=tb.CCY,
            )
        )
    if grants:
        t = now_ms()
        for i in range(accounts):
            grant = c.GrantStanding(
                client_id=f"grant-{i}",
                account_id=tb.account_id(i),
                standing_id=f"st{i}",
                purpose="transfer",
                per_txn_max_minor=1000,
                valid_until_ms=t + 30 * DAY_MS,
                auth=c.Authorisation(nonce=f"grant-{i:06d}", expires_at_ms=t + 120_000),
            )
            setup.append(keys.sign(i, grant))
    for start in range(0, len(setup), tb.SEED_BATCH):
        for o in svc.execute(PLATFORM, setup[start : start + tb.SEED_BATCH], ACTOR):
            check(o.status == "accepted", f"seeding: {o}")
    return 1 + len(setup)


def transfer_cmds(
    work: list[tuple[int, int, int]], prefix: str, auth: str, keys: Keys
) -> list[c.Transfer]:
    """The transfers of the workload; `signed` ones are signed here, before any clock starts."""
    base: list[c.Transfer] = tb.transfer_cmds(work, prefix)
    if auth == "none":
        return base
    if auth == "standing":
        return [
            msgspec.structs.replace(cmd, auth=c.Authorisation(standing_id=f"st{a}"))
            for cmd, (a, _, _) in zip(base, work, strict=True)
        ]
    # expiry within the policy's 5-minute ttl of the moment the transfer is decided
    expires = now_ms() + DEFAULT_POLICY.auth_ttl_ms - 60_000
    return [
        keys.sign(
            a,
            msgspec.structs.replace(
                cmd, auth=c.Authorisation(nonce=f"{prefix}-n{i:07d}", expires_at_ms=expires)
            ),
        )
        for i, (cmd, (a, _, _)) in enumerate(zip(base, work, strict=True))
    ]


@contextmanager
def controls_switched_off() -> Iterator[None]:
    """No control runs (benchmark only): the registry finds no check and no annotator."""
    checks_for, annotators_for = registry.checks_for, registry.annotators_for
    registry.checks_for = lambda op: ()  # type: ignore[assignment]
    registry.annotators_for = lambda op: ()  # type: ignore[assignment]
    try:
        yield
    finally:
        registry.checks_for, registry.annotators_for = checks_for, annotators_for


# -- one measured run ---------------------------------------------------------------------------


def last_record(svc: LedgerService) -> dict[str, Any]:
    row = svc.store.last_row(log_stream(PLATFORM))
    assert row is not None
    return records.decode(records.unpack_state(row[2])[1])


def run_config(
    name: str,
    store: str,
    accounts: int,
    work: list[tuple[int, int, int]],
    batch: int,
    keys: Keys,
    reload: bool,
    tag: str,
) -> Any:
    policy, controls_on, auth = SETUP[name]
    with tb.fresh_config(store) as cfg:
        svc = LedgerService(cfg)
        svc.start()
        try:
            setup_records = seed_platform(svc, accounts, policy, keys, grants=auth == "standing")
            cmds = transfer_cmds(work, f"{tag}", auth, keys)
            ca._verified.clear()  # no signature of this run is known beforehand
            outcomes: list[Any] = []
            with controls_switched_off() if not controls_on else _nothing():
                gc.collect()
                c0, t0 = time.process_time(), time.perf_counter()
                for start in range(0, len(cmds), batch):
                    outcomes += svc.execute(PLATFORM, cmds[start : start + batch], ACTOR)
                seconds = time.perf_counter() - t0
                cpu = time.process_time() - c0
            extra = verify(svc, cfg, accounts, work, outcomes, setup_records, auth, policy)
            if reload:
                extra.update(reload_check(svc, cfg))
            extra["cpu_us"] = round(1e6 * cpu / len(work), 2)
            extra.update(refusal_checks(svc, keys, auth, policy))
            if store == "sqlite":
                extra["sqlite"] = tb.sqlite_synchronous(svc)
        finally:
            svc.close()
    accepted = sum(o.status == "accepted" for o in outcomes)
    return tb.Result(name, len(work), seconds, accepted, len(outcomes) - accepted, extra)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def verify(
    svc: LedgerService,
    cfg: Any,
    accounts: int,
    work: list[tuple[int, int, int]],
    outcomes: list[Any],
    setup_records: int,
    auth: str,
    policy: Policy,
) -> dict[str, Any]:
    check(len(outcomes) == len(work), "one outcome per transfer")
    bad = [o for o in outcomes if o.status != "accepted"]
    check(not bad, f"every transfer is accepted with this seeding: {bad[:3]}")
    shadow = tb.Shadow(accounts)
    for (a, b, amt), o in zip(work, outcomes, strict=True):
        shadow.apply(a, b, amt, o.status == "accepted")
    bal, next_seq, totals = tb.ledger_balances(svc)
    for ccy, (debits, credits) in totals.items():
        check(debits == credits, f"{ccy}: posted debits {debits} != credits {credits}")
    for i in range(accounts):
        got = bal[tb.account_id(i)]
        check(got == shadow.balance[i], f"{tb.account_id(i)}: {got} != {shadow.balance[i]}")
    check(bal[tb.OMNIBUS] == accounts * tb.SEED_MINOR, "omnibus mirror != customer money")
    expected = setup_records + len(work)
    check(next_seq == expected, f"state position {next_seq} != {expected}")
    stored = tb.stored_count(cfg)
    check(stored == expected, f"stored records {stored} != {expected}")
    rec = last_record(svc)
    check(rec["kind"] == "transferred", f"last record is {rec['kind']}")
    check(rec["pv"] == policy.version, f"record names policy version {rec['pv']}")
    carried = rec["cmd"].get("auth", {})
    want = {
        "none": set(),
        "standing": {"standing_id"},
        "signed": {"nonce", "expires_at_ms", "signature"},
    }
    check(set(carried) == want[auth], f"record carries auth {carried}")
    return {"records": stored}


def reload_check(svc: LedgerService, cfg: Any) -> dict[str, Any]:
    bal, next_seq, _ = tb.ledger_balances(svc)
    t0 = time.perf_counter()
    svc2 = LedgerService(cfg)
    try:
        svc2.start()
        reload_s = round(time.perf_counter() - t0, 3)
        bal2, next2, _ = tb.ledger_balances(svc2)
    finally:
        svc2.close()
    check(next2 == next_seq and bal2 == bal, "reloaded state differs from live state")
    return {"reload_s": reload_s}


def refusal_checks(svc: LedgerService, keys: Keys, auth: str, policy: Policy) -> dict[str, Any]:
    """With the controls on again: the strict policy refuses what it must (not timed)."""
    if policy.require_customer_signature != 1:
        return {}
    unsigned = c.Transfer(
        client_id="x-unsigned",
        from_account_id=tb.account_id(0),
        to_account_id=tb.account_id(1),
        amount_minor=5,
        currency=tb.CCY,
    )
    expires = now_ms() + 60_000
    good = keys.sign(
        0,
        msgspec.structs.replace(
            unsigned,
            client_id="x-good",
            auth=c.Authorisation(nonce="x-nonce-0001", expires_at_ms=expires),
        ),
    )
    # the signature of a 5-unit transfer on a 500-unit one
    tampered = msgspec.structs.replace(good, client_id="x-tampered", amount_minor=500)
    replayed = msgspec.structs.replace(good, client_id="x-replayed")  # same nonce, new id
    got = [o.code or o.status for o in svc.execute(PLATFORM, [unsigned, tampered], ACTOR)]
    got += [o.code or o.status for o in svc.execute(PLATFORM, [good], ACTOR)]
    got += [o.code or o.status for o in svc.execute(PLATFORM, [replayed], ACTOR)]
    want = ["AUTHORISATION_REQUIRED", "AUTHORISATION_INVALID", "accepted", "REPLAYED"]
    check(got == want, f"strict policy answers {got}, expected {want}")
    return {"strict_refusals": "ok"}


# -- retries and the verification memo ---------------------------------------------------------


def run_retry(
    store: str, accounts: int, batch: int, pairs: int, keys: Keys, seed: int
) -> dict[str, Any]:
    """Batches whose commit fails once are retried: timed with the memo warm and cold."""
    warm: list[float] = []
    cold: list[float] = []
    with tb.fresh_config(store) as cfg:
        svc = LedgerService(cfg)
        svc.start()
        try:
            seed_platform(svc, accounts, DEFAULT_POLICY, keys, grants=False)
            append = svc.store.append
            for k in range(2 * pairs):
                work = tb.make_workload(batch, accounts, seed + 100 + k)
                cmds = transfer_cmds(work, f"r{k}", "signed", keys)
                svc.store.append = _fails_once(append)  # type: ignore[method-assign]
                try:
                    svc.execute(PLATFORM, cmds, ACTOR)
                    check(False, "the injected commit failure did not surface")
                except CommitFailed:
                    pass
                svc.store.append = append  # type: ignore[method-assign]
                memo_warm = k % 2 == 0
                if not memo_warm:
                    ca._verified.clear()
                gc.collect()
                t0 = time.perf_counter()
                outcomes = svc.execute(PLATFORM, cmds, ACTOR)
                seconds = time.perf_counter() - t0
                check(all(o.status == "accepted" for o in outcomes), "retry not accepted")
                (warm if memo_warm else cold).append(1e6 * seconds / batch)
        finally:
            svc.close()
    w, cl = statistics.median(warm), statistics.median(cold)
    return {
        "store": store,
        "batch": batch,
        "pairs": pairs,
        "retry_us_per_transfer_memo_warm": round(w, 2),
        "retry_us_per_transfer_memo_cold": round(cl, 2),
        "memo_saves_us": round(cl - w, 2),
    }


def _fails_once(append: Callable[..., Any]) -> Callable[..., Any]:
    """The store's append, failing its first call as a lost database connection would."""
    failed = [False]

    def failing_append(*args: Any, **kwargs: Any) -> Any:
        if not failed[0]:
            failed[0] = True
            raise OSError("injected commit failure")
        return append(*args, **kwargs)

    return failing_append


# -- each control alone -------------------------------------------------------------------------


def per_control(accounts: int, transfers: int, keys: Keys, seed: int) -> dict[str, float]:
    """µs per transfer of each check (and the annotator and maker-checker question) on the
    `standing` path, timed alone on a live state with `transfers` transfers already in it."""
    from controls.maker_checker import needs_approval
    from controls.roles import role_of
    from ledger.decide import plan

    out: dict[str, float] = {}
    with tb.fresh_config("sqlite") as cfg:
        svc = LedgerService(cfg)
        svc.start()
        try:
            seed_platform(svc, accounts, DEFAULT_POLICY, keys, grants=True)
            work = tb.make_workload(transfers, accounts, seed)
            cmds = transfer_cmds(work, "pc", "standing", keys)
            for start in range(0, len(cmds), 1000):
                svc.execute(PLATFORM, cmds[start : start + 1000], ACTOR)
            state = svc._platforms[PLATFORM].writer.state  # the live state (benchmark only)
            probe = transfer_cmds(
                tb.make_workload(5000, accounts, seed + 7), "pp", "standing", keys
            )
            ts = now_ms()
            proposals = []
            for cmd in probe:
                proposal, _ = plan(state, cmd, ts)  # type: ignore[misc]
                proposal.actor, proposal.role, proposal.ts = ACTOR, role_of(ACTOR), ts
                proposals.append(proposal)
            policy = state.policy
            steps: list[tuple[str, Callable[..., Any]]] = list(registry.checks_for("transfer"))
            steps += [("large_value (annotate)", a) for a in registry.annotators_for("transfer")]
            steps.append(("maker_checker (needs_approval)", needs_approval))
            for name, fn in steps:
                best = float("inf")
                for _ in range(5):
                    t0 = time.perf_counter()
                    for proposal in proposals:
                        fn(state, proposal, policy)
                    best = min(best, time.perf_counter() - t0)
                out[name] = round(1e6 * best / len(proposals), 3)
            out["sum"] = round(sum(out.values()), 3)
        finally:
            svc.close()
    return out


# -- unit costs ---------------------------------------------------------------------------------


def micro(keys: Keys, n: int = 5000) -> dict[str, float]:
    """µs per call of the pieces of the signature path, in this process."""
    t = now_ms()
    cmds = [
        keys.sign(
            i % len(keys.private),
            c.Transfer(
                client_id=f"m{i}",
                from_account_id=tb.account_id(i % len(keys.private)),
                to_account_id=tb.account_id((i + 1) % len(keys.private)),
                amount_minor=100,
                currency=tb.CCY,
                auth=c.Authorisation(nonce=f"micro-{i:06d}", expires_at_ms=t + 60_000),
            ),
        )
        for i in range(n)
    ]
    pubs = [keys.public[i % len(keys.private)] for i in range(n)]
    messages = [ca.payload(PLATFORM, msgspec.to_builtins(cmd)) for cmd in cmds]
    sigs = [cmd.auth.signature for cmd in cmds]
    key_objs = [Ed25519PublicKey.from_public_bytes(ca.b64url_decode(p)) for p in pubs]
    raw_sigs = [ca.b64url_decode(s) for s in sigs]
    out: dict[str, float] = {}

    def timed(label: str, fn: Callable[[], None]) -> None:
        gc.collect()
        t0 = time.perf_counter()
        fn()
        out[label] = round(1e6 * (time.perf_counter() - t0) / n, 2)

    def verify_raw() -> None:
        for k, s, m in zip(key_objs, raw_sigs, messages, strict=True):
            k.verify(s, m)

    def load_key() -> None:
        for p in pubs:
            Ed25519PublicKey.from_public_bytes(ca.b64url_decode(p))

    def memo_miss() -> None:
        ca._verified.clear()
        for p, m, s in zip(pubs, messages, sigs, strict=True):
            assert ca.signature_valid(p, m, s)

    def memo_hit() -> None:
        for p, m, s in zip(pubs, messages, sigs, strict=True):
            assert ca.signature_valid(p, m, s)

    def build_payload() -> None:
        for cmd in cmds:
            ca.payload(PLATFORM, msgspec.to_builtins(cmd))

    timed("ed25519_verify", verify_raw)
    timed("key_decode_and_load", load_key)
    timed("signature_valid_miss", memo_miss)
    timed("signature_valid_hit", memo_hit)
    timed("payload_build", build_payload)
    ca._verified.clear()
    return out


# -- driver -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--transfers", type=int, default=100_000, help="transfers per run")
    p.add_argument("--accounts", type=int, default=1_000, help="customer accounts")
    p.add_argument("--batch", type=int, default=1_000, help="transfers per execute()")
    p.add_argument("--store", choices=("sqlite", "postgres", "both"), default="sqlite")
    p.add_argument("--repeat", type=int, default=1, help="runs of each; medians are reported")
    p.add_argument("--seed", type=int, default=42, help="RNG seed of the workload")
    p.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated, from {', '.join(CONFIGS)}",
    )
    p.add_argument("--no-reload", action="store_true", help="skip the reload check")
    p.add_argument("--retry", action="store_true", help="also measure retried batches (memo)")
    p.add_argument("--retry-pairs", type=int, default=5, help="warm/cold retry pairs")
    p.add_argument("--micro", action="store_true", help="also print the signature unit costs")
    p.add_argument(
        "--per-control", action="store_true", help="also time each control alone (standing path)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    args = p.parse_args(argv)
    args.configs = [x for x in args.configs.split(",") if x]
    unknown = [x for x in args.configs if x not in CONFIGS]
    if unknown or not args.configs:
        p.error(f"unknown configurations {unknown}; choose from {CONFIGS}")
    if args.accounts < 2 or args.transfers < 1 or args.batch < 1 or args.repeat < 1:
        p.error("need --accounts >= 2, --transfers >= 1, --batch >= 1, --repeat >= 1")
    if args.batch > c.MAX_BATCH_COMMANDS:
        p.error(f"--batch is at most {c.MAX_BATCH_COMMANDS}")
    return args


RATIOS = (("standing", "off"), ("bookkeeping", "off"), ("signed", "off"), ("off-auth", "off"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    say: Callable[[str], None] = (lambda s: None) if args.json else print
    say(
        f"{dt.datetime.now().isoformat(timespec='seconds')}  cpus={os.cpu_count()}  "
        f"python {pyplatform.python_version()}  sqlite {sqlite3.sqlite_version}  "
        f"code {tb.code_version()}"
    )
    say(
        f"accounts={args.accounts} transfers={args.transfers} batch={args.batch} "
        f"repeat={args.repeat} seed={args.seed} configs={','.join(args.configs)}"
    )
    keys = Keys(args.accounts)
    work = tb.make_workload(args.transfers, args.accounts, args.seed)
    runs: dict[str, list[Any]] = {}
    doc: dict[str, Any] = {}
    try:
        for rep in range(args.repeat):
            turn = rep % len(args.configs)
            order = args.configs[turn:] + args.configs[:turn]
            for store in stores:
                for name in order:
                    before = tb.contention()
                    r = run_config(
                        name,
                        store,
                        args.accounts,
                        work,
                        args.batch,
                        keys,
                        not args.no_reload,
                        f"t{rep}",
                    )
                    r.extra["contention"] = f"{before} -> {tb.contention()}"
                    runs.setdefault(f"{name}-{store}", []).append(r)
                    extra = " ".join(f"{k}={v}" for k, v in r.extra.items())
                    say(
                        f"  run {rep + 1}/{args.repeat} {name + '-' + store:20s} "
                        f"{r.tps:>9,.0f} transfers/s  ({r.seconds:.2f} s) {extra}"
                    )
        if args.retry:
            doc["retry"] = [
                run_retry(s, args.accounts, args.batch, args.retry_pairs, keys, args.seed)
                for s in stores
            ]
            for entry in doc["retry"]:
                say(f"  retry {json.dumps(entry)}")
    except tb.VerificationFailed as exc:
        print(f"VERIFICATION FAILED: {exc}", file=sys.stderr)
        return 2
    if args.micro:
        doc["micro_us"] = micro(keys)
    if args.per_control:
        doc["per_control_us"] = per_control(args.accounts, 20_000, keys, args.seed)

    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        summary[name] = {
            "median_tps": round(statistics.median(r.tps for r in rs)),
            "runs_tps": [round(r.tps) for r in rs],
            "cpu_us": statistics.median(r.extra["cpu_us"] for r in rs),
            "wall_us": round(statistics.median(1e6 / r.tps for r in rs), 2),
        }
    ratios: dict[str, float] = {}
    costs: dict[str, dict[str, float]] = {}
    for store in stores:
        for a, b in RATIOS:
            ra, rb = runs.get(f"{a}-{store}", []), runs.get(f"{b}-{store}", [])
            if ra and rb:
                ratios[f"{a}/{b}-{store}"] = round(
                    statistics.median(x.tps / y.tps for x, y in zip(ra, rb, strict=True)), 3
                )
        rs, rt = runs.get(f"signed-{store}", []), runs.get(f"standing-{store}", [])
        if rs and rt:
            costs[f"signature-{store}"] = {
                "wall_us": round(
                    statistics.median(
                        1e6 / x.tps - 1e6 / y.tps for x, y in zip(rs, rt, strict=True)
                    ),
                    2,
                ),
                "cpu_us": round(
                    statistics.median(
                        x.extra["cpu_us"] - y.extra["cpu_us"] for x, y in zip(rs, rt, strict=True)
                    ),
                    2,
                ),
            }
    if args.json:
        doc.update(
            {
                "benchmark": "controls",
                "date": dt.datetime.now().isoformat(timespec="seconds"),
                "machine": tb.machine(),
                "code": tb.code_version(),
                "params": {k: v for k, v in vars(args).items() if k != "json"},
                "summary": summary,
                "ratios": ratios,
                "signature_cost": costs,
                "runs": {
                    k: [asdict(r) | {"tps": round(r.tps)} for r in v] for k, v in runs.items()
                },
            }
        )
        print(json.dumps(doc, indent=2))
        return 0
    print("median:")
    for name, entry in summary.items():
        print(
            f"  {name:20s} {entry['median_tps']:>9,} transfers/s  wall {entry['wall_us']:6.2f} µs"
            f"  cpu {entry['cpu_us']:6.2f} µs  runs {entry['runs_tps']}"
        )
    for label, ratio in ratios.items():
        verdict = ""
        if label.startswith("standing/off"):
            verdict = "  (meets target 0.70)" if ratio >= 0.70 else "  (BELOW target 0.70)"
        print(f"  ratio {label} = {ratio:.3f}{verdict}")
    for label, cost in costs.items():
        print(f"  {label}: {cost['wall_us']:.2f} µs wall, {cost['cpu_us']:.2f} µs cpu per transfer")
    if "micro_us" in doc:
        print("  unit costs (µs): " + json.dumps(doc["micro_us"]))
    if "per_control_us" in doc:
        print("  each control alone, standing path (µs per transfer, best of 5):")
        for name, us in doc["per_control_us"].items():
            print(f"    {name:32s} {us:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
