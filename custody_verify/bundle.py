"""Streaming verification of a `custody-bundle/v1` export (format: docs/BUNDLE.md).

One pass over the file, memory flat in the log size (only the live accounts, pending holds and
requests, live standing authorisations, the policy, the requirement at the last business-day
boundaries and the alert ids are kept; the alert ids grow by one entry per alert raised):

* every line has the expected syntax; record positions run 0, 1, 2, ... with no gap;
* every stored chain link equals SHA-256(previous link || record bytes) (genesis: 32 zero bytes);
* the RFC 6962 Merkle root of the records so far equals the root of every checkpoint, each
  checkpoint is signed by a trusted key, names the bundle's origin, and sits right after the
  record that closes it; the last checkpoint covers every record;
* replaying the records keeps the ledger invariants: every posting has a debit and a credit in
  one currency (double entry per currency), no customer / own-funds / fee-income / suspense
  account goes below zero available, a refusal changes nothing, holds are captured at most up to
  their amount, every record names the bundle's platform and its own position, time never runs
  backwards; roles, maker-checker, policy versions, reconciliations (a checker's sign-off of the
  operator's figures, which add up) and their settlements (a checker's approval, own funds <->
  platform bank in the direction of the difference, never beyond what is left of it), alerts
  (by level and role) and the automatic restriction of the gate (system, auto_restrict,
  tightening only) are replayed as docs/BUNDLE.md §2 says.

The first problem stops verification and is reported as a `Failure` naming where it is: the
record position, the checkpoint (by tree size), the header or the end line.
"""

from __future__ import annotations

import binascii
import gc
import hashlib
import itertools
import json
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, BinaryIO

from custody_verify.note import (
    Checkpoint,
    NoteError,
    Verifier,
    b64decode_strict,
    b64encode,
    open_checkpoint,
    parse_vkey,
)

FORMAT_LINE = b"custody-bundle/v1\n"
HEADER_KEYS = (b"platform", b"origin", b"vkey")
HEADER_LINES = 2 + len(HEADER_KEYS)  # format line, keys, begin
MAX_AMOUNT = 2**63 - 1
GENESIS = b"\x00" * 32
RECORD_VERSION = 1
PROGRESS_EVERY = 1 << 17
MAX_KINDS = 256  # distinct record kinds counted by name in the summary
MAX_LINE = 1 << 24  # a longer line is reported as malformed, never read whole into memory

ACCOUNT_KINDS = frozenset(
    {"customer", "omnibus", "own_funds", "fee_income", "suspense", "platform_bank"}
)
ASSET_KINDS = frozenset({"omnibus", "platform_bank"})
NON_NEGATIVE_KINDS = frozenset({"customer", "own_funds", "fee_income", "suspense"})
REFUSED = "command_refused"
REQUESTED = "approval_requested"
# Keys every record has; a kind adds exactly its effect keys (SHAPES below).
BASE_KEYS = frozenset({"v", "platform", "seq", "ts", "kind", "cid", "actor", "pv", "cmd"})
# Keys with a meaning to the replay: a kind this verifier does not know must carry none of them
# (it may exist, but it cannot move money, open accounts, change the policy or act on requests).
EFFECT_KEYS = frozenset(
    {
        "entries",
        "hold",
        "resolve",
        "account",
        "subject",
        "reverses",
        "executes",
        "policy",
        "gate",
        "key",
        "payee",
        "standing",
        "revokes",
        "request",
        "rejects",
        "liabilities",
        "reconciliation",
        "settles",
        "alert",
        "alert_acknowledged",
        "alert_closed",
    }
)
ENTRY_KINDS = frozenset(
    {"deposited", "transferred", "fee_charged", "shortfall_topped_up", "reversed"}
)
HOLD_KINDS = frozenset({"hold_placed", "withdrawal_requested"})
RESOLVE_KINDS = frozenset(
    {"hold_captured", "hold_released", "holds_expired", "withdrawal_settled", "withdrawal_failed"}
)
SUBJECT_KINDS = frozenset({"account_frozen", "account_unfrozen", "account_closed"})
HOLD_STATUSES = frozenset({"captured", "released", "expired"})


def _shape(required: set[str], optional: tuple[str, ...] = ()) -> tuple[frozenset[str], ...]:
    need = BASE_KEYS | required
    return need, need | frozenset(optional)


_EXEC = ("executes",)
_MOVED = ("tags", "executes")  # records that post money may carry large-value tags
# record kind -> (the keys it must have, the keys it may have)
SHAPES: dict[str, tuple[frozenset[str], ...]] = {
    "platform_created": _shape({"name", "policy"}),
    "account_opened": _shape({"account"}, _EXEC),
    **{kind: _shape({"subject"}, _EXEC) for kind in SUBJECT_KINDS},
    **{kind: _shape({"ccy", "entries"}, _MOVED) for kind in ENTRY_KINDS - {"reversed"}},
    "reversed": _shape({"ccy", "entries", "reverses"}, _MOVED),
    **{kind: _shape({"ccy", "hold"}, _EXEC) for kind in HOLD_KINDS},
    "hold_captured": _shape({"ccy", "resolve"}, _MOVED),
    "withdrawal_settled": _shape({"ccy", "resolve"}, _MOVED),
    **{kind: _shape({"resolve"}, _EXEC) for kind in {"hold_released", "holds_expired"}},
    "withdrawal_failed": _shape({"resolve"}, _EXEC),
    "key_registered": _shape({"key"}, _EXEC),
    "payee_bound": _shape({"payee"}, _EXEC),
    "standing_granted": _shape({"standing"}, _EXEC),
    "standing_revoked": _shape({"revokes"}, _EXEC),
    "policy_set": _shape({"policy"}, _EXEC),
    "gate_set": _shape({"gate"}, _EXEC),
    REQUESTED: _shape({"request"}),
    "approval_rejected": _shape({"rejects"}),
    "liabilities_published": _shape({"liabilities"}, _EXEC),
    # `executes` is required in effect: record_reconciliation always needs a checker, so the
    # maker-checker rule names a record without it (a clearer reason than a missing key)
    "reconciliation_completed": _shape({"reconciliation"}, _EXEC),
    # the same for settle_reconciliation; it never posts to a customer, so it carries no tags
    "reconciliation_settled": _shape({"ccy", "entries", "settles"}, _EXEC),
    "alert_raised": _shape({"alert"}),
    "alert_acknowledged": _shape({"alert_acknowledged"}),
    "alert_closed": _shape({"alert_closed"}),
    REFUSED: _shape({"code", "control", "message"}, ("linked_to", "suppressed", "auth_failed")),
}
# the keys of a large-value tag, in canonical (sorted) order
TAG_KEYS = ("account", "day_total_minor", "due_ms", "side", "tag")
TAG_SIDES = frozenset({"in", "out"})
GATES = frozenset({"NORMAL", "RESTRICTED", "WIND_DOWN", "FROZEN"})
# from open to shut: a `system` actor may only move the gate rightwards, without a checker,
# and only while the policy in force has auto_restrict = 1
GATE_RANK = {"NORMAL": 0, "RESTRICTED": 1, "WIND_DOWN": 2, "FROZEN": 3}
SYSTEM = "system"
# the daily reconciliation (docs/FORMAT.md §3.1): its keys in canonical order, its limits
RECONCILIATION_KEYS = (
    "as_of",
    "breaks",
    "ccy",
    "closing",
    "difference",
    "id",
    "requirement",
    "result",
    "snapshot",
    "statements",
    "transit",
)
MAX_STATEMENTS = 64
MAX_BREAKS = 10_000_000
MIN_INT64 = -(2**63)
_HEX = frozenset("0123456789abcdef")
REQUIREMENT_KINDS = frozenset({"customer", "suspense"})  # what customers are owed
MAX_DAY_MARKS = 400  # business-day boundaries whose requirement is remembered (see _mark_day)
DAY_MS = 86_400_000
# an early-warning alert: its keys in canonical order, its levels, and who may act on which
ALERT_KEYS = ("id", "level", "rule", "subject")
ALERT_LEVELS = frozenset({"GREEN", "YELLOW", "ORANGE", "RED"})
_LOW_ALERTS = frozenset({"GREEN", "YELLOW"})
ALERT_MAY: dict[tuple[str, str], frozenset[str]] = {  # (role, op) -> levels (controls/alerts.py)
    ("platform", "acknowledge_alert"): _LOW_ALERTS,
    ("platform", "close_alert"): _LOW_ALERTS,
    ("operator", "acknowledge_alert"): ALERT_LEVELS,
    ("operator", "close_alert"): _LOW_ALERTS,
    ("checker", "acknowledge_alert"): ALERT_LEVELS,
    ("checker", "close_alert"): ALERT_LEVELS,
}
CLOSED = ""  # the alert table's value for a closed alert (open ones hold their level)
# a proof-of-liabilities statement (custody-pol/v1): its keys in canonical order, its limits
LIABILITIES_KEYS = ("asset", "depth", "root", "snapshot", "total")
POL_MAX_DEPTH = 40

