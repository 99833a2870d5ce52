"""The vocabulary controls share: what they look at (a proposal) and what they answer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgspec

from controls.codes import Code
from controls.policy import DEFAULT_POLICY as DEFAULT_POLICY
from controls.policy import Policy as Policy


class AccountView(Protocol):
    """Read-only view of an account, as the ledger's live state provides it."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def currency(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def must_not_go_negative(self) -> bool: ...
    @property
    def available_minor(self) -> int: ...
    @property
    def credits_posted_minor(self) -> int: ...
    @property
    def debits_posted_minor(self) -> int: ...
    def has_activity_outstanding(self) -> bool: ...


class LedgerView(Protocol):
    """What controls may read of a platform's live state (see ledger.domain.PlatformState)."""

    @property
    def accounts(self) -> Mapping[str, Any]: ...
    @property
    def totals_by_currency(self) -> Mapping[str, list[int]]:
        """currency -> [sum of posted debits, sum of posted credits]."""
        ...

    @property
    def gate(self) -> str: ...
    @property
    def requests(self) -> Mapping[str, Any]: ...
    @property
    def standing(self) -> Mapping[str, Any]: ...
    @property
    def nonces(self) -> Mapping[tuple[str, str], int]: ...
    @property
    def auth_failures(self) -> Mapping[str, tuple[int, ...]]: ...
    @property
    def day_counters(self) -> Mapping[tuple[str, str], tuple[int, int]]: ...
    @property
    def day_lvt(self) -> Mapping[tuple[str, str], int]: ...
    @property
    def day_outflow(self) -> Mapping[str, int]: ...
    @property
    def day_start_custody(self) -> Mapping[str, int]: ...
    def recent_failures(self, account_id: str, now_ms: int) -> tuple[int, ...]: ...
    @property
    def day(self) -> int:
        """The current business day, in days since 1970-01-01 in the policy's UTC offset."""
        ...


class Proposal:
    """What a command would do if accepted, computed before any control runs.

    `entries` are postings (debit id, credit id, amount); `hold` is a new reservation (debit id,
    credit id, amount); `subject` is the account a lifecycle command acts on. The controls read
    these generic fields so that one control serves every kind of movement.
    """

    __slots__ = (
        "actor",
        "auth_payload",
        "cmd",
        "currency",
        "entries",
        "executing",
        "hold",
        "op",
        "request",
        "resolving",
        "role",
        "subject",
        "tokens",
        "ts",
    )

    def __init__(
        self,
        op: str,
        cmd: Any,
        currency: str | None = None,
        entries: tuple[tuple[str, str, int], ...] = (),
        hold: tuple[str, str, int] | None = None,
        subject: str | None = None,
    ) -> None:
        self.op = op
        self.cmd = cmd
        self.currency = currency
        self.entries = entries
        self.hold = hold
        self.subject = subject
        # set by the writer before the controls run
        self.actor = ""
        self.role = ""  # platform | operator | checker | system (the actor's prefix)
        self.ts = 0  # the record's time, ms
        self.executing = False  # a checker's approval executes this (maker-checker done)
        self.auth_payload: bytes | None = None  # what the customer signed, if anything
        self.tokens: tuple[str, ...] = ()  # screening tokens of new personal data
        self.request: Any = None  # approve/reject: the pending request
        self.resolving: Any = None  # capture/release/settle/fail: the hold

    def debit_account(self) -> str | None:
        """The account money leaves (first posting, or the new reservation)."""
        if self.hold is not None:
            return self.hold[0]
        if self.entries:
            return self.entries[0][0]
        return None


class Refusal(msgspec.Struct, frozen=True):
    """A control's no: a stable code, the control's name, and a message safe to show the caller."""

    code: Code
    control: str
    message: str


CheckFn = Callable[[LedgerView, Proposal, Policy], Refusal | None]
# An annotating control adds tags to an accepted record; it never refuses.
AnnotateFn = Callable[[LedgerView, Proposal, Policy], list[dict[str, Any]] | None]


def _accept(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    return None


class Control(msgspec.Struct, frozen=True):
    name: str
    priority: int  # lower runs first; the catalogue order of BRIEF §4
    ops: frozenset[str] | None  # None = every operation
    check: CheckFn = _accept
    annotate: AnnotateFn | None = None
