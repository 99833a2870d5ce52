"""Helpers for the controls tests: customers with real Ed25519 keys, signed instructions,
platforms under the strict default policy, refusal assertions and a snapshot of everything
the controls read.

Plain functions (no pytest fixtures) so hypothesis programs can use them too.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers import (
    FakeClock,
    assert_balanced,
    last_position,
    money_state,
    record_at,
    snapshot,
)

from controls import customer_authorisation as ca
from controls.policy import DAY_MS, DEFAULT_POLICY, HOUR_MS, Policy
from ledger import commands as c
from ledger.service import LedgerService
from ledger.writer import Outcome

PLATFORM = "platform:test"
OPERATOR = "operator:oscar"
OPERATOR2 = "operator:olga"
CHECKER = "checker:carla"
CHECKER2 = "checker:dmitri"
ROOT = "operator:root"
SYSTEM = "system:sweeper"
CCY = "CNY"
MINUTE_MS = 60_000

C = TypeVar("C", bound=c.Command)
_nonces = itertools.count(1)


# -- keys and signatures --------------------------------------------------------------------------


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def pub_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return ca.b64url_encode(raw)


def fresh_nonce(prefix: str = "n") -> str:
    return f"{prefix}-{next(_nonces):08d}"


def sign(
    platform_id: str,
    cmd: C,
    key: Ed25519PrivateKey,
    expires_at_ms: int,
    nonce: str | None = None,
) -> C:
    """`cmd` with an Authorisation signed by `key` over the platform's authorisation payload."""
    auth = c.Authorisation(nonce=nonce or fresh_nonce(), expires_at_ms=expires_at_ms)
    unsigned = msgspec.structs.replace(cmd, auth=auth)  # type: ignore[type-var]
    message = ca.payload(platform_id, msgspec.to_builtins(unsigned))
    signature = ca.b64url_encode(key.sign(message))
    return msgspec.structs.replace(  # type: ignore[type-var,no-any-return]
        unsigned, auth=msgspec.structs.replace(auth, signature=signature)
    )


def standing(cmd: C, standing_id: str) -> C:
    """`cmd` relying on a standing authorisation instead of a signature."""
    return msgspec.structs.replace(  # type: ignore[type-var,no-any-return]
        cmd, auth=c.Authorisation(standing_id=standing_id)
    )


