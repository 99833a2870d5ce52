"""Discovers every control module in this package and orders them by priority.

Adding a control is adding one module that defines `CONTROL`; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import Any

import controls
from controls.base import (
    AnnotateFn,
    CheckFn,
    Control,
    LedgerView,
    Policy,
    Proposal,
    Refusal,
    _accept,
)


@cache
def all_controls() -> tuple[Control, ...]:
    found: list[Control] = []
    for info in pkgutil.iter_modules(controls.__path__):
        module = importlib.import_module(f"controls.{info.name}")
        control = getattr(module, "CONTROL", None)
        if isinstance(control, Control):
            found.append(control)
    found.sort(key=lambda c: (c.priority, c.name))
    names = [c.name for c in found]
    assert len(names) == len(set(names)), f"duplicate control names: {names}"
    return tuple(found)


@cache
def checks_for(op: str) -> tuple[tuple[str, CheckFn], ...]:
    return tuple(
        (c.name, c.check)
        for c in all_controls()
        if (c.ops is None or op in c.ops) and c.check is not _accept
    )


@cache
def annotators_for(op: str) -> tuple[AnnotateFn, ...]:
    return tuple(
        c.annotate
        for c in all_controls()
        if (c.ops is None or op in c.ops) and c.annotate is not None
    )


def run_annotators(
    state: LedgerView, proposal: Proposal, policy: Policy
) -> list[dict[str, Any]] | None:
    """Tags of an accepted proposal (large-value reporting); None when there are none."""
    tags: list[dict[str, Any]] | None = None
    for annotate in annotators_for(proposal.op):
        found = annotate(state, proposal, policy)
        if found:
            tags = (tags or []) + found
    return tags


def run_controls(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    """First refusal in priority order, or None when every applicable control accepts."""
    for _, check in checks_for(proposal.op):
        refusal = check(state, proposal, policy)
        if refusal is not None:
            return refusal
    return None


def control_set_id() -> str:
    """Names the controls that ran, recorded with decisions so auditors know what was checked."""
    return ",".join(c.name for c in all_controls())