# The operation (`cmd.op`) that produces each kind (docs/FORMAT.md §3.3). An approval is
# recorded under the kind of the operation it executes, with the checker's `approve_request`.
KIND_OF_OP: dict[str, str] = {
    "create_platform": "platform_created",
    "open_account": "account_opened",
    "freeze_account": "account_frozen",
    "unfreeze_account": "account_unfrozen",
    "close_account": "account_closed",
    "deposit": "deposited",
    "transfer": "transferred",
    "charge_fee": "fee_charged",
    "top_up_shortfall": "shortfall_topped_up",
    "place_hold": "hold_placed",
    "capture_hold": "hold_captured",
    "release_hold": "hold_released",
    "expire_holds": "holds_expired",
    "request_withdrawal": "withdrawal_requested",
    "settle_withdrawal": "withdrawal_settled",
    "fail_withdrawal": "withdrawal_failed",
    "reverse": "reversed",
    "register_key": "key_registered",
    "reset_key": "key_registered",
    "bind_payee": "payee_bound",
    "grant_standing": "standing_granted",
    "revoke_standing": "standing_revoked",
    "set_policy": "policy_set",
    "set_gate": "gate_set",
    "reject_request": "approval_rejected",
    "publish_liabilities": "liabilities_published",
    "record_reconciliation": "reconciliation_completed",
    "settle_reconciliation": "reconciliation_settled",
    "raise_alert": "alert_raised",
    "acknowledge_alert": "alert_acknowledged",
    "close_alert": "alert_closed",
}
OPS_OF_KIND: dict[str, frozenset[str]] = {
    kind: frozenset(op for op, k in KIND_OF_OP.items() if k == kind)
    for kind in set(KIND_OF_OP.values())
}
# operations a maker may ask a checker for (anything but governance of the requests themselves
# and the alerts, which no policy can put under maker-checker)
REQUESTABLE_OPS = frozenset(KIND_OF_OP) - {
    "create_platform",
    "reject_request",
    "raise_alert",
    "acknowledge_alert",
    "close_alert",
}

# Who may start which operation: the verifier's own copy of the ledger's role matrix (BRIEF §7,
# docs/FORMAT.md §3.4). An actor is `<role>:<name>`.
_MOVEMENTS = frozenset(
    {
        "deposit",
        "transfer",
        "charge_fee",
        "top_up_shortfall",
        "place_hold",
        "capture_hold",
        "release_hold",
        "expire_holds",
        "request_withdrawal",
        "settle_withdrawal",
        "fail_withdrawal",
    }
)
ROLE_OPS: dict[str, frozenset[str]] = {
    "platform": _MOVEMENTS
    | {
        "open_account",
        "freeze_account",
        "close_account",
        "register_key",
        "bind_payee",
        "grant_standing",
        "revoke_standing",
        "acknowledge_alert",
        "close_alert",
    },
    "operator": frozenset(
        {
            "create_platform",
            "open_account",
            "freeze_account",
            "unfreeze_account",
            "close_account",
            "deposit",
            "transfer",  # suspense clearing only
            "top_up_shortfall",
            "expire_holds",
            "settle_withdrawal",
            "fail_withdrawal",
            "reverse",
            "set_policy",
            "set_gate",
            "reset_key",
            "publish_liabilities",
            "record_reconciliation",
            "settle_reconciliation",
            "raise_alert",
            "acknowledge_alert",
            "close_alert",
        }
    ),
    "checker": frozenset({"approve_request", "reject_request", "acknowledge_alert", "close_alert"}),
    "system": frozenset({"expire_holds", "raise_alert", "set_gate"}),
    "auditor": frozenset(),
    "regulator": frozenset(),
}
CHECKER = "checker"
MAX_ACTORS = 4096  # distinct actors whose role is remembered (memory stays bounded)
# Maker-checker: operations that always need a checker, whatever the policy says, and the
# movements whose amount is compared with the policy's approval threshold.
ALWAYS_APPROVED_OPS = frozenset(
    {"set_policy", "set_gate", "reset_key", "record_reconciliation", "settle_reconciliation"}
)
LARGE_VALUE_OPS = frozenset({"transfer", "place_hold", "request_withdrawal"})
AUTH_FAILED_CODE = "AUTHORISATION_INVALID"
AUTH_CONTROL = "customer_authorisation"

# account slots (_REQ: a customer or suspense account, counted in the requirement)
_KIND, _CCY, _NONNEG, _DP, _CP, _DH, _CH, _REQ = range(8)


@dataclass
class Failure:
    where: str  # header | record | checkpoint | end | bundle
    reason: str
    position: int | None = None  # record position (where == record / bundle)
    checkpoint: int | None = None  # tree size of the checkpoint (where == checkpoint / end)
    line: int | None = None  # 1-based line number in the bundle file

    def describe(self) -> str:
        if self.where == "record":
            at = f"record {self.position}"
        elif self.where == "checkpoint":
            at = f"checkpoint at size {self.checkpoint}"
        elif self.where == "header":
            at = "bundle header"
        elif self.where == "end":
            at = "end of bundle"
        else:
            at = "bundle"
        line = f" (line {self.line})" if self.line is not None else ""
        return f"{at}{line}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "position": self.position,
            "checkpoint": self.checkpoint,
            "line": self.line,
            "reason": self.reason,
            "message": self.describe(),
        }


class VerificationFailed(Exception):
    def __init__(self, failure: Failure, summary: Summary) -> None:
        super().__init__(failure.describe())
        self.failure = failure
        self.summary = summary


@dataclass
class Summary:
    platform: str = ""
    origin: str = ""
    vkey: str = ""
    records: int = 0
    refused: int = 0
    checkpoints: int = 0
    checkpoint_size: int | None = None
    checkpoint_root: str | None = None
    chain_head: str = ""
    accounts: int = 0
    pending_holds: int = 0
    pending_requests: int = 0  # maker-checker requests neither executed nor rejected
    standing: int = 0  # standing authorisations granted and not revoked
    policy_version: int = 0
    gate: str = "NORMAL"
    alerts: int = 0  # alerts raised
    open_alerts: int = 0  # ... and not closed
    reconciliations: int = 0  # reconciliation_completed records
    settlements: int = 0  # reconciliation_settled records
    unsettled: int = 0  # reconciliations with part of their difference still to settle
    # reconciliation requests whose requirement the replay recomputed (and found equal), and
    # those whose snapshot was neither their own position nor a remembered day boundary
    requirements_checked: int = 0
    requirements_unchecked: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    # currency -> account kind -> sum of posted balances in the kind's normal direction
    balances: dict[str, dict[str, int]] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # "full" (every check, docs/BUNDLE.md §2) or "integrity" (checks 1-6: no replay)
    level: str = "full"
    held_checkpoints: int = 0  # checkpoints the auditor holds, matched by the records' root

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["records_per_second"] = int(self.records / self.seconds) if self.seconds else None
        return out


