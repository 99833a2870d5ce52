"""Applies one decoded record to a platform's live state. Writer and replay share this code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from controls.policy import policy_from_record
from ledger import records
from ledger.domain import (
    Account,
    AccountKind,
    AccountStatus,
    Alert,
    Done,
    Hold,
    HoldStatus,
    PendingRequest,
    PlatformState,
    Standing,
)
from ledger.domain import StateError as StateError

_STATUS_BY_KIND = {
    "account_frozen": AccountStatus.FROZEN,
    "account_unfrozen": AccountStatus.OPEN,
    "account_closed": AccountStatus.CLOSED,
}
_HOLD_STATUS = {s.value: s for s in HoldStatus}
_EFFECT_KEYS = frozenset({"entries", "hold", "resolve", "account", "subject", "reverses"})
_CUSTOMER = AccountKind.CUSTOMER
# record kinds counted against per-account daily limits, by the operation that produced them
COUNTED_KINDS = {
    "transferred": "transfer",
    "hold_placed": "place_hold",
    "withdrawal_requested": "request_withdrawal",
    "fee_charged": "charge_fee",
}


def apply_record(state: PlatformState, rec: dict[str, Any], fingerprint: int | None) -> None:
    """Fold `rec` into `state`. `fingerprint` is the instruction's idempotency fingerprint."""
    seq = rec["seq"]
    ts = rec["ts"]
    if seq != state.next_seq or rec["platform"] != state.platform_id or ts < state.last_ts_ms:
        raise StateError(_misplaced(state, rec))
    state.roll_day(ts)
    kind = rec["kind"]
    if kind != records.REFUSED_KIND:
        entries = rec.get("entries")
        if entries is not None:  # the hot path: plain postings
            if not state.created:
                raise StateError(f"record {seq}: postings before the platform was created")
            post = state.post
            for debit, credit, amount in entries:
                post(debit, credit, amount, seq)
            reverses = rec.get("reverses")
            if reverses is not None:
                _check_mirror(state, reverses, entries, seq)
                state.mark_reversed(reverses, rec["cid"], seq)
            posted = entries
        else:
            posted = _posted(state, rec)
            _apply_accepted(state, rec, kind, seq)
        executes = rec.get("executes")
        if executes is not None:
            _executed(state, executes, rec["cid"], seq)
        settles = rec.get("settles")
        if settles is not None:
            _settled(state, settles, posted, seq)
        _note_activity(state, rec, kind, posted)
        if fingerprint is not None:
            state.add_done(rec["cid"], Done(fingerprint, seq, kind, posted))
    else:
        failed = rec.get("auth_failed")
        if failed is not None:
            state.put(state.auth_failures, failed, (*state.auth_failures.get(failed, ()), ts))
    state.next_seq = seq + 1
    state.last_ts_ms = ts


def _note_activity(
    state: PlatformState, rec: dict[str, Any], kind: str, posted: list[list[Any]] | None
) -> None:
    """Per-day tables the limits, outflow and large-value controls read; nonces consumed."""
    accounts = state.accounts
    # outside a linked batch nothing needs undoing: a plain dict store (this runs per movement)
    put: Callable[[dict[Any, Any], Any, Any], None] = (
        dict.__setitem__ if state._sp is None else state.put
    )
    op = COUNTED_KINDS.get(kind)
    if op is not None:
        hold = rec.get("hold")
        debit_id, credit_id, amount = (
            (hold["debit"], hold["credit"], hold["amount"]) if hold else posted[0]  # type: ignore[index]
        )
        debit = accounts[debit_id]
        if debit.kind is _CUSTOMER:
            key = (debit_id, op)
            total, count = state.day_counters.get(key, (0, 0))
            put(state.day_counters, key, (total + amount, count + 1))
            if op == "request_withdrawal":
                ccy = debit.currency
                put(state.day_outflow, ccy, state.day_outflow.get(ccy, 0) + amount)
    if posted:
        lvt = state.day_lvt
        for debit_id, credit_id, amount in posted:
            if accounts[debit_id].kind is _CUSTOMER:
                key = (debit_id, "out")
                put(lvt, key, lvt.get(key, 0) + amount)
            credit = accounts[credit_id]
            if credit.kind is _CUSTOMER:
                key = (credit_id, "in")
                put(lvt, key, lvt.get(key, 0) + amount)
                if kind == "deposited":
                    ccy = credit.currency
                    put(state.day_outflow, ccy, state.day_outflow.get(ccy, 0) - amount)
    cmd = rec["cmd"]
    # The writer hands over the command as raw canonical bytes unless it carries something the
    # state keeps (an authorisation nonce, account facts, a request); replay always decodes it.
    if type(cmd) is dict:
        auth = cmd.get("auth")
        if auth is not None and auth.get("nonce"):
            account_id = cmd.get("from_account_id") or cmd.get("account_id")
            put(state.nonces, (account_id, auth["nonce"]), auth["expires_at_ms"])