def signature_verifies(platform_id: str, cmd_builtins: dict[str, Any], public_key: str) -> bool:
    """Independent check of a recorded instruction's signature (not the memoised control)."""
    auth = cmd_builtins.get("auth") or {}
    signature = auth.get("signature")
    if not signature or not public_key:
        return False
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(ca.b64url_decode(public_key)).verify(
            ca.b64url_decode(signature), ca.payload(platform_id, cmd_builtins)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


# -- platforms ------------------------------------------------------------------------------------


@dataclass
class Customer:
    id: str
    name: str
    key: Ed25519PrivateKey
    bank: str
    holder_type: str = "individual"

    @property
    def pub(self) -> str:
        return pub_b64(self.key)


@dataclass
class CtlPlatform:
    id: str
    clock: FakeClock
    customers: dict[str, Customer] = field(default_factory=dict)
    currency: str = CCY
    omni: str = "omni"
    pbank: str = "pbank"
    own: str = "own"
    fee: str = "fee"
    susp: str = "susp"

    def __getitem__(self, name: str) -> Customer:
        return self.customers[name]

    def expiry(self, ms: int = MINUTE_MS) -> int:
        """An authorisation expiry `ms` from now (within the default 5 minute TTL)."""
        return self.clock.now + ms

    def sign(self, cmd: C, who: str, nonce: str | None = None, key: Any = None) -> C:
        return sign(self.id, cmd, key or self.customers[who].key, self.expiry(), nonce)


CUSTOMERS: Final = (
    ("alice", "Alice Liddell", "individual"),
    ("bob", "Bob Marley", "individual"),
    ("carol", "Carol Corp Ltd", "corporate"),
    ("dave", "Dave Keyless", "individual"),  # opened without a key
)


def make_ctl_platform(
    service: LedgerService,
    clock: FakeClock,
    platform_id: str = "p1",
    policy: Policy = DEFAULT_POLICY,
    names: Sequence[tuple[str, str, str]] = CUSTOMERS,
) -> CtlPlatform:
    """A platform under `policy` with structural accounts and customers holding real keys
    (all but `dave`, who has none) and a registered holder name."""
    outcome = service.create_platform(platform_id, f"Platform {platform_id}", ROOT, policy)
    assert outcome.status == "accepted", outcome
    p = CtlPlatform(platform_id, clock)
    cmds: list[c.Command] = [
        c.OpenAccount(client_id=f"open:{acc}", account_id=acc, kind=kind, currency=CCY)
        for acc, kind in (
            (p.omni, "omnibus"),
            (p.pbank, "platform_bank"),
            (p.own, "own_funds"),
            (p.fee, "fee_income"),
            (p.susp, "suspense"),
        )
    ]
    roles = ("lender", "borrower", "guarantor", "other")
    for i, (acc, name, holder_type) in enumerate(names):
        cust = Customer(acc, name, new_key(), bank=f"6222-0000-{i:04d}", holder_type=holder_type)
        p.customers[acc] = cust
        cmds.append(
            c.OpenAccount(
                client_id=f"open:{acc}",
                account_id=acc,
                kind="customer",
                currency=CCY,
                role=roles[i % len(roles)],
                holder_name=name,
                holder_type=holder_type,
                public_key="" if acc == "dave" else cust.pub,
            )
        )
    outcomes = service.execute(platform_id, cmds, ROOT)
    assert all(o.status == "accepted" for o in outcomes), outcomes
    return p


# -- instructions ---------------------------------------------------------------------------------


def ex(service: LedgerService, p: CtlPlatform, cmd: c.Command, actor: str = PLATFORM) -> Outcome:
    [outcome] = service.execute(p.id, [cmd], actor)
    return outcome


def accepted(
    service: LedgerService, p: CtlPlatform, cmd: c.Command, actor: str = PLATFORM
) -> Outcome:
    outcome = ex(service, p, cmd, actor)
    assert outcome.status == "accepted", outcome
    return outcome


def pending(
    service: LedgerService, p: CtlPlatform, cmd: c.Command, actor: str = OPERATOR
) -> Outcome:
    outcome = ex(service, p, cmd, actor)
    assert outcome.status == "pending" and outcome.kind == "approval_requested", outcome
    return outcome


def approve(
    service: LedgerService, p: CtlPlatform, request_id: str, actor: str = CHECKER
) -> Outcome:
    return ex(
        service, p, c.ApproveRequest(client_id=f"ok:{request_id}", request_id=request_id), actor
    )


def deposit(p: CtlPlatform, cid: str, account: str, amount: int) -> c.Deposit:
    return c.Deposit(
        client_id=cid,
        mirror_account_id=p.omni,
        account_id=account,
        amount_minor=amount,
        currency=CCY,
    )


def fund(service: LedgerService, p: CtlPlatform, account: str, amount: int) -> None:
    accepted(service, p, deposit(p, f"dep:{account}:{fresh_nonce()}", account, amount))


def transfer(cid: str, src: str, dst: str, amount: int, purpose: str = "transfer") -> c.Transfer:
    return c.Transfer(
        client_id=cid,
        from_account_id=src,
        to_account_id=dst,
        amount_minor=amount,
        currency=CCY,
        purpose=purpose,
    )


def place_hold(
    cid: str,
    src: str,
    dst: str,
    amount: int,
    expires_ms: int,
    reason: str = "bid",
    owner_ref: str = "",
) -> c.PlaceHold:
    return c.PlaceHold(
        client_id=cid,
        from_account_id=src,
        to_account_id=dst,
        amount_minor=amount,
        currency=CCY,
        reason=reason,
        expires_at_ms=expires_ms,
        owner_ref=owner_ref,
    )


def withdrawal(
    p: CtlPlatform, cid: str, account: str, amount: int, payee_ref: str, expires_ms: int
) -> c.RequestWithdrawal:
    return c.RequestWithdrawal(
        client_id=cid,
        account_id=account,
        mirror_account_id=p.omni,
        amount_minor=amount,
        currency=CCY,
        payee_ref=payee_ref,
        expires_at_ms=expires_ms,
    )


def bind_payee(
    p: CtlPlatform, cid: str, who: str, payee_ref: str = "", bank: str = "", name: str = ""
) -> c.BindPayee:
    cust = p[who]
    return c.BindPayee(
        client_id=cid,
        account_id=who,
        payee_ref=payee_ref or f"{who}-bank",
        bank_account=bank or cust.bank,
        holder_name=name or cust.name,
    )


def bind(service: LedgerService, p: CtlPlatform, who: str, payee_ref: str = "") -> None:
    """The customer binds (signs) their own same-name bank account."""
    cmd = bind_payee(p, f"bind:{who}:{fresh_nonce()}", who, payee_ref)
    accepted(service, p, p.sign(cmd, who))


def tick(service: LedgerService, p: CtlPlatform, cid: str | None = None) -> None:
    """An expiry sweep: a record that moves nothing but starts the business day of its time."""
    accepted(service, p, c.ExpireHolds(client_id=cid or f"sweep:{fresh_nonce()}"), SYSTEM)


def business_day_start(ts_ms: int, policy: Policy = DEFAULT_POLICY) -> int:
    return (ts_ms + policy.day_offset_ms) // DAY_MS * DAY_MS - policy.day_offset_ms


def next_business_day(clock: FakeClock, policy: Policy = DEFAULT_POLICY) -> None:
    """Move the clock to one hour into the next business day."""
    clock.now = business_day_start(clock.now, policy) + DAY_MS + HOUR_MS


# -- assertions -----------------------------------------------------------------------------------


def assert_refused(
    service: LedgerService,
    p: CtlPlatform,
    cmd: c.Command,
    code: str,
    control: str,
    actor: str = PLATFORM,
    pv: int = 0,
) -> dict[str, Any]:
    """`cmd` is refused with `code` by `control`, the refusal record (actor, control, code,
    policy version) is the newest record of the log, and no balance or hold changed."""
    before = snapshot(service, p.id)
    outcome = ex(service, p, cmd, actor)
    assert outcome.status == "refused", outcome
    assert (outcome.code, outcome.control) == (code, control), outcome
    assert outcome.seq == before["next_seq"] == last_position(service, p.id), outcome
    rec = record_at(service, p.id, outcome.seq)
    assert rec["kind"] == "command_refused"
    assert (rec["actor"], rec["control"], rec["code"], rec["pv"]) == (actor, control, code, pv)
    assert rec["cid"] == cmd.client_id and rec["cmd"]["op"] == c.op_of(cmd)
    assert rec["message"] == outcome.message and outcome.message
    assert not ({"entries", "hold", "resolve", "account", "tags"} & rec.keys())
    after = snapshot(service, p.id)
    assert money_state(after) == money_state(before)
    assert after["next_seq"] == before["next_seq"] + 1
    assert_balanced(service, p.id)
    return rec


def available(service: LedgerService, p: CtlPlatform, account: str) -> int:
    with service.reading(p.id) as st:
        return st.accounts[account].available_minor


def posted(service: LedgerService, p: CtlPlatform, account: str) -> int:
    with service.reading(p.id) as st:
        return st.accounts[account].posted_minor


def customer_money(service: LedgerService, platform_id: str) -> int:
    """Posted balances of customer and suspense accounts: the customers' money."""
    with service.reading(platform_id) as st:
        return sum(
            a.posted_minor for a in st.accounts.values() if str(a.kind) in ("customer", "suspense")
        )


def controls_snapshot(service: LedgerService, platform_id: str) -> dict[str, Any]:
    """Everything the controls read of a platform's state, as plain comparable data."""
    with service.reading(platform_id) as st:
        accounts = {
            a.id: {
                "kind": str(a.kind),
                "status": str(a.status),
                "posted": (a.debits_posted_minor, a.credits_posted_minor),
                "pending": (a.debits_pending_minor, a.credits_pending_minor),
                "holder_blind": a.holder_blind,
                "holder_type": a.holder_type,
                "public_key": a.public_key,
                "payee_ref": a.payee_ref,
                "payee_bank": a.payee_bank,
                "payee_bound_ms": a.payee_bound_ms,
                "payee_replaced": a.payee_replaced,
                "tokens": a.tokens,
                "last_seq": a.last_seq,
            }
            for a in st.accounts.values()
        }
        return {
            "accounts": accounts,
            "policy": msgspec.to_builtins(st.policy, order="sorted"),
            "gate": st.gate,
            "requests": {
                # as the command it executes: the writer keeps set fields in iteration order,
                # replay in the record's sorted order; both convert to the same command
                r.id: (
                    r.op,
                    msgspec.convert(r.cmd, c.AnyCommand),  # type: ignore[arg-type]
                    r.maker,
                    r.expires_at_ms,
                    r.seq,
                    r.status,
                    r.executed_by,
                )
                for r in st.requests.values()
            },
            "standing": {
                s.id: (s.account, s.purpose, s.payee, s.per_txn_max_minor, s.valid_until, s.revoked)
                for s in st.standing.values()
            },
            "nonces": dict(st.nonces),
            "auth_failures": dict(st.auth_failures),
            "day": st.day,
            "day_counters": dict(st.day_counters),
            "day_lvt": dict(st.day_lvt),
            "day_outflow": dict(st.day_outflow),
            "day_start_custody": dict(st.day_start_custody),
            "holds": {
                h.id: (
                    h.debit,
                    h.credit,
                    h.amount_minor,
                    h.expires_at_ms,
                    h.owner_ref,
                    str(h.status),
                )
                for h in st.holds.values()
            },
            "pending_holds": list(st.pending_holds),
            "done": {cid: (d.seq, d.kind, d.entries, d.reversed_by) for cid, d in st.done.items()},
            "next_seq": st.next_seq,
            "last_ts_ms": st.last_ts_ms,
            "totals": {k: list(v) for k, v in st.totals_by_currency.items()},
        }


def set_policy(service: LedgerService, p: CtlPlatform, **changes: Any) -> Policy:
    """The next policy version (the current one with `changes`), asked by an operator and
    approved by a checker."""
    with service.reading(p.id) as st:
        current = st.policy
    new = msgspec.structs.replace(current, version=current.version + 1, **changes)
    cid = f"policy-v{new.version}"
    pending(service, p, c.SetPolicy(client_id=cid, policy=new))
    out = approve(service, p, cid)
    assert out.kind == "policy_set", out
    return new


# The `make(**policy_changes)` fixture's type (tests/controls/conftest.py); defined here because
# two test folders' conftest modules share the module name `conftest`.
MakePlatform = Callable[..., CtlPlatform]
