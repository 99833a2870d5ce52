"""The vocabulary controls share: what they look at (a proposal) and what they answer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import msgspec

from controls.codes import Code


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
    @property
    def accounts(self) -> Mapping[str, Any]: ...
    @property
    def totals_by_currency(self) -> Mapping[str, list[int]]:
        """currency -> [sum of posted debits, sum of posted credits]."""
        ...


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """Versioned policy data. Version 0 is the built-in default before any policy is set."""

    version: int = 0


DEFAULT_POLICY: Final = Policy()


class Proposal:
    """What a command would do if accepted, computed before any control runs.

    `entries` are postings (debit id, credit id, amount); `hold` is a new reservation (debit id,
    credit id, amount); `subject` is the account a lifecycle command acts on. The controls read
    these generic fields so that one control serves every kind of movement.
    """

    __slots__ = ("cmd", "currency", "entries", "hold", "op", "subject")

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


class Refusal(msgspec.Struct, frozen=True):
    """A control's no: a stable code, the control's name, and a message safe to show the caller."""

    code: Code
    control: str
    message: str


CheckFn = Callable[[LedgerView, Proposal, Policy], Refusal | None]


class Control(msgspec.Struct, frozen=True):
    name: str
    priority: int  # lower runs first; the catalogue order of BRIEF §4
    ops: frozenset[str] | None  # None = every operation
    check: CheckFn