def _settled(
    state: PlatformState, reconciliation_id: str, posted: list[list[Any]] | None, seq: int
) -> None:
    """A settlement reduces what is left of a reconciliation's difference, never past zero."""
    assert state._sp is None, "settlements never run inside a linked batch"
    open_ = state.reconciliation_open.get(reconciliation_id)
    amount = sum(e[2] for e in posted or ())
    if open_ is None or not 0 < amount <= abs(open_[1]):
        raise StateError(f"record {seq}: settles more than {reconciliation_id!r} has left")
    currency, left = open_
    left = left + amount if left < 0 else left - amount
    if left:
        state.reconciliation_open[reconciliation_id] = (currency, left)
    else:
        del state.reconciliation_open[reconciliation_id]
        state.reconciliation_ids.add(reconciliation_id)


def _executed(state: PlatformState, request_id: str, by_cid: str, seq: int) -> None:
    request = state.requests.get(request_id)
    if request is None or request.status != "pending":
        raise StateError(f"record {seq}: request {request_id!r} is not pending")
    request.status = "approved"
    request.executed_by = by_cid


def _check_mirror(state: PlatformState, reverses: str, entries: list[list[Any]], seq: int) -> None:
    """A reversal posts exactly the mirror image of what it reverses, nothing else."""
    original = state.done.get(reverses)
    if original is None or not original.entries:
        raise StateError(f"record {seq}: reverses unknown movement {reverses!r}")
    mirror = [[credit, debit, amount] for debit, credit, amount in original.entries]
    if entries != mirror:
        raise StateError(f"record {seq}: reversal of {reverses!r} is not its mirror image")


def _misplaced(state: PlatformState, rec: dict[str, Any]) -> str:
    seq = rec["seq"]
    if seq != state.next_seq:
        return f"record {seq}: expected position {state.next_seq}"
    if rec["platform"] != state.platform_id:
        return f"record {seq}: belongs to platform {rec['platform']!r}"
    return f"record {seq}: time goes backwards"


def recorded_postings(state: PlatformState, rec: dict[str, Any]) -> list[list[Any]] | None:
    """What an accepted record's Done row keeps as its postings: read back from the record when
    the row lives in the done table's base (ledger/snapshot.py)."""
    return _posted(state, rec)


def _posted(state: PlatformState, rec: dict[str, Any]) -> list[list[Any]] | None:
    """The postings a record made, so that a later reversal can undo exactly those."""
    entries = rec.get("entries")
    if entries is not None:
        return entries  # type: ignore[no-any-return]
    posted = []
    for hold_id, captured, _ in rec.get("resolve", ()):
        if captured:
            hold = state.holds[hold_id]
            posted.append([hold.debit, hold.credit, captured])
    return posted or None


def _apply_accepted(state: PlatformState, rec: dict[str, Any], kind: str, seq: int) -> None:
    """Everything but plain postings, which `apply_record` folds itself."""
    if kind == "platform_created":
        if seq != 0 or state.created or _EFFECT_KEYS.intersection(rec):
            raise StateError(f"record {seq}: platform_created must come first and move nothing")
        state.created = True
        if "policy" in rec:
            state.policy = policy_from_record(rec["policy"])
            state.day = -1  # the day boundary may differ from the default's
            state.roll_day(rec["ts"])
        return
    if not state.created:
        raise StateError(f"record {seq}: platform not created yet")
    hold = rec.get("hold")
    if hold is not None:
        state.reserve(
            Hold(
                hold["id"],
                hold["debit"],
                hold["credit"],
                hold["amount"],
                hold["expires"],
                hold["reason"],
                hold["kind"],
                seq,
                hold.get("owner", ""),
            )
        )
        return
    resolve = rec.get("resolve")
    if resolve is not None:
        for hold_id, captured, status in resolve:
            state.resolve(hold_id, captured, _HOLD_STATUS[status], seq)
        return
    _apply_lifecycle(state, rec, kind, seq)


def _apply_lifecycle(state: PlatformState, rec: dict[str, Any], kind: str, seq: int) -> None:
    if kind == "account_opened":
        spec = rec["account"]
        account = Account(
            spec["id"],
            AccountKind(spec["kind"]),
            spec["ccy"],
            spec["role"],
            seq,
            spec.get("holder"),
        )
        _account_opened_extras(account, rec)
        state.add_account(account)
        return
    status = _STATUS_BY_KIND.get(kind)
    if status is not None:
        state.set_status(state.accounts[rec["subject"]], status, seq)
        return
    governance = _GOVERNANCE.get(kind)
    if governance is None:
        raise StateError(f"record {seq}: unknown record kind {kind!r}")
    assert state._sp is None, "governance records never run inside a linked batch"
    governance(state, rec, seq)


