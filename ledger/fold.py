"""Applies one decoded record to a platform's live state. Writer and replay share this code."""

from __future__ import annotations

from typing import Any

from ledger import records
from ledger.domain import Account, AccountKind, AccountStatus, Done, Hold, HoldStatus, PlatformState
from ledger.domain import StateError as StateError

_STATUS_BY_KIND = {
    "account_frozen": AccountStatus.FROZEN,
    "account_unfrozen": AccountStatus.OPEN,
    "account_closed": AccountStatus.CLOSED,
}
_HOLD_STATUS = {s.value: s for s in HoldStatus}
_EFFECT_KEYS = frozenset({"entries", "hold", "resolve", "account", "subject", "reverses"})


def apply_record(state: PlatformState, rec: dict[str, Any], fingerprint: int | None) -> None:
    """Fold `rec` into `state`. `fingerprint` is the instruction's idempotency fingerprint."""
    seq = rec["seq"]
    ts = rec["ts"]
    if seq != state.next_seq or rec["platform"] != state.platform_id or ts < state.last_ts_ms:
        raise StateError(_misplaced(state, rec))
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
        if fingerprint is not None:
            state.add_done(rec["cid"], Done(fingerprint, seq, kind, posted))
    state.next_seq = seq + 1
    state.last_ts_ms = ts


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
        state.add_account(
            Account(
                spec["id"],
                AccountKind(spec["kind"]),
                spec["ccy"],
                spec["role"],
                seq,
                spec.get("holder"),
            )
        )
        return
    status = _STATUS_BY_KIND.get(kind)
    if status is None:
        raise StateError(f"record {seq}: unknown record kind {kind!r}")
    state.set_status(state.accounts[rec["subject"]], status, seq)
