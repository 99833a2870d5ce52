"""Fixtures for the controls tests: a platform under the strict DEFAULT policy (or a policy
that differs from it in one parameter), customers with real Ed25519 keys, on SQLite and
PostgreSQL (`config` from tests/conftest.py)."""

from __future__ import annotations

import pytest
from ctl_helpers import CtlPlatform, MakePlatform, make_ctl_platform
from helpers import FakeClock

import controls
from controls.policy import DEFAULT_POLICY, Policy
from controls.registry import all_controls
from ledger.service import LedgerService


def pytest_configure(config: pytest.Config) -> None:
    # tests/controls must never shadow the `controls` package: if it did, the registry would
    # find no control at all and every refusal test here would test nothing.
    assert controls.__file__ is not None, f"`controls` is a namespace: {controls.__path__}"
    assert {c.name for c in all_controls()} >= {
        "roles",
        "segregation",
        "customer_authorisation",
        "payout_binding",
        "holds",
        "maker_checker",
        "limits",
        "screening",
        "platform_gate",
        "large_value",
    }, all_controls()


@pytest.fixture
def make(service: LedgerService, clock: FakeClock) -> MakePlatform:
    """make(platform_id="p1", **policy_changes): a platform whose policy is the default one
    with just the named parameters changed."""

    def build(platform_id: str = "p1", **changes: object) -> CtlPlatform:
        policy: Policy = DEFAULT_POLICY
        if changes:
            import msgspec

            policy = msgspec.structs.replace(DEFAULT_POLICY, **changes)
        return make_ctl_platform(service, clock, platform_id, policy)

    return build


@pytest.fixture
def p(make: MakePlatform) -> CtlPlatform:
    """Platform p1 under the DEFAULT (strict) policy."""
    return make()