class _Fail(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def held_differs(size: int) -> str:
    return (
        f"the records' Merkle root at size {size} is not the one in the checkpoint you hold: "
        "the log was rewritten after that checkpoint was signed (two histories)"
    )


def held_beyond(records: int, size: int) -> str:
    return (
        f"the bundle has {records} records, fewer than the checkpoint you hold at size {size}: "
        "the log was cut back (or this is an older export)"
    )


def _no_floats(text: str) -> Any:
    raise ValueError(f"non-integer number {text!r}")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return obj


_SCAN = json.JSONDecoder(
    parse_float=_no_floats, parse_constant=_no_floats, object_pairs_hook=_pairs
).scan_once  # type: ignore[attr-defined]


def _is_amount(x: object) -> bool:
    return type(x) is int and 1 <= x <= MAX_AMOUNT


def _person(actor: str) -> str:
    """Who acted, whatever the role: `operator:alice` and `checker:alice` are one person."""
    return actor.partition(":")[2]


def _amount_at_least(cmd: dict[str, Any], threshold: int) -> bool:
    amount = cmd.get("amount_minor")
    return type(amount) is int and amount >= threshold


def _shape_problem(kind: str, keys: Any, shape: tuple[frozenset[str], ...]) -> str:
    missing = sorted(shape[0] - keys)
    extra = sorted(k for k in keys if k not in shape[1])
    if kind == REFUSED and EFFECT_KEYS.intersection(extra):
        return f"a refusal carries effects {extra}: it must change nothing"
    if missing:
        return f"{kind} record lacks {missing}"
    if extra:
        return f"{kind} record carries unexpected {extra}"
    return f"the keys of a {kind} record are not in canonical (sorted) order"


def _key_orders(
    shapes: dict[str, tuple[frozenset[str], ...]],
) -> dict[tuple[str, ...], frozenset[str]]:
    """Every valid key sequence of a record (sorted, as canonical bytes have them) -> the kinds
    it is valid for: one dict lookup checks a record's whole shape and its key order."""
    found: dict[tuple[str, ...], set[str]] = {}
    for kind, (need, allowed) in shapes.items():
        optional = sorted(allowed - need)
        for size in range(len(optional) + 1):
            for subset in itertools.combinations(optional, size):
                found.setdefault(tuple(sorted(need.union(subset))), set()).add(kind)
    return {keys: frozenset(kinds) for keys, kinds in found.items()}


KEY_ORDERS = _key_orders(SHAPES)


class _Ledger:
    """The replay state: live accounts, pending holds, pending requests, live standing
    authorisations and the policy in force; nothing that grows with the number of records."""

    __slots__ = (
        "accounts",
        "alerts",
        "approval_above",
        "approval_ttl",
        "auto_restrict",
        "created",
        "currencies",
        "day_marks",
        "day_offset",
        "gate",
        "holds",
        "kinds",
        "last_recon",
        "last_ts",
        "need_ops",
        "next_day",
        "platform",
        "pv",
        "recon_open",
        "recon_requests",
        "reconciliations",
        "refused",
        "requests",
        "requirement",
        "requirement_checked",
        "requirement_unchecked",
        "roles",
        "settle_requests",
        "settlements",
        "standing",
        "status",
        "totals",
    )

    def __init__(self, platform: str) -> None:
        self.platform = platform
        self.accounts: dict[str, list[Any]] = {}
        self.holds: dict[str, tuple[str, str, int]] = {}
        self.totals: dict[str, int] = {}
        self.kinds: dict[str, int] = {}
        self.created = False
        self.last_ts = 0
        self.refused = 0
        # Accounts that are frozen or closed (absent = open): new money must not touch them.
        self.status: dict[str, str] = {}
        # the policy in force (platform_created, then each policy_set)
        self.pv = 0
        self.need_ops: frozenset[str] = ALWAYS_APPROVED_OPS
        self.approval_above = 0
        self.approval_ttl = 0
        self.gate = "NORMAL"
        self.currencies: set[str] = set()  # of the accounts opened so far
        # request id -> (maker, expires ms, the operation asked for): waiting for a checker
        self.requests: dict[str, tuple[str, int, str]] = {}
        # standing authorisation id -> customer account, while granted and not revoked
        self.standing: dict[str, str] = {}
        self.roles: dict[str, str] = {}  # actor -> role, for at most MAX_ACTORS actors
        self.auto_restrict = 0  # the policy's auto_restrict: may `system` tighten the gate alone
        # alert id -> its level while open, CLOSED once closed: every alert ever raised (ids are
        # unique for the platform's life), so this is the one table that grows with the log, by
        # one short entry per alert
        self.alerts: dict[str, str] = {}
        # the requirement (customer + suspense posted balances) per currency, kept as postings
        # run, and its value at the last MAX_DAY_MARKS business-day boundaries (log size -> by
        # currency), where a day's reconciliation takes its snapshot
        self.requirement: dict[str, int] = {}
        self.day_marks: dict[int, dict[str, int]] = {}
        self.day_offset = 0
        self.next_day = 0  # the first ms of the next business day (a boundary to remember)
        # pending record_reconciliation request id -> the reconciliation it must record
        self.recon_requests: dict[str, dict[str, Any]] = {}
        self.last_recon: dict[str, str] = {}  # currency -> id of its latest reconciliation
        self.reconciliations = 0
        # reconciliation id -> (currency, signed difference still to settle: < 0 shortfall,
        # > 0 excess), while not settled in full: bounded by the open reconciliations
        self.recon_open: dict[str, tuple[str, int]] = {}
        # pending settle_reconciliation request id -> (reconciliation id, own funds account,
        # platform bank account, amount, currency) of the operator's instruction
        self.settle_requests: dict[str, tuple[Any, Any, Any, Any, Any]] = {}
        self.settlements = 0
        self.requirement_checked = 0  # requests whose requirement was recomputed and matched
        self.requirement_unchecked = 0  # requests whose snapshot was not a remembered log size

    def apply(self, rec: Any, pos: int) -> None:
        if type(rec) is not dict:
            raise _Fail("record is not a JSON object")
        if rec.get("v") != RECORD_VERSION:
            raise _Fail(f"record version {rec.get('v')!r} is not {RECORD_VERSION}")
        seq = rec.get("seq")
        if seq != pos or type(seq) is not int:
            raise _Fail(f"record says it is at position {seq!r}")
        if rec.get("platform") != self.platform:
            raise _Fail(f"record belongs to platform {rec.get('platform')!r}")
        ts = rec.get("ts")
        if type(ts) is not int or ts < self.last_ts:
            raise _Fail(f"timestamp {ts!r} runs backwards (previous {self.last_ts})")
        self.last_ts = ts
        if ts >= self.next_day:
            self._mark_day(ts, pos)
        kind = rec.get("kind")
        if type(kind) is not str:
            raise _Fail("record has no kind")
        kinds = self.kinds
        if kind in kinds:
            kinds[kind] += 1
        elif len(kinds) < MAX_KINDS:
            kinds[kind] = 1
        else:  # memory stays bounded whatever the records say
            kinds["(other kinds)"] = kinds.get("(other kinds)", 0) + 1
        pv = rec.get("pv")
        if pv != self.pv or type(pv) is not int:
            raise _Fail(f"pv {pv!r} is not the policy version in force ({self.pv})")
        shape = SHAPES.get(kind)
        if shape is None:
            self._unknown(rec, kind)
            return
        if kind not in KEY_ORDERS.get(tuple(rec), ()):  # exactly its keys, in canonical order
            raise _Fail(_shape_problem(kind, rec.keys(), shape))
        cmd = rec["cmd"]
        if type(cmd) is not dict:
            raise _Fail("cmd is not a JSON object")
        op = cmd.get("op")
        actor = rec["actor"]
        role = self.roles.get(actor) if type(actor) is str else None
        if role is None:
            role = self._role(actor)
        if kind == REFUSED:
            self._refusal(rec, op)
            return
        if kind == "platform_created":
            self._created(rec, pos, op, role)
            return
        if not self.created:
            raise _Fail("record before platform_created")
        if kind == REQUESTED:  # the maker's instruction, waiting for a checker
            self._requested(rec, op, cmd)
            return
        executes = rec.get("executes")
        if executes is None:
            if op not in OPS_OF_KIND[kind]:
                raise _Fail(f"{kind} record from operation {op!r}")
            if op not in ROLE_OPS[role]:
                raise _Fail(f"actor {actor!r}: role {role!r} may not {op}")
            if role == SYSTEM and op == "set_gate":
                self._automatic_gate(rec, actor)
            elif op in self.need_ops or (
                self.approval_above
                and op in LARGE_VALUE_OPS
                and _amount_at_least(cmd, self.approval_above)
            ):
                raise _Fail(f"{op} by {actor!r} executed without a checker's approval")
        else:
            self._executes(rec, kind, op, cmd, actor, role, executes, ts)
        if kind == "reconciliation_settled":
            self._settled(rec, executes)
            self._entries(rec)
        elif kind in ENTRY_KINDS:
            entries = rec["entries"]
            if op == "transfer" and executes is None and type(entries) is list and entries:
                self._transfer_role(entries[0][0] if type(entries[0]) is list else None, role)
            if self.status:
                self._require_open(e[:2] for e in entries if type(e) is list)
            self._entries(rec)
            if "tags" in rec:
                self._tags(rec["tags"])
        elif kind in HOLD_KINDS:
            hold = rec["hold"]
            if type(hold) is dict:
                self._require_open([(hold.get("debit"), hold.get("credit"))])
            self._hold(rec)
        elif kind in RESOLVE_KINDS:
            if kind == "hold_captured":  # posting new money; releases and payouts may run frozen
                self._require_open(
                    self.holds[item[0]][:2]
                    for item in rec["resolve"]
                    if type(item) is list and item and item[0] in self.holds
                )
            self._resolve(rec)
            if "tags" in rec:
                self._tags(rec["tags"])
        elif kind == "account_opened":
            self._open(rec["account"])
        elif kind in SUBJECT_KINDS:
            account = self.accounts.get(rec["subject"])
            if account is None:
                raise _Fail(f"unknown account {rec['subject']!r}")
            if kind == "account_closed" and (
                account[_DP] != account[_CP] or account[_DH] or account[_CH]
            ):
                raise _Fail(f"account {rec['subject']!r} closed with a balance or holds")
            self._set_status(rec["subject"], kind)
        else:
            self._governance(rec, kind, op, cmd, executes is None)

    # -- who acted, and under which approval ------------------------------------------------------

    def _role(self, actor: Any) -> str:
        role, _, name = actor.partition(":") if type(actor) is str else ("", "", "")
        if role not in ROLE_OPS or not name:
            raise _Fail(f"actor {actor!r} is not '<role>:<name>' with a known role")
        if len(self.roles) < MAX_ACTORS:
            self.roles[actor] = role
        return role

    def _transfer_role(self, debit_id: Any, role: str) -> None:
        """Suspense clearing is the operator's; every other transfer is a platform's."""
        debit = self.accounts.get(debit_id) if type(debit_id) is str else None
        from_suspense = debit is not None and debit[_KIND] == "suspense"
        if from_suspense != (role == "operator"):
            raise _Fail(
                f"a transfer from {debit_id!r} by role {role!r}: suspense clearing is the "
                "operator's, other transfers the platform's"
            )

    def _executes(
        self,
        rec: dict[str, Any],
        kind: str,
        op: Any,
        cmd: dict[str, Any],
        actor: str,
        role: str,
        request_id: Any,
        ts: int,
    ) -> None:
        """A checker's approval, recorded under the kind of the operation it executes."""
        request = self.requests.get(request_id) if type(request_id) is str else None
        if request is None:
            raise _Fail(f"executes {request_id!r}, which is not a pending request")
        maker, expires, asked = request
        if op != "approve_request" or cmd.get("request_id") != request_id:
            raise _Fail(f"executes {request_id!r} without an approve_request naming it")
        if _person(actor) == _person(maker):
            raise _Fail(f"request {request_id!r} approved by its own maker {maker!r}")
        if role != CHECKER:
            raise _Fail(f"request {request_id!r} approved by {actor!r}, who is not a checker")
        if ts > expires:
            raise _Fail(f"request {request_id!r} approved at {ts}, after it expired at {expires}")
        if KIND_OF_OP[asked] != kind:
            raise _Fail(f"request {request_id!r} for {asked} executed as a {kind} record")
        del self.requests[request_id]

    def _requested(self, rec: dict[str, Any], op: Any, cmd: dict[str, Any]) -> None:
        spec = rec["request"]
        if type(spec) is not dict or spec.keys() != {"id", "op", "expires", "why"}:
            raise _Fail("request must be {id, op, expires, why}")
        request_id, expires = spec["id"], spec["expires"]
        if request_id != rec["cid"] or type(request_id) is not str:
            raise _Fail(f"request id {request_id!r} is not the record's client id")
        if request_id in self.requests:
            raise _Fail(f"request {request_id!r} is already pending")
        if op not in REQUESTABLE_OPS:
            raise _Fail(f"operation {op!r} cannot be asked of a checker")
        actor = rec["actor"]
        role = self.roles.get(actor) or self._role(actor)
        if op not in ROLE_OPS[role]:
            raise _Fail(f"actor {actor!r}: role {role!r} may not ask for {op}")
        named = op
        if op == "transfer":
            debit_id = cmd.get("from_account_id")
            self._transfer_role(debit_id, role)
            if role == "operator":
                named = "clear_suspense"
        if spec["op"] != named:
            raise _Fail(f"request names operation {spec['op']!r}, its instruction is {named}")
        if type(expires) is not int or expires != rec["ts"] + self.approval_ttl:
            raise _Fail(f"request expires at {expires!r}, not after the policy's approval_ttl_ms")
        if type(spec["why"]) is not str:
            raise _Fail("request without a reason")
        if op == "record_reconciliation":
            self._reconciliation_requested(request_id, cmd, rec["seq"])
        elif op == "settle_reconciliation":
            self._settle_requested(request_id, cmd)
        self.requests[request_id] = (actor, expires, op)

    def _rejected(self, rec: dict[str, Any], cmd: dict[str, Any]) -> None:
        request_id = rec["rejects"]
        request = self.requests.get(request_id) if type(request_id) is str else None
        if request is None:
            raise _Fail(f"rejects {request_id!r}, which is not a pending request")
        if cmd.get("request_id") != request_id:
            raise _Fail(f"rejects {request_id!r} without a reject_request naming it")
        if _person(rec["actor"]) == _person(request[0]):
            raise _Fail(f"request {request_id!r} rejected by its own maker")
        del self.requests[request_id]
        self.recon_requests.pop(request_id, None)
        self.settle_requests.pop(request_id, None)

    # -- kinds without money --------------------------------------------------------------------

    def _unknown(self, rec: dict[str, Any], kind: str) -> None:
        # a kind this verifier does not know may exist, but it must not move money
        effects = EFFECT_KEYS.intersection(rec)
        if effects:
            raise _Fail(f"unknown record kind {kind!r} carries effects {sorted(effects)}")
        if not self.created:
            raise _Fail("record before platform_created")

    def _refusal(self, rec: dict[str, Any], op: Any) -> None:
        code, control, message = rec["code"], rec["control"], rec["message"]
        if not (code and type(code) is str and control and type(control) is str):
            raise _Fail("a refusal must name its code and control")
        if type(message) is not str or type(op) is not str:
            raise _Fail("a refusal carries a message and the refused instruction's op")
        if "linked_to" in rec and type(rec["linked_to"]) is not str:
            raise _Fail("linked_to must name a client id")
        if "suppressed" in rec:
            suppressed = rec["suppressed"]
            if type(suppressed) is not int or not 1 <= suppressed <= MAX_AMOUNT:
                raise _Fail(f"suppressed {suppressed!r} is not a positive count")
        if "auth_failed" in rec:
            failed = rec["auth_failed"]
            account = self.accounts.get(failed) if type(failed) is str else None
            if account is None or account[_KIND] != "customer":
                raise _Fail(f"auth_failed {failed!r} is not a customer account")
            if code != AUTH_FAILED_CODE or control != AUTH_CONTROL:
                raise _Fail(f"auth_failed on a {control} {code} refusal: only bad signatures count")
        self.refused += 1

    def _created(self, rec: dict[str, Any], pos: int, op: Any, role: str) -> None:
        if pos != 0 or self.created:
            raise _Fail("platform_created must be the first record and only once")
        if op != "create_platform" or op not in ROLE_OPS[role]:
            raise _Fail(f"platform_created by {rec['actor']!r} from operation {op!r}")
        if type(rec["name"]) is not str:
            raise _Fail("platform name must be a string")
        self._set_policy(rec["policy"], 0)
        self.created = True

    def _set_policy(self, policy: Any, version: int) -> None:
        if type(policy) is not dict:
            raise _Fail("policy must be an object")
        found = policy.get("version")
        if found != version or type(found) is not int:
            raise _Fail(f"policy version {found!r} where version {version} is next")
        ops = policy.get("approval_ops")
        above = policy.get("approval_above_minor")
        ttl = policy.get("approval_ttl_ms")
        if type(ops) is not list or not all(type(o) is str for o in ops):
            raise _Fail("policy approval_ops must be a list of operations")
        if type(above) is not int or not 0 <= above <= MAX_AMOUNT:
            raise _Fail(f"policy approval_above_minor {above!r} out of range")
        if type(ttl) is not int or not 0 < ttl <= MAX_AMOUNT:
            raise _Fail(f"policy approval_ttl_ms {ttl!r} out of range")
        auto = policy.get("auto_restrict", 0)  # absent: no automatic restriction
        if type(auto) is not int or auto not in (0, 1):
            raise _Fail(f"policy auto_restrict {auto!r} is not 0 or 1")
        offset = policy.get("day_offset_ms", 0)
        if type(offset) is not int or not -DAY_MS < offset < DAY_MS:
            raise _Fail(f"policy day_offset_ms {offset!r} is not within a day")
        if offset != self.day_offset:
            self.day_offset = offset
            self.next_day = self._day_after(self.last_ts)
        self.auto_restrict = auto
        self.pv = version
        self.need_ops = ALWAYS_APPROVED_OPS.union(ops)
        self.approval_above = above
        self.approval_ttl = ttl

    def _customer(self, account_id: Any, what: str) -> None:
        account = self.accounts.get(account_id) if type(account_id) is str else None
        if account is None or account[_KIND] != "customer":
            raise _Fail(f"{what} names {account_id!r}, which is not a customer account")
        if self.status.get(account_id) == "closed":
            raise _Fail(f"{what} on closed account {account_id!r}")

    def _governance(
        self, rec: dict[str, Any], kind: str, op: Any, cmd: dict[str, Any], direct: bool
    ) -> None:
        """Customer keys, payout bindings, standing authorisations, policy, gate, requests.
        `direct`: the record is the instruction itself (not a checker executing a request), so
        its `cmd` must agree with its effect."""
        if kind == "approval_rejected":
            self._rejected(rec, cmd)
        elif kind == "key_registered":
            key = rec["key"]
            if type(key) is not dict or key.keys() != {"account", "pub"}:
                raise _Fail("key must be {account, pub}")
            self._customer(key["account"], "key_registered")
            if type(key["pub"]) is not str or not key["pub"]:
                raise _Fail("key_registered without a public key")
            if direct and (
                cmd.get("account_id") != key["account"] or cmd.get("public_key") != key["pub"]
            ):
                raise _Fail("key_registered differs from its instruction")
        elif kind == "payee_bound":
            payee = rec["payee"]
            if type(payee) is not dict or not (
                {"account", "ref", "bank"} <= payee.keys() <= {"account", "ref", "bank", "screen"}
            ):
                raise _Fail("payee must be {account, ref, bank[, screen]}")
            self._customer(payee["account"], "payee_bound")
            if type(payee["ref"]) is not str or type(payee["bank"]) is not dict:
                raise _Fail("payee_bound needs a reference and the sealed bank account")
            if direct and (
                cmd.get("account_id") != payee["account"] or cmd.get("payee_ref") != payee["ref"]
            ):
                raise _Fail("payee_bound differs from its instruction")
        elif kind == "standing_granted":
            self._standing_granted(rec)
        elif kind == "standing_revoked":
            standing_id = rec["revokes"]
            account = self.standing.pop(standing_id, None) if type(standing_id) is str else None
            if account is None:
                raise _Fail(f"revokes {standing_id!r}, which is not a granted authorisation")
            if direct and cmd.get("account_id") != account:
                raise _Fail(f"standing authorisation {standing_id!r} revoked for another account")
        elif kind == "policy_set":
            self._set_policy(rec["policy"], self.pv + 1)
        elif kind == "gate_set":
            gate = rec["gate"]
            if gate not in GATES or type(gate) is not str:
                raise _Fail(f"unknown gate {gate!r}")
            if gate == self.gate:
                raise _Fail(f"gate set to {gate}, which it already is")
            if direct and cmd.get("gate") != gate:
                raise _Fail("gate_set differs from its instruction")
            self.gate = gate
        elif kind == "liabilities_published":
            self._liabilities(rec, cmd, direct)
        elif kind == "reconciliation_completed":
            self._reconciliation_completed(rec)
        elif kind == "alert_raised":
            self._alert_raised(rec, cmd)
        elif kind == "alert_acknowledged" or kind == "alert_closed":
            self._alert_step(rec, kind, op, cmd)
        else:  # pragma: no cover - SHAPES and this dispatch list the same kinds
            raise _Fail(f"kind {kind!r} has no replay rule")

    # -- the platform gate, the daily reconciliation and the alerts -------------------------------

    def _automatic_gate(self, rec: dict[str, Any], actor: str) -> None:
        """Early warning (a `system` actor) may set the gate without a checker only under a
        policy with auto_restrict = 1, and only towards FROZEN (NORMAL < RESTRICTED < WIND_DOWN
        < FROZEN): tightening is safe, loosening never is."""
        if not self.auto_restrict:
            raise _Fail(
                f"set_gate by {actor!r} without a checker's approval while the policy's "
                "auto_restrict is 0"
            )
        gate = rec["gate"]
        rank = GATE_RANK.get(gate) if type(gate) is str else None
        if rank is None:
            raise _Fail(f"unknown gate {gate!r}")
        if rank <= GATE_RANK[self.gate]:
            raise _Fail(
                f"set_gate by {actor!r} without a checker's approval may only tighten the "
                f"gate, not move it from {self.gate} to {gate}"
            )

    def _day_after(self, ts: int) -> int:
        """The first millisecond of the business day after the one `ts` falls in."""
        return ((ts + self.day_offset) // DAY_MS + 1) * DAY_MS - self.day_offset

    def _mark_day(self, ts: int, pos: int) -> None:
        """Record `pos` opens a new business day: remember the requirement at log size `pos`,
        the snapshot a reconciliation of the day before takes (reconciliation/ledger_view.py).
        At most MAX_DAY_MARKS boundaries are kept, so memory stays flat."""
        marks = self.day_marks
        marks[pos] = dict(self.requirement)
        if len(marks) > MAX_DAY_MARKS:
            del marks[next(iter(marks))]  # the oldest (dicts keep insertion order)
        self.next_day = self._day_after(ts)

    def _requirement_at(self, size: int, pos: int) -> dict[str, int] | None:
        """Customer + suspense balances by currency at log size `size` (record `pos` is being
        replayed), if this replay still knows them: at its own position or at a remembered
        business-day boundary."""
        if size == pos:
            return self.requirement
        return self.day_marks.get(size)

    def _reconciliation_requested(self, request_id: str, cmd: dict[str, Any], pos: int) -> None:
        """The operator's instruction: its figures must add up, and the requirement must be the
        log's own at the snapshot whenever this replay can recompute it."""
        spec: dict[str, Any] = {
            "as_of": cmd.get("as_of_ms"),
            "breaks": cmd.get("breaks"),
            "ccy": cmd.get("currency"),
            "closing": cmd.get("bank_closing_minor"),
            "difference": cmd.get("difference_minor"),
            "id": cmd.get("reconciliation_id"),
            "requirement": cmd.get("requirement_minor"),
            "result": cmd.get("result"),
            "snapshot": cmd.get("snapshot_size"),
            "statements": cmd.get("statements"),
            "transit": cmd.get("in_transit_minor"),
        }
        self._check_reconciliation(spec, pos, "requested")
        known = self._requirement_at(spec["snapshot"], pos)
        if known is None:
            self.requirement_unchecked += 1
        else:
            actual = known.get(spec["ccy"], 0)
            if spec["requirement"] != actual:
                raise _Fail(
                    f"reconciliation requirement {spec['requirement']} is not the customer + "
                    f"suspense balance {actual} {spec['ccy']} at log size {spec['snapshot']}"
                )
            self.requirement_checked += 1
        self.recon_requests[request_id] = spec

    def _check_reconciliation(self, spec: dict[str, Any], pos: int, what: str) -> None:
        """The shape and arithmetic of a reconciliation (ledger/validate.py)."""
        as_of, breaks, ccy, closing, difference, recon_id, requirement, result, snapshot = (
            spec["as_of"],
            spec["breaks"],
            spec["ccy"],
            spec["closing"],
            spec["difference"],
            spec["id"],
            spec["requirement"],
            spec["result"],
            spec["snapshot"],
        )
        statements, transit = spec["statements"], spec["transit"]
        if type(recon_id) is not str or not recon_id:
            raise _Fail(f"{what} reconciliation without an id")
        if type(ccy) is not str or ccy not in self.currencies:
            raise _Fail(f"reconciliation currency {ccy!r} is not a currency of an opened account")
        if type(as_of) is not int or as_of <= 0:
            raise _Fail(f"reconciliation as_of {as_of!r} is not a Unix time in ms")
        if type(snapshot) is not int or not 1 <= snapshot <= pos:
            raise _Fail(
                f"reconciliation snapshot {snapshot!r} is not a log size up to its own record"
            )
        if (
            type(statements) is not list
            or not 1 <= len(statements) <= MAX_STATEMENTS
            or not all(type(d) is str and len(d) == 64 and _HEX.issuperset(d) for d in statements)
        ):
            raise _Fail(
                f"reconciliation statements must be 1..{MAX_STATEMENTS} SHA-256 digests "
                "(lowercase hex)"
            )
        if len(set(statements)) != len(statements):
            raise _Fail("reconciliation lists a statement twice")
        for name, value, low in (
            ("closing", closing, 0),
            ("requirement", requirement, 0),
            ("transit", transit, MIN_INT64),
            ("difference", difference, MIN_INT64),
        ):
            if type(value) is not int or not low <= value <= MAX_AMOUNT:
                raise _Fail(f"reconciliation {name} {value!r} out of range")
        if type(breaks) is not int or not 0 <= breaks <= MAX_BREAKS:
            raise _Fail(f"reconciliation breaks {breaks!r} is not in 0..{MAX_BREAKS}")
        expected = closing + transit - requirement
        if difference != expected:
            raise _Fail(
                f"reconciliation figures do not add up: difference {difference}, but closing "
                f"{closing} + transit {transit} - requirement {requirement} = {expected}"
            )
        sign = "balanced" if expected == 0 else "shortfall" if expected < 0 else "excess"
        if result != sign:
            raise _Fail(f"reconciliation result {result!r}, the figures say {sign}")

    def _reconciliation_completed(self, rec: dict[str, Any]) -> None:
        spec = rec["reconciliation"]
        if type(spec) is not dict or tuple(spec) != RECONCILIATION_KEYS:
            raise _Fail(f"reconciliation must be {{{', '.join(RECONCILIATION_KEYS)}}}")
        self._check_reconciliation(spec, rec["seq"], "recorded")
        asked = self.recon_requests.pop(rec.get("executes", ""), None)
        if asked != spec:
            raise _Fail("reconciliation differs from the operator's instruction it executes")
        if spec["id"] in self.last_recon.values() or spec["id"] in self.recon_open:
            raise _Fail(f"reconciliation {spec['id']!r} recorded twice")
        self.last_recon[spec["ccy"]] = spec["id"]
        self.reconciliations += 1
        if spec["difference"]:
            self.recon_open[spec["id"]] = (spec["ccy"], spec["difference"])

    def _settle_requested(self, request_id: str, cmd: dict[str, Any]) -> None:
        """The operator's settle_reconciliation: the ledger asks a checker only for a
        reconciliation with something left to settle, and never for more than that."""
        rid: Any = cmd.get("reconciliation_id")
        amount: Any = cmd.get("amount_minor")
        open_ = self.recon_open.get(rid) if type(rid) is str else None
        if open_ is None:
            raise _Fail(f"settlement asked for {rid!r}, which has nothing left to settle")
        if not _is_amount(amount) or amount > abs(open_[1]):
            raise _Fail(
                f"settlement of {amount!r} asked for {rid!r}, which has {abs(open_[1])} left"
            )
        self.settle_requests[request_id] = (
            rid,
            cmd.get("own_account_id"),
            cmd.get("platform_bank_account_id"),
            amount,
            cmd.get("currency"),
        )

    def _settled(self, rec: dict[str, Any], executes: Any) -> None:
        """A checker's execution of the operator's settle_reconciliation (without `executes`
        apply() has named it as executed without a checker): one posting, own funds -> platform
        bank for a shortfall (the platform's payment into the custody account), platform bank
        -> own funds for an excess (the custody account's payment back), never more than what
        is left of that reconciliation's difference."""
        asked = self.settle_requests.pop(executes, None)
        rid = rec["settles"]
        open_ = self.recon_open.get(rid) if type(rid) is str else None
        if open_ is None:
            raise _Fail(f"settles {rid!r}, which is not a reconciliation with a difference left")
        ccy, left = open_
        entries = rec["entries"]
        if type(entries) is not list or len(entries) != 1 or type(entries[0]) is not list:
            raise _Fail("a settlement posts exactly one entry")
        entry = entries[0]
        if len(entry) != 3:
            raise _Fail("an entry is [debit, credit, amount]")
        debit_id, credit_id, amount = entry
        if rec["ccy"] != ccy:
            raise _Fail(f"settlement in {rec['ccy']!r} of a {ccy} reconciliation")
        debit = self.accounts.get(debit_id) if type(debit_id) is str else None
        credit = self.accounts.get(credit_id) if type(credit_id) is str else None
        want = ("own_funds", "platform_bank") if left < 0 else ("platform_bank", "own_funds")
        if debit is None or credit is None or (debit[_KIND], credit[_KIND]) != want:
            what = "shortfall" if left < 0 else "excess"
            raise _Fail(
                f"settlement of a {what} must post {want[0]} -> {want[1]}, not "
                f"{debit_id!r} -> {credit_id!r}"
            )
        if not _is_amount(amount) or amount > abs(left):
            raise _Fail(f"settlement of {amount!r} exceeds the {abs(left)} left of {rid!r}")
        if asked is None or asked != (
            rid,
            *((debit_id, credit_id) if left < 0 else (credit_id, debit_id)),
            amount,
            rec["ccy"],
        ):
            raise _Fail(
                f"settlement of {rid!r} differs from the operator's instruction it executes"
            )
        left = left + amount if left < 0 else left - amount
        if left:
            self.recon_open[rid] = (ccy, left)
        else:
            del self.recon_open[rid]
        self.settlements += 1

    def _alert_raised(self, rec: dict[str, Any], cmd: dict[str, Any]) -> None:
        spec = rec["alert"]
        if type(spec) is not dict or tuple(spec) != ALERT_KEYS:
            raise _Fail("alert must be {id, level, rule, subject}")
        alert_id, level, rule, subject = spec.values()
        if type(alert_id) is not str or not alert_id:
            raise _Fail("alert without an id")
        if alert_id in self.alerts:
            raise _Fail(f"alert {alert_id!r} raised twice")
        if type(level) is not str or level not in ALERT_LEVELS:
            raise _Fail(f"alert level {level!r} is not GREEN, YELLOW, ORANGE or RED")
        if type(rule) is not str or not rule or type(subject) is not str:
            raise _Fail("alert needs a rule and a subject ('' for the platform)")
        if (
            cmd.get("alert_id") != alert_id
            or cmd.get("level") != level
            or cmd.get("rule") != rule
            or cmd.get("subject", "") != subject
        ):
            raise _Fail("alert_raised differs from its instruction")
        self.alerts[alert_id] = level

    def _alert_step(self, rec: dict[str, Any], kind: str, op: Any, cmd: dict[str, Any]) -> None:
        alert_id = rec[kind]
        level = self.alerts.get(alert_id) if type(alert_id) is str else None
        if level is None:
            raise _Fail(f"{kind} names {alert_id!r}, which is not a raised alert")
        if level == CLOSED:
            raise _Fail(f"alert {alert_id!r} is already closed")
        if cmd.get("alert_id") != alert_id:
            raise _Fail(f"{kind} differs from its instruction")
        role = self.roles.get(rec["actor"]) or self._role(rec["actor"])
        if level not in ALERT_MAY.get((role, op), ()):
            verb = "close" if kind == "alert_closed" else "acknowledge"
            raise _Fail(f"role {role!r} may not {verb} a {level} alert ({alert_id!r})")
        if kind == "alert_closed":
            self.alerts[alert_id] = CLOSED

    def _standing_granted(self, rec: dict[str, Any]) -> None:
        spec = rec["standing"]
        if type(spec) is not dict or spec.keys() != {
            "id",
            "account",
            "purpose",
            "payee",
            "cap",
            "until",
        }:
            raise _Fail("standing must be {id, account, purpose, payee, cap, until}")
        standing_id = spec["id"]
        if type(standing_id) is not str or standing_id in self.standing:
            raise _Fail(f"standing authorisation {standing_id!r} granted twice or without an id")
        self._customer(spec["account"], "standing_granted")
        if type(spec["purpose"]) is not str or type(spec["payee"]) is not str:
            raise _Fail("standing authorisation needs a purpose and a payee ('' for any)")
        if not _is_amount(spec["cap"]) or type(spec["until"]) is not int:
            raise _Fail("standing authorisation needs a cap in 1..2^63-1 and an end time")
        if spec["until"] <= rec["ts"]:
            raise _Fail("standing authorisation granted already expired")
        self.standing[standing_id] = spec["account"]

    def _liabilities(self, rec: dict[str, Any], cmd: dict[str, Any], direct: bool) -> None:
        """A proof-of-liabilities statement: an operator's, about a snapshot no later than itself,
        in a currency of the platform's accounts, with a 32-byte root in canonical base64."""
        spec = rec["liabilities"]
        if type(spec) is not dict or tuple(spec) != LIABILITIES_KEYS:
            raise _Fail("liabilities must be {asset, depth, root, snapshot, total}")
        asset, depth, root, snapshot, total = spec.values()
        if type(snapshot) is not int or not 1 <= snapshot <= rec["seq"]:
            raise _Fail(f"liabilities snapshot {snapshot!r} is not a log size up to its own record")
        if type(asset) is not str or asset not in self.currencies:
            raise _Fail(f"liabilities asset {asset!r} is not a currency of the platform's accounts")
        if type(depth) is not int or not 1 <= depth <= POL_MAX_DEPTH:
            raise _Fail(f"liabilities depth {depth!r} is not in 1..{POL_MAX_DEPTH}")
        if type(total) is not int or not 0 <= total <= MAX_AMOUNT:
            raise _Fail(f"liabilities total {total!r} is not in 0..2^63-1")
        try:
            raw = b64decode_strict(root) if type(root) is str and len(root) == 44 else b""
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise _Fail("liabilities root is not a 32-byte hash in canonical base64 (44 chars)")
        if direct and (
            cmd.get("snapshot_size") != snapshot
            or cmd.get("currency") != asset
            or cmd.get("depth") != depth
            or cmd.get("root") != root
            or cmd.get("total_minor") != total
        ):
            raise _Fail("liabilities_published differs from its instruction")

    def _tags(self, tags: Any) -> None:
        """Large-value tags: on customer accounts, one side each, a day total and a due date."""
        if type(tags) is not list or not tags:
            raise _Fail("tags must be a non-empty list")
        accounts = self.accounts
        for tag in tags:
            if type(tag) is not dict or tuple(tag) != TAG_KEYS:
                raise _Fail("a tag is {account, day_total_minor, due_ms, side, tag}")
            account_id, total, due, side, name = tag.values()
            account = accounts.get(account_id) if type(account_id) is str else None
            if (
                account is None
                or account[_KIND] != "customer"
                or side not in TAG_SIDES
                or type(name) is not str
                or type(due) is not int
                or type(total) is not int
                or not 0 < total <= MAX_AMOUNT
            ):
                raise _Fail(
                    f"tag {tag!r}: needs a customer account, side 'in' or 'out', the day's "
                    "total in 1..2^63-1 and a due time"
                )

    def _require_open(self, pairs: Any) -> None:
        status = self.status
        if not status:
            return
        for pair in pairs:
            for account_id in pair:
                state = status.get(account_id) if type(account_id) is str else None
                if state is not None:
                    raise _Fail(f"money moved on {state} account {account_id!r}")

    def _set_status(self, account_id: str, kind: str) -> None:
        current = self.status.get(account_id, "open")
        if current == "closed":
            raise _Fail(f"account {account_id!r} changed after it was closed")
        if kind == "account_frozen":
            if current == "frozen":
                raise _Fail(f"account {account_id!r} frozen twice")
            self.status[account_id] = "frozen"
        elif kind == "account_unfrozen":
            if current != "frozen":
                raise _Fail(f"account {account_id!r} unfrozen while not frozen")
            del self.status[account_id]
        else:
            self.status[account_id] = "closed"

    def _post(self, debit_id: Any, credit_id: Any, amount: Any, ccy: Any) -> None:
        accounts = self.accounts
        debit = accounts.get(debit_id)
        credit = accounts.get(credit_id)
        if debit is None or credit is None:
            raise _Fail(f"posting {debit_id!r} -> {credit_id!r} names an unknown account")
        if debit_id == credit_id:
            raise _Fail(f"posting with {debit_id!r} on both sides")
        if not _is_amount(amount):
            raise _Fail(f"amount {amount!r} is not an integer in 1..2^63-1")
        if debit[_CCY] != ccy or credit[_CCY] != ccy:
            raise _Fail(
                f"double entry across currencies: {debit_id!r} ({debit[_CCY]}) -> "
                f"{credit_id!r} ({credit[_CCY]}) in {ccy!r}"
            )
        debit[_DP] += amount
        credit[_CP] += amount
        if debit[_REQ] or credit[_REQ]:
            req = self.requirement
            req[ccy] = req.get(ccy, 0) + (credit[_REQ] - debit[_REQ]) * amount
        total = self.totals.get(ccy, 0) + amount
        self.totals[ccy] = total
        if total > MAX_AMOUNT or credit[_CP] > MAX_AMOUNT:
            raise _Fail("a running total overflows 2^63-1")
        if debit[_NONNEG] and debit[_CP] - debit[_DP] - debit[_DH] < 0:
            raise _Fail(f"account {debit_id!r} ({debit[_KIND]}) goes below zero available")

    def _entries(self, rec: dict[str, Any]) -> None:
        entries = rec["entries"]
        ccy = rec.get("ccy")
        if type(entries) is not list or not entries:
            raise _Fail("entries must be a non-empty list")
        for entry in entries:
            if type(entry) is not list or len(entry) != 3:
                raise _Fail("an entry is [debit, credit, amount]")
            self._post(entry[0], entry[1], entry[2], ccy)

    def _hold(self, rec: dict[str, Any]) -> None:
        hold = rec["hold"]
        if type(hold) is not dict:
            raise _Fail("hold must be an object")
        hold_id: Any = hold.get("id")
        debit_id: Any = hold.get("debit")
        credit_id: Any = hold.get("credit")
        amount: Any = hold.get("amount")
        if type(hold_id) is not str or hold_id in self.holds:
            raise _Fail(f"hold {hold_id!r} is already pending or has no id")
        debit = self.accounts.get(debit_id)
        credit = self.accounts.get(credit_id)
        if debit is None or credit is None or debit_id == credit_id:
            raise _Fail(f"hold {hold_id!r} names unknown or identical accounts")
        if not _is_amount(amount):
            raise _Fail(f"hold amount {amount!r} is not an integer in 1..2^63-1")
        ccy = rec.get("ccy")
        if debit[_CCY] != ccy or credit[_CCY] != ccy:
            raise _Fail(f"hold {hold_id!r} across currencies")
        if not hold.get("reason") or type(hold.get("expires")) is not int:
            raise _Fail(f"hold {hold_id!r} without a reason or an expiry")
        debit[_DH] += amount
        credit[_CH] += amount
        if debit[_NONNEG] and debit[_CP] - debit[_DP] - debit[_DH] < 0:
            raise _Fail(f"hold {hold_id!r} takes {debit_id!r} below zero available")
        self.holds[hold_id] = (debit_id, credit_id, amount)

    def _resolve(self, rec: dict[str, Any]) -> None:
        resolve = rec["resolve"]
        if type(resolve) is not list:
            raise _Fail("resolve must be a list")
        for item in resolve:
            if type(item) is not list or len(item) != 3:
                raise _Fail("a resolution is [hold id, captured amount, status]")
            hold_id, captured, status = item
            hold = self.holds.pop(hold_id, None) if type(hold_id) is str else None
            if hold is None:
                raise _Fail(f"hold {hold_id!r} is not pending")
            debit_id, credit_id, amount = hold
            if status not in HOLD_STATUSES:
                raise _Fail(f"unknown hold status {status!r}")
            if type(captured) is not int or not 0 <= captured <= amount:
                raise _Fail(f"hold {hold_id!r}: capture {captured!r} beyond the held {amount}")
            if (status == "captured") != (captured > 0):
                raise _Fail(f"hold {hold_id!r}: status {status} with captured {captured}")
            debit = self.accounts[debit_id]
            credit = self.accounts[credit_id]
            debit[_DH] -= amount
            credit[_CH] -= amount
            if captured:
                self._post(debit_id, credit_id, captured, debit[_CCY])

    def _open(self, spec: Any) -> None:
        if type(spec) is not dict:
            raise _Fail("account must be an object")
        account_id, kind, ccy = spec.get("id"), spec.get("kind"), spec.get("ccy")
        if type(account_id) is not str or not account_id:
            raise _Fail("account without an id")
        if account_id in self.accounts:
            raise _Fail(f"account {account_id!r} opened twice")
        if kind not in ACCOUNT_KINDS:
            raise _Fail(f"unknown account kind {kind!r}")
        if type(ccy) is not str or len(ccy) != 3 or not ccy.isascii() or not ccy.isupper():
            raise _Fail(f"currency {ccy!r} is not an ISO 4217 code")
        self.accounts[account_id] = [
            kind,
            ccy,
            kind in NON_NEGATIVE_KINDS,
            0,
            0,
            0,
            0,
            int(kind in REQUIREMENT_KINDS),
        ]
        self.currencies.add(ccy)

    def fill(self, summary: Summary) -> None:
        summary.accounts = len(self.accounts)
        summary.pending_holds = len(self.holds)
        summary.pending_requests = len(self.requests)
        summary.standing = len(self.standing)
        summary.policy_version = self.pv
        summary.gate = self.gate
        summary.refused = self.refused
        summary.alerts = len(self.alerts)
        summary.open_alerts = sum(1 for level in self.alerts.values() if level != CLOSED)
        summary.reconciliations = self.reconciliations
        summary.settlements = self.settlements
        summary.unsettled = len(self.recon_open)
        summary.requirements_checked = self.requirement_checked
        summary.requirements_unchecked = self.requirement_unchecked
        summary.kinds = dict(sorted(self.kinds.items()))
        balances: dict[str, dict[str, int]] = {}
        held: dict[str, int] = {}
        for account in self.accounts.values():
            kind, ccy = account[_KIND], account[_CCY]
            signed = account[_DP] - account[_CP]
            bal = signed if kind in ASSET_KINDS else -signed
            per = balances.setdefault(ccy, {})
            per[kind] = per.get(kind, 0) + bal
            if account[_DH]:
                held[ccy] = held.get(ccy, 0) + account[_DH]
        summary.balances = balances
        summary.held = held

    def net_by_currency(self) -> dict[str, int]:
        net: dict[str, int] = {}
        for account in self.accounts.values():
            net[account[_CCY]] = net.get(account[_CCY], 0) + account[_CP] - account[_DP]
        return net


def _header(f: BinaryIO, verifiers: list[Verifier], summary: Summary) -> int:
    """Read and check the header; returns the number of lines consumed."""
    first = f.readline(64)
    if first != FORMAT_LINE:
        raise _HeaderFail("not a custody-bundle/v1 file (first line)", 1)
    values: dict[bytes, str] = {}
    for lineno, key in enumerate(HEADER_KEYS, start=2):
        line = f.readline(4096)
        name, sep, value = line.partition(b" ")
        if name != key or not sep or not line.endswith(b"\n") or len(value) < 2:
            raise _HeaderFail(f"expected a '{key.decode()} ...' line", lineno)
        try:
            text = value[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise _HeaderFail(f"{key.decode()} is not UTF-8", lineno) from None
        if not text.isprintable() or " " in text:
            raise _HeaderFail(f"{key.decode()} contains spaces or control characters", lineno)
        values[key] = text
    lineno = 2 + len(HEADER_KEYS)
    if f.readline(16) != b"begin\n":
        raise _HeaderFail("expected the 'begin' line", lineno)
    platform, origin, vkey = values[b"platform"], values[b"origin"], values[b"vkey"]
    if origin.rsplit("/", 1)[-1] != platform:
        raise _HeaderFail(f"origin {origin!r} does not name platform {platform!r}", 3)
    try:
        named = parse_vkey(vkey)
    except ValueError as exc:
        raise _HeaderFail(f"vkey: {exc}", 4) from None
    if named not in verifiers:
        raise _HeaderFail("the bundle's vkey is not one of the keys you trust (--vkey)", 4)
    if named.name != origin:
        raise _HeaderFail(f"the bundle's key name {named.name!r} is not its origin", 4)
    summary.platform, summary.origin, summary.vkey = platform, origin, vkey
    return lineno


class _HeaderFail(Exception):
    def __init__(self, reason: str, line: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line


LEVELS = ("full", "integrity")


def verify_bundle(
    f: BinaryIO,
    verifiers: list[Verifier],
    progress: Callable[[int], None] | None = None,
    jobs: int = 1,
    level: str = "full",
    held: Sequence[Checkpoint] = (),
) -> Summary:
    """Verify a bundle read from binary stream `f`. Raises VerificationFailed on the first problem.

    `held`: checkpoints of this log the auditor already holds (their signatures checked by the
    caller): the records' Merkle root at each one's size must be its root, so a history
    rewritten and re-signed since then is caught even if every checkpoint in the file matches.

    `level` "full" (the default) runs every check of docs/BUNDLE.md §2; "integrity" runs checks
    1-6 only (header, syntax, positions, chain, Merkle roots and signatures, end line) without
    decoding or replaying the records, in `jobs` processes (custody_verify/integrity.py).

    The replay state has no reference cycles, so the cyclic garbage collector is paused for the
    run (it would otherwise cost about a quarter of the time on short-lived record objects).

    With `jobs` >= 2 the replay (JSON decoding and the ledger invariants, about two thirds of
    the work) runs in a second process, pipelined with the chain, Merkle and signature checks
    of this one; the report is the same either way.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    if level not in LEVELS:
        raise ValueError(f"unknown verification level {level!r} (one of {', '.join(LEVELS)})")
    try:
        return _verify(f, verifiers, progress, jobs, level, list(held))
    finally:
        if was_enabled:
            gc.enable()


def _verify(
    f: BinaryIO,
    verifiers: list[Verifier],
    progress: Callable[[int], None] | None,
    jobs: int,
    level: str = "full",
    held: list[Checkpoint] | None = None,
) -> Summary:
    summary = Summary(level=level)
    started = time.perf_counter()
    held = held or []
    try:
        lineno = _header(f, verifiers, summary)
    except _HeaderFail as exc:
        raise VerificationFailed(Failure("header", exc.reason, line=exc.line), summary) from None
    for cp in held:
        if cp.origin != summary.origin:
            reason = f"the checkpoint you hold at size {cp.size} is of {cp.origin!r}, another log"
            failure = Failure("checkpoint", reason, checkpoint=cp.size, line=lineno)
            raise VerificationFailed(failure, summary)
    if level == "integrity":
        return _verify_integrity(f, summary, lineno, jobs, progress, started, held)
    ledger = _Ledger(summary.platform)
    worker = _ReplayWorker(summary.platform) if jobs >= 2 else None
    # Only the bundle's own key (its name is the origin) may sign its checkpoints: another key
    # the auditor trusts for another log must not be able to vouch for this one.
    own_key = [parse_vkey(summary.vkey)]
    try:
        return _run(f, own_key, progress, summary, ledger, worker, lineno, started, held)
    finally:
        if worker is not None:
            worker.close()


def _verify_integrity(
    f: BinaryIO,
    summary: Summary,
    lineno: int,
    jobs: int,
    progress: Callable[[int], None] | None,
    started: float,
    held: list[Checkpoint],
) -> Summary:
    """Checks 1-6 of docs/BUNDLE.md §2 (no replay), in blocks, in `jobs` processes."""
    from custody_verify import integrity

    try:
        out = integrity.run(
            f,
            summary.origin,
            summary.vkey,
            [parse_vkey(summary.vkey)],  # only the bundle's own key signs its checkpoints
            lineno,
            MAX_LINE,
            jobs,
            progress,
            PROGRESS_EVERY,
            held,
        )
    except integrity.IntegrityFailed as exc:
        summary.records = exc.records
        summary.checkpoints = exc.checkpoints
        summary.chain_head = b64encode(exc.head)
        summary.seconds = time.perf_counter() - started
        failure = Failure(exc.where, exc.reason, exc.position, exc.checkpoint, exc.line)
        raise VerificationFailed(failure, summary) from None
    summary.records = out.records
    summary.checkpoints = out.checkpoints
    summary.chain_head = b64encode(out.head)
    summary.checkpoint_size = out.checkpoint_size
    summary.checkpoint_root = (
        None if out.checkpoint_root is None else b64encode(out.checkpoint_root)
    )
    summary.held_checkpoints = out.held_checked
    summary.seconds = time.perf_counter() - started
    return summary


def _run(
    f: BinaryIO,
    verifiers: list[Verifier],
    progress: Callable[[int], None] | None,
    summary: Summary,
    ledger: _Ledger,
    worker: _ReplayWorker | None,
    lineno: int,
    started: float,
    held: list[Checkpoint] | None = None,
) -> Summary:
    origin = summary.origin
    sha256 = hashlib.sha256
    b2a = binascii.b2a_base64
    scan = _SCAN
    apply = ledger.apply
    head = GENESIS
    stack: list[bytes] = []  # Merkle right frontier (RFC 9162 §2.1.2)
    pos = 0
    checkpoints = 0
    last_cp_size = -1
    ended = False
    next_progress = PROGRESS_EVERY

    cp_sizes: list[int] = []

    def fail(where: str, reason: str, **kw: Any) -> VerificationFailed:
        if worker is not None:
            earlier = worker.finish()[0]
            if earlier is not None:
                return replay_failed(*earlier)
        summary.records = pos
        summary.checkpoints = checkpoints
        summary.chain_head = b64encode(head)
        summary.seconds = time.perf_counter() - started
        return VerificationFailed(Failure(where, reason, line=lineno, **kw), summary)

    def replay_failed(at: int, reason: str) -> VerificationFailed:
        summary.records = at
        summary.checkpoints = sum(1 for n in cp_sizes if n <= at)
        summary.seconds = time.perf_counter() - started
        line = HEADER_LINES + at + 1 + summary.checkpoints
        return VerificationFailed(Failure("record", reason, position=at, line=line), summary)

    def merkle_root() -> bytes:
        if not stack:
            return sha256(b"").digest()
        r = stack[-1]
        for left in reversed(stack[:-1]):
            r = sha256(b"\x01" + left + r).digest()
        return r

    # checkpoints the auditor holds, by size: each compared once the records reach its size
    waiting = sorted(held or [], key=lambda cp: cp.size)
    held_checked = 0
    next_held = waiting[0].size if waiting else -1

    def check_held() -> int:
        nonlocal held_checked
        while waiting and waiting[0].size == pos:
            if merkle_root() != waiting.pop(0).root:
                raise fail("checkpoint", held_differs(pos), checkpoint=pos)
            held_checked += 1
        return waiting[0].size if waiting else -1

    if next_held == 0:
        next_held = check_held()

    readline = f.readline
    for line in iter(lambda: readline(MAX_LINE), b""):
        lineno += 1
        if ended:
            raise fail("end", "data after the end line")
        if line[:2] == b"R ":
            parts = line.split(b" ", 3)
            if len(parts) != 4 or line[-1:] != b"\n":
                raise fail("record", "malformed record line", position=pos)
            if parts[1] != b"%d" % pos:
                raise fail("record", _position_problem(parts[1], pos), position=pos)
            data = parts[3][:-1]
            if not data:
                raise fail("record", "empty record", position=pos)
            link = sha256(head + data).digest()
            if b2a(link, newline=False) != parts[2]:
                raise fail(
                    "record",
                    "chain link mismatch: the stored link is not SHA-256(previous link || record)",
                    position=pos,
                )
            head = link
            # Merkle: push LEAF(data), merge once per trailing 1-bit of pos
            stack.append(sha256(b"\x00" + data).digest())
            n = pos
            while n & 1:
                right = stack.pop()
                stack[-1] = sha256(b"\x01" + stack[-1] + right).digest()
                n >>= 1
            if worker is None:
                try:
                    text = data.decode("utf-8")
                    rec, end = scan(text, 0)
                    if end != len(text):
                        raise _Fail("trailing bytes after the JSON object")
                    apply(rec, pos)
                except _Fail as exc:
                    raise fail("record", exc.reason, position=pos) from None
                except StopIteration:
                    raise fail("record", "record is not valid JSON", position=pos) from None
                except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
                    raise fail("record", f"malformed record: {exc!r}", position=pos) from None
            elif worker.feed(data, pos):
                raise replay_failed(*worker.finish()[0])  # type: ignore[misc]
            pos += 1
            if pos == next_held:
                next_held = check_held()
            if pos >= next_progress:
                next_progress += PROGRESS_EVERY
                if progress is not None:
                    progress(pos)
        elif line[:2] == b"C ":
            if line[-1:] != b"\n":
                raise fail("checkpoint", "truncated checkpoint line", checkpoint=pos)
            try:
                note = b64decode_strict(line[2:-1])
            except ValueError as exc:
                raise fail("checkpoint", f"checkpoint line: {exc}", checkpoint=pos) from None
            try:
                cp = open_checkpoint(note, verifiers)
            except NoteError as exc:
                raise fail("checkpoint", f"checkpoint note: {exc}", checkpoint=pos) from None
            if cp.origin != origin:
                raise fail(
                    "checkpoint",
                    f"checkpoint origin {cp.origin!r} is not {origin!r}",
                    checkpoint=cp.size,
                )
            if cp.size <= last_cp_size:
                raise fail(
                    "checkpoint",
                    f"checkpoint sizes must increase (previous {last_cp_size})",
                    checkpoint=cp.size,
                )
            if cp.size > pos:
                raise fail(
                    "record",
                    f"record {pos} missing: checkpoint at size {cp.size} follows record {pos - 1}",
                    position=pos,
                )
            if cp.size < pos:
                raise fail(
                    "checkpoint",
                    f"checkpoint for size {cp.size} placed after record {pos - 1}",
                    checkpoint=cp.size,
                )
            if merkle_root() != cp.root:
                where = f"records {max(last_cp_size, 0)}..{pos - 1}" if pos else "the empty log"
                raise fail(
                    "checkpoint",
                    f"signed root does not match the Merkle root of the records "
                    f"(history altered in {where}, or the checkpoint is inconsistent with it)",
                    checkpoint=cp.size,
                )
            last_cp_size = cp.size
            cp_sizes.append(cp.size)
            checkpoints += 1
            summary.checkpoint_size = cp.size
            summary.checkpoint_root = b64encode(cp.root)
        elif line[:4] == b"end ":
            if line != b"end %d %d\n" % (pos, checkpoints):
                raise fail(
                    "end",
                    f"end line {line[:80]!r} does not match {pos} records and "
                    f"{checkpoints} checkpoints",
                    checkpoint=last_cp_size,
                )
            if last_cp_size != pos:
                raise fail(
                    "end",
                    f"records {max(last_cp_size, 0)}..{pos - 1} are not covered by a signed "
                    "checkpoint",
                    checkpoint=last_cp_size,
                )
            ended = True
        else:
            raise fail("record", f"unknown line {line[:40]!r}", position=pos)
    if not ended:
        raise fail("bundle", "bundle ends without its end line (truncated?)", position=pos)
    if waiting:
        raise fail("end", held_beyond(pos, waiting[0].size), checkpoint=waiting[0].size)
    # every posting has both sides in one currency, so this holds by construction; it is
    # recomputed from the account totals once, as an independent cross-check
    if worker is not None:
        earlier, remote = worker.finish()
        if earlier is not None:
            raise replay_failed(*earlier)
        assert remote is not None
        ledger = remote
    net = ledger.net_by_currency()
    if any(net.values()):
        raise fail("end", f"currencies do not balance over all accounts: {net}")
    summary.records = pos
    summary.checkpoints = checkpoints
    summary.chain_head = b64encode(head)
    summary.held_checkpoints = held_checked
    ledger.fill(summary)
    summary.seconds = time.perf_counter() - started
    return summary


def _replay_block(ledger: _Ledger, datas: list[bytes], start: int) -> tuple[int, str] | None:
    """Replay consecutive records from position `start`; the first failure, if any."""
    scan = _SCAN
    apply = ledger.apply
    pos = start
    for data in datas:
        try:
            text = data.decode("utf-8")
            rec, end = scan(text, 0)
            if end != len(text):
                raise _Fail("trailing bytes after the JSON object")
            apply(rec, pos)
        except _Fail as exc:
            return pos, exc.reason
        except StopIteration:
            return pos, "record is not valid JSON"
        except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
            return pos, f"malformed record: {exc!r}"
        pos += 1
    return None


def _replay_worker_main(conn: Connection, platform: str) -> None:
    """The replay process: blocks of records in, the first failure or the final state out."""
    gc.disable()
    ledger = _Ledger(platform)
    failed = False
    while True:
        msg = conn.recv_bytes()
        if msg[:1] == b"B":
            if not failed:
                start = int.from_bytes(msg[1:9], "big")
                failure = _replay_block(ledger, msg[9:].split(b"\n"), start)
                if failure is not None:
                    failed = True
                    conn.send(("fail", failure))
        else:  # b"E"
            conn.send(("end", None) if failed else ("ok", ledger))
            conn.close()
            return


class _ReplayWorker:
    """Runs the replay in another process, fed with blocks of record bytes over a pipe."""

    BLOCK = 2048

    def __init__(self, platform: str) -> None:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(  # type: ignore[attr-defined]
            target=_replay_worker_main, args=(child, platform), daemon=True
        )
        self.proc.start()
        child.close()
        self.block: list[bytes] = []
        self.start = 0
        self.failure: tuple[int, str] | None = None
        self.result: tuple[tuple[int, str] | None, _Ledger | None] | None = None

    def _flush(self) -> None:
        if self.block:
            self.conn.send_bytes(b"B" + self.start.to_bytes(8, "big") + b"\n".join(self.block))
            self.start += len(self.block)
            self.block = []

    def feed(self, data: bytes, pos: int) -> bool:
        """Queue record `pos`; True when the worker has already reported a failure."""
        block = self.block
        block.append(data)
        if len(block) >= self.BLOCK:
            self._flush()
            if self.conn.poll():
                kind, value = self.conn.recv()
                if kind == "fail":
                    self.failure = value
                    return True
        return False

    def finish(self) -> tuple[tuple[int, str] | None, _Ledger | None]:
        """Replay everything queued; (first failure, None) or (None, final replay state)."""
        if self.result is not None:
            return self.result
        remote: _Ledger | None = None
        try:
            if self.failure is None:
                self._flush()
            self.conn.send_bytes(b"E")
            while True:
                kind, value = self.conn.recv()
                if kind == "fail":
                    self.failure = value
                elif kind == "ok":
                    remote = value
                    break
                else:
                    break
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"the replay process died: {exc!r}") from None
        self.result = (self.failure, remote)
        return self.result

    def close(self) -> None:
        self.conn.close()
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


def _position_problem(found: bytes, expected: int) -> str:
    try:
        text = found.decode("ascii")
        value = int(text) if text.isdigit() else None
    except UnicodeDecodeError:
        value = None
    if value is None or str(value) != found.decode("ascii", "replace"):
        return f"malformed position {found[:24]!r}"
    if value > expected:
        return f"record {expected} missing (found record {value} in its place)"
    return f"record {value} out of order or duplicated (expected record {expected})"
