"""Turns a validated instruction into a proposal (what it would do) and the record's effect fields.

Planning refuses only what the generic controls cannot see (an unknown hold, a movement that
is not reversible); everything else is left to `controls.registry.run_controls`. Nothing here
mutates state: the caller applies the record after every control has accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from controls.base import Proposal, Refusal
from controls.codes import Code
from controls.policy import DEFAULT_POLICY, policy_problem
from ledger import commands as c
from ledger.domain import CUSTOMER_MONEY_KINDS, AccountKind, HoldStatus, PlatformState

Effects = dict[str, Any]
Plan = tuple[Proposal, Effects] | Refusal

PLAN_CONTROL = "integrity"
REVERSIBLE_KINDS = frozenset(
    {"deposited", "transferred", "fee_charged", "shortfall_topped_up", "hold_captured"}
)


def _refuse(code: Code, message: str) -> Refusal:
    return Refusal(code, PLAN_CONTROL, message)


def _move(op: str, cmd: Any, debit: str, credit: str) -> Plan:
    amount = cmd.amount_minor
    proposal = Proposal(op, cmd, cmd.currency, entries=((debit, credit, amount),))
    return proposal, {"ccy": cmd.currency, "entries": [[debit, credit, amount]]}


def plan_deposit(state: PlatformState, cmd: c.Deposit) -> Plan:
    return _move("deposit", cmd, cmd.mirror_account_id, cmd.account_id)


def plan_transfer(state: PlatformState, cmd: c.Transfer) -> Plan:
    return _move("transfer", cmd, cmd.from_account_id, cmd.to_account_id)


def plan_fee(state: PlatformState, cmd: c.ChargeFee) -> Plan:
    return _move("charge_fee", cmd, cmd.from_account_id, cmd.to_account_id)


def plan_top_up(state: PlatformState, cmd: c.TopUpShortfall) -> Plan:
    return _move("top_up_shortfall", cmd, cmd.from_account_id, cmd.to_account_id)


def _new_hold(
    op: str, cmd: Any, debit: str, credit: str, reason: str, hold_kind: str, now_ms: int
) -> Plan:
    if not reason:
        return _refuse(Code.HOLD_REASON_REQUIRED, "a hold needs a reason")
    if cmd.expires_at_ms <= now_ms:
        return _refuse(Code.HOLD_EXPIRY_INVALID, "a hold's expiry must be in the future")
    amount = cmd.amount_minor
    proposal = Proposal(op, cmd, cmd.currency, hold=(debit, credit, amount))
    hold = {
        "id": cmd.client_id,
        "debit": debit,
        "credit": credit,
        "amount": amount,
        "expires": cmd.expires_at_ms,
        "reason": reason,
        "kind": "withdrawal" if op == "request_withdrawal" else "hold",
    }
    owner_ref = getattr(cmd, "owner_ref", "")
    if owner_ref:
        hold["owner"] = owner_ref
    return proposal, {"ccy": cmd.currency, "hold": hold}


def plan_place_hold(state: PlatformState, cmd: c.PlaceHold, now_ms: int) -> Plan:
    return _new_hold(
        "place_hold", cmd, cmd.from_account_id, cmd.to_account_id, cmd.reason, "hold", now_ms
    )


def plan_withdrawal(state: PlatformState, cmd: c.RequestWithdrawal, now_ms: int) -> Plan:
    if not cmd.payee_ref:
        return _refuse(Code.INVALID_ARGUMENT, "a withdrawal needs the payee reference")
    return _new_hold(
        "request_withdrawal",
        cmd,
        cmd.account_id,
        cmd.mirror_account_id,
        f"withdrawal to {cmd.payee_ref}",
        "withdrawal",
        now_ms,
    )


def _pending_hold(state: PlatformState, hold_id: str, kind: str) -> Any:
    hold = state.holds.get(hold_id)
    if hold is None or hold.kind != kind:
        return _refuse(Code.HOLD_NOT_FOUND, f"no {kind} {hold_id!r}")
    if hold.status is not HoldStatus.PENDING:
        return _refuse(Code.HOLD_NOT_PENDING, f"{kind} {hold_id!r} is already {hold.status}")
    return hold


def _resolve(op: str, cmd: Any, hold: Any, captured: int, status: HoldStatus) -> Plan:
    entries = ((hold.debit, hold.credit, captured),) if captured else ()
    proposal = Proposal(op, cmd, None, entries=entries)
    proposal.resolving = hold
    return proposal, {"resolve": [[hold.id, captured, status.value]]}


def plan_capture(state: PlatformState, cmd: c.CaptureHold, now_ms: int) -> Plan:
    hold = _pending_hold(state, cmd.hold_id, "hold")
    if isinstance(hold, Refusal):
        return hold
    if hold.expires_at_ms <= now_ms:
        # Expired reservations are void even before the sweep records it; a payout the bank
        # already made (withdrawal settlement) is a fact and is not subject to this rule.
        return _refuse(Code.HOLD_EXPIRED, f"hold {hold.id!r} expired")
    if type(cmd.amount_minor) is not int or cmd.amount_minor < 1:
        return _refuse(Code.INVALID_AMOUNT, "capture amount must be at least 1")
    if cmd.amount_minor > hold.amount_minor:
        return _refuse(Code.HOLD_EXCEEDED, "capture exceeds the held amount")
    plan = _resolve("capture_hold", cmd, hold, cmd.amount_minor, HoldStatus.CAPTURED)
    assert not isinstance(plan, Refusal)
    plan[1]["ccy"] = state.accounts[hold.debit].currency
    return plan


def plan_release(state: PlatformState, cmd: c.ReleaseHold) -> Plan:
    hold = _pending_hold(state, cmd.hold_id, "hold")
    if isinstance(hold, Refusal):
        return hold
    return _resolve("release_hold", cmd, hold, 0, HoldStatus.RELEASED)


def plan_settle(state: PlatformState, cmd: c.SettleWithdrawal) -> Plan:
    hold = _pending_hold(state, cmd.withdrawal_id, "withdrawal")
    if isinstance(hold, Refusal):
        return hold
    plan = _resolve("settle_withdrawal", cmd, hold, hold.amount_minor, HoldStatus.CAPTURED)
    assert not isinstance(plan, Refusal)
    plan[1]["ccy"] = state.accounts[hold.debit].currency
    return plan


def plan_fail(state: PlatformState, cmd: c.FailWithdrawal) -> Plan:
    hold = _pending_hold(state, cmd.withdrawal_id, "withdrawal")
    if isinstance(hold, Refusal):
        return hold
    return _resolve("fail_withdrawal", cmd, hold, 0, HoldStatus.RELEASED)


def plan_expire(state: PlatformState, cmd: c.ExpireHolds, now_ms: int) -> Plan:
    expired: list[list[Any]] = []
    for h in state.pending_holds.values():
        if h.expires_at_ms <= now_ms:
            expired.append([h.id, 0, HoldStatus.EXPIRED.value])
            if len(expired) == cmd.max_holds:
                break
    return Proposal("expire_holds", cmd), {"resolve": expired}


def plan_reverse(state: PlatformState, cmd: c.Reverse) -> Plan:
    movement_id = cmd.movement_id
    request = state.requests.get(movement_id)
    if request is not None and request.executed_by is not None:
        movement_id = request.executed_by  # an approved request: reverse what executed it
    original = state.done.get(movement_id)
    if original is None:
        return _refuse(Code.MOVEMENT_NOT_FOUND, f"no movement {cmd.movement_id!r}")
    if original.kind not in REVERSIBLE_KINDS or not original.entries:
        return _refuse(Code.NOT_REVERSIBLE, f"a {original.kind} record cannot be reversed")
    if original.reversed_by is not None:
        return _refuse(Code.ALREADY_REVERSED, f"already reversed by {original.reversed_by!r}")
    entries = tuple((credit, debit, amount) for debit, credit, amount in original.entries)
    currency = state.accounts[entries[0][0]].currency
    proposal = Proposal("reverse", cmd, currency, entries=entries)
    return proposal, {
        "ccy": currency,
        "entries": [list(e) for e in entries],
        "reverses": movement_id,
    }


def plan_open(state: PlatformState, cmd: c.OpenAccount) -> Plan:
    if cmd.account_id in state.accounts:
        return _refuse(Code.ACCOUNT_EXISTS, f"account {cmd.account_id!r} exists")
    account: dict[str, Any] = {
        "id": cmd.account_id,
        "kind": cmd.kind,
        "ccy": cmd.currency,
        "role": cmd.role,
    }
    return Proposal("open_account", cmd, cmd.currency), {"account": account}


def _lifecycle(op: str) -> Callable[[PlatformState, Any], Plan]:
    def plan(state: PlatformState, cmd: Any) -> Plan:
        return Proposal(op, cmd, subject=cmd.account_id), {"subject": cmd.account_id}

    return plan


def plan_create_platform(state: PlatformState, cmd: c.CreatePlatform) -> Plan:
    if state.created:
        return _refuse(Code.PLATFORM_EXISTS, "the platform already exists")
    policy = cmd.policy if cmd.policy is not None else DEFAULT_POLICY
    problem = policy_problem(policy)
    if problem is None and policy.version != 0:
        problem = "a platform starts at policy version 0"
    if problem is not None:
        return _refuse(Code.POLICY_INVALID, problem)
    return Proposal("create_platform", cmd), {
        "name": cmd.name,
        "policy": msgspec.to_builtins(policy, order="sorted"),
    }


def _customer(state: PlatformState, account_id: str) -> Any:
    account = state.accounts.get(account_id)
    if account is None or account.kind is not AccountKind.CUSTOMER:
        return _refuse(Code.ACCOUNT_NOT_FOUND, f"no customer account {account_id!r}")
    if account.status == "closed":
        return _refuse(Code.ACCOUNT_CLOSED, f"account {account_id!r} is closed")
    return account


def plan_register_key(state: PlatformState, cmd: Any) -> Plan:
    """register_key (the customer's own rotation) and reset_key (operator, maker-checker)."""
    account = _customer(state, cmd.account_id)
    if isinstance(account, Refusal):
        return account
    op = "register_key" if type(cmd) is c.RegisterKey else "reset_key"
    return Proposal(op, cmd), {"key": {"account": account.id, "pub": cmd.public_key}}


def plan_bind_payee(state: PlatformState, cmd: c.BindPayee) -> Plan:
    account = _customer(state, cmd.account_id)
    if isinstance(account, Refusal):
        return account
    # the writer adds the sealed bank account and its screening token
    return Proposal("bind_payee", cmd), {"payee": {"account": account.id, "ref": cmd.payee_ref}}


def plan_grant_standing(state: PlatformState, cmd: c.GrantStanding, now_ms: int) -> Plan:
    account = _customer(state, cmd.account_id)
    if isinstance(account, Refusal):
        return account
    if cmd.standing_id in state.standing:
        return _refuse(Code.INVALID_ARGUMENT, f"standing authorisation {cmd.standing_id!r} exists")
    if not now_ms < cmd.valid_until_ms <= now_ms + state.policy.standing_max_ms:
        return _refuse(
            Code.AUTHORISATION_INVALID, "a standing authorisation's validity is out of range"
        )
    spec = {
        "id": cmd.standing_id,
        "account": account.id,
        "purpose": cmd.purpose,
        "payee": cmd.payee_account_id,
        "cap": cmd.per_txn_max_minor,
        "until": cmd.valid_until_ms,
    }
    return Proposal("grant_standing", cmd), {"standing": spec}


def plan_revoke_standing(state: PlatformState, cmd: c.RevokeStanding) -> Plan:
    standing = state.standing.get(cmd.standing_id)
    if standing is None or standing.account != cmd.account_id or standing.revoked:
        return _refuse(Code.STANDING_NOT_FOUND, f"no standing authorisation {cmd.standing_id!r}")
    return Proposal("revoke_standing", cmd), {"revokes": cmd.standing_id}


def plan_set_policy(state: PlatformState, cmd: c.SetPolicy) -> Plan:
    problem = policy_problem(cmd.policy)
    if problem is not None:
        return _refuse(Code.POLICY_INVALID, problem)
    if cmd.policy.version != state.policy.version + 1:
        return _refuse(
            Code.POLICY_VERSION_CONFLICT,
            f"the next policy version is {state.policy.version + 1}",
        )
    return Proposal("set_policy", cmd), {"policy": msgspec.to_builtins(cmd.policy, order="sorted")}


def plan_set_gate(state: PlatformState, cmd: c.SetGate) -> Plan:
    if cmd.gate == state.gate:
        return _refuse(Code.GATE_UNCHANGED, f"the platform is already {cmd.gate}")
    return Proposal("set_gate", cmd), {"gate": cmd.gate}


def plan_publish_liabilities(state: PlatformState, cmd: c.PublishLiabilities) -> Plan:
    if cmd.snapshot_size > state.next_seq:
        return _refuse(Code.INVALID_ARGUMENT, "the snapshot cannot be after the log's end")
    if not any(a.currency == cmd.currency for a in state.accounts.values()):
        return _refuse(Code.CURRENCY_MISMATCH, f"no account holds {cmd.currency}")
    if (cmd.currency, cmd.snapshot_size) in state.liabilities:
        return _refuse(
            Code.INVALID_ARGUMENT, "a statement for this currency and snapshot is published"
        )
    spec = {
        "snapshot": cmd.snapshot_size,
        "asset": cmd.currency,
        "depth": cmd.depth,
        "root": cmd.root,
        "total": cmd.total_minor,
    }
    return Proposal("publish_liabilities", cmd), {"liabilities": spec}


def plan_reconciliation(state: PlatformState, cmd: c.RecordReconciliation) -> Plan:
    if cmd.snapshot_size > state.next_seq:
        return _refuse(Code.INVALID_ARGUMENT, "the snapshot cannot be after the log's end")
    if cmd.reconciliation_id in state.reconciliation_ids or cmd.reconciliation_id in (
        state.reconciliation_open
    ):
        return _refuse(Code.INVALID_ARGUMENT, f"reconciliation {cmd.reconciliation_id!r} exists")
    latest = state.reconciliations.get(cmd.currency)
    if latest is not None and latest["as_of"] == cmd.as_of_ms:  # e.g. a re-run of the day
        return _refuse(
            Code.INVALID_ARGUMENT, f"{cmd.currency} is reconciled at {cmd.as_of_ms} already"
        )
    if cmd.snapshot_size == state.next_seq:  # taken now: the requirement is checkable here
        requirement = sum(
            a.posted_minor
            for a in state.accounts.values()
            if a.currency == cmd.currency and a.kind in CUSTOMER_MONEY_KINDS
        )
        if requirement != cmd.requirement_minor:
            return _refuse(
                Code.INVALID_ARGUMENT, f"the requirement at this position is {requirement}"
            )
    spec = {
        "id": cmd.reconciliation_id,
        "ccy": cmd.currency,
        "as_of": cmd.as_of_ms,
        "snapshot": cmd.snapshot_size,
        "statements": list(cmd.statements),
        "closing": cmd.bank_closing_minor,
        "transit": cmd.in_transit_minor,
        "requirement": cmd.requirement_minor,
        "difference": cmd.difference_minor,
        "breaks": cmd.breaks,
        "result": cmd.result,
    }
    return Proposal("record_reconciliation", cmd), {"reconciliation": spec}


def plan_settle_reconciliation(state: PlatformState, cmd: c.SettleReconciliation) -> Plan:
    """Covers a shortfall (own -> platform bank) or returns an excess (platform bank -> own),
    never more than what is left of the recorded difference."""
    open_ = state.reconciliation_open.get(cmd.reconciliation_id)
    if open_ is None:
        return _refuse(
            Code.INVALID_ARGUMENT, f"no unsettled reconciliation {cmd.reconciliation_id!r}"
        )
    currency, left = open_
    if cmd.currency != currency:
        return _refuse(Code.CURRENCY_MISMATCH, f"the reconciliation is in {currency}")
    if cmd.amount_minor > abs(left):
        return _refuse(Code.INVALID_AMOUNT, f"only {abs(left)} is left to settle")
    own, bank = cmd.own_account_id, cmd.platform_bank_account_id
    debit, credit = (own, bank) if left < 0 else (bank, own)
    planned = _move("settle_reconciliation", cmd, debit, credit)
    assert not isinstance(planned, Refusal)
    planned[1]["settles"] = cmd.reconciliation_id
    return planned


def plan_raise_alert(state: PlatformState, cmd: c.RaiseAlert) -> Plan:
    if cmd.alert_id in state.alerts:
        return _refuse(Code.ALERT_EXISTS, f"alert {cmd.alert_id!r} exists")
    spec = {"id": cmd.alert_id, "rule": cmd.rule, "level": cmd.level, "subject": cmd.subject}
    return Proposal("raise_alert", cmd), {"alert": spec}


def plan_alert_step(state: PlatformState, cmd: Any) -> Plan:
    """acknowledge_alert and close_alert: the alerts control checks who may, by level."""
    alert = state.alerts.get(cmd.alert_id)
    if alert is None:
        return _refuse(Code.ALERT_NOT_FOUND, f"no alert {cmd.alert_id!r}")
    if alert.status == "closed":
        return _refuse(Code.ALERT_CLOSED, f"alert {cmd.alert_id!r} is closed")
    op = "close_alert" if type(cmd) is c.CloseAlert else "acknowledge_alert"
    proposal = Proposal(op, cmd)
    proposal.request = alert  # what the alerts control judges
    key = "alert_closed" if op == "close_alert" else "alert_acknowledged"
    return proposal, {key: cmd.alert_id}


def plan_approve(state: PlatformState, cmd: c.ApproveRequest) -> Plan:
    """The approval's own checks; the writer then plans and checks the request's command."""
    proposal = Proposal("approve_request", cmd)
    proposal.request = state.requests.get(cmd.request_id)
    return proposal, {"executes": cmd.request_id}


def plan_reject(state: PlatformState, cmd: c.RejectRequest) -> Plan:
    proposal = Proposal("reject_request", cmd)
    proposal.request = state.requests.get(cmd.request_id)
    return proposal, {"rejects": cmd.request_id}


_PLANNERS: dict[type, Callable[[PlatformState, Any], Plan]] = {
    c.CreatePlatform: plan_create_platform,
    c.OpenAccount: plan_open,
    c.FreezeAccount: _lifecycle("freeze_account"),
    c.UnfreezeAccount: _lifecycle("unfreeze_account"),
    c.CloseAccount: _lifecycle("close_account"),
    c.Deposit: plan_deposit,
    c.Transfer: plan_transfer,
    c.ChargeFee: plan_fee,
    c.TopUpShortfall: plan_top_up,
    c.ReleaseHold: plan_release,
    c.SettleWithdrawal: plan_settle,
    c.FailWithdrawal: plan_fail,
    c.Reverse: plan_reverse,
    c.RegisterKey: plan_register_key,
    c.ResetKey: plan_register_key,
    c.BindPayee: plan_bind_payee,
    c.RevokeStanding: plan_revoke_standing,
    c.SetPolicy: plan_set_policy,
    c.SetGate: plan_set_gate,
    c.ApproveRequest: plan_approve,
    c.RejectRequest: plan_reject,
    c.PublishLiabilities: plan_publish_liabilities,
    c.RecordReconciliation: plan_reconciliation,
    c.SettleReconciliation: plan_settle_reconciliation,
    c.RaiseAlert: plan_raise_alert,
    c.AcknowledgeAlert: plan_alert_step,
    c.CloseAlert: plan_alert_step,
}
_TIMED_PLANNERS: dict[type, Callable[[PlatformState, Any, int], Plan]] = {
    c.PlaceHold: plan_place_hold,
    c.CaptureHold: plan_capture,
    c.RequestWithdrawal: plan_withdrawal,
    c.ExpireHolds: plan_expire,
    c.GrantStanding: plan_grant_standing,
}


def plan(state: PlatformState, cmd: c.Command, now_ms: int) -> Plan:
    planner = _PLANNERS.get(type(cmd))
    if planner is not None:
        return planner(state, cmd)
    return _TIMED_PLANNERS[type(cmd)](state, cmd, now_ms)


__all__ = ["AccountKind", "Plan", "plan"]