def _account_opened_extras(account: Account, rec: dict[str, Any]) -> None:
    cmd = rec["cmd"]
    assert type(cmd) is dict
    account.holder_blind = cmd.get("holder_name")
    account.holder_type = cmd.get("holder_type", "individual")
    account.public_key = cmd.get("public_key", "")
    account.tokens = tuple(rec["account"].get("screen", ()))


def _policy_set(state: PlatformState, rec: dict[str, Any], seq: int) -> None:
    policy = policy_from_record(rec["policy"])
    if policy.version != state.policy.version + 1:
        raise StateError(f"record {seq}: policy version {policy.version} out of order")
    state.policy = policy


def _gate_set(state: PlatformState, rec: dict[str, Any], seq: int) -> None:
    state.gate = rec["gate"]


def _key_registered(state: PlatformState, rec: dict[str, Any], seq: int) -> None:
    key = rec["key"]
    state.accounts[key["account"]].public_key = key["pub"]


def _payee_bound(state: PlatformState, rec: dict[str, Any], seq: int) -> None:
    payee = rec["payee"]
    account = state.accounts[payee["account"]]
    account.payee_replaced = bool(account.payee_ref)
    account.payee_ref = payee["ref"]
    account.payee_bank = payee["bank"]
    account.payee_bound_ms = rec["ts"]
    token = payee.get("screen")
    if token:
        account.tokens = (*account.tokens, token)


def _standing_granted(state: PlatformState, rec: dict[str, Any], seq: int) -> None:
    spec = rec["standing"]
    if spec["id"] in state.standing:
        raise StateError(f"record {seq}: standing authorisation {spec['id']!r} granted twice")
    state.standing[spec["id"]] = Standing(
        spec["id"], spec["account"], spec["purpose"], spec["payee"], spec["cap"], spec["until"]
    )


def _standing_revoked(state: PlatformState, rec: dict[str, Any], seq: int) -> None:
    state.standing[rec["revokes"]].revoked = True


def _approval_requested(state: PlatformState, rec: dict[str, Any], seq: int) -> None:
    spec = rec["request"]
    if spec["id"] in state.requests:
        raise StateError(f"record {seq}: request {spec['id']!r} made twice")
    state.requests[spec["id"]] = PendingRequest(
        spec["id"], spec["op"], rec["cmd"], rec["actor"], spec["expires"], seq
    )


def _approval_rejected(state: PlatformState, rec: dict[str, Any], seq: int) -> None:
    request = state.requests.get(rec["rejects"])
    if request is None or request.status != "pending":
        raise StateError(f"record {seq}: request {rec['rejects']!r} is not pending")
    request.status = "rejected"


def _liabilities_published(state: PlatformState, rec: dict[str, Any], seq: int) -> None:
    """A statement only: the tree is checked by customers and auditors, not by the state."""
    spec = rec["liabilities"]
    if spec["snapshot"] > seq:
        raise StateError(f"record {seq}: a liabilities snapshot after its own record")
    state.liabilities[(spec["asset"], spec["snapshot"])] = seq


def _reconciliation_completed(state: PlatformState, rec: dict[str, Any], seq: int) -> None:
    spec = rec["reconciliation"]
    state.reconciliations[spec["ccy"]] = {**spec, "seq": seq}
    if spec["difference"]:
        state.reconciliation_open[spec["id"]] = (spec["ccy"], spec["difference"])
    else:
        state.reconciliation_ids.add(spec["id"])


def _alert_raised(state: PlatformState, rec: dict[str, Any], seq: int) -> None:
    spec = rec["alert"]
    if spec["id"] in state.alerts:
        raise StateError(f"record {seq}: alert {spec['id']!r} raised twice")
    state.alerts[spec["id"]] = Alert(spec["id"], spec["rule"], spec["level"], spec["subject"], seq)


def _alert_step(state: PlatformState, rec: dict[str, Any], seq: int) -> None:
    closing = rec["kind"] == "alert_closed"
    alert = state.alerts.get(rec["alert_closed" if closing else "alert_acknowledged"])
    if alert is None or alert.status == "closed":
        raise StateError(f"record {seq}: alert is unknown or closed")
    alert.status = "closed" if closing else "acknowledged"


_GOVERNANCE = {
    "policy_set": _policy_set,
    "gate_set": _gate_set,
    "key_registered": _key_registered,
    "payee_bound": _payee_bound,
    "standing_granted": _standing_granted,
    "standing_revoked": _standing_revoked,
    "approval_requested": _approval_requested,
    "approval_rejected": _approval_rejected,
    "liabilities_published": _liabilities_published,
    "reconciliation_completed": _reconciliation_completed,
    "alert_raised": _alert_raised,
    "alert_acknowledged": _alert_step,
    "alert_closed": _alert_step,
}
