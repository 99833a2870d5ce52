"""Hostile input: malformed requests get INVALID_ARGUMENT or the right refusal, never UNKNOWN or
INTERNAL, and nothing in the store changes (no balance moves; at most a recorded refusal, and
nothing at all for input that is not an instruction)."""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

import grpc
import msgspec
import pytest
from api_helpers import CCY, World
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.api.client import CustodyError, instruction_message
from ledger.api.pb import account_pb, common_pb, movement_pb, policy_pb
from ledger.money import CURRENCY_EXPONENTS
from ledger.store import log_stream

SC = grpc.StatusCode
REFUSAL_CODES = {
    SC.INVALID_ARGUMENT,
    SC.NOT_FOUND,
    SC.FAILED_PRECONDITION,
    SC.PERMISSION_DENIED,
    SC.ALREADY_EXISTS,
}
SETTINGS = settings(
    max_examples=int(os.environ.get("API_HOSTILE_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}").fullmatch
_VALID_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-/]{0,127}").fullmatch
_counter = itertools.count()

bad_ids = st.one_of(
    st.just(""),
    st.text(min_size=65, max_size=400),
    st.text(min_size=1, max_size=64).filter(lambda s: not _VALID_ID(s)),
)
bad_client_ids = st.one_of(
    st.just(""),
    st.text(min_size=129, max_size=400),
    st.text(min_size=1, max_size=128).filter(lambda s: not _VALID_CLIENT_ID(s)),
)
bad_currencies = st.one_of(
    st.text(max_size=12).filter(lambda s: s not in CURRENCY_EXPONENTS),
    st.sampled_from(["USD", "EUR", "JPY"]),  # real, but not the accounts' currency
)
bad_amounts = st.one_of(
    st.integers(min_value=-(2**63), max_value=0),
    st.integers(min_value=10**6, max_value=2**63 - 1),  # far beyond any balance
)
unknown_enums = st.one_of(
    st.integers(min_value=7, max_value=2**31 - 1), st.integers(min_value=-(2**31), max_value=-1)
)
bad_text = st.one_of(
    st.text(min_size=257, max_size=2000),
    st.text(min_size=1, max_size=20).map(lambda s: s + "\x00\x07"),
)
other_platforms = st.text(min_size=1, max_size=80).filter(lambda s: s != "p1")
_B64_SIGNATURE = re.compile(r"[A-Za-z0-9_\-]{86}").fullmatch
_GOOD_NONCE = "n-12345678"
# Authorisations that are malformed whatever the policy (under the bookkeeping policy of these
# tests a well-formed but wrong signature is simply not needed, so it would be accepted).
bad_authorisations = st.one_of(
    st.just({}),  # present but empty
    st.fixed_dictionaries(
        {
            "nonce": st.one_of(
                st.text(max_size=7),
                st.text(min_size=65, max_size=100),
                st.text(min_size=8, max_size=20).map(lambda s: s + " /"),
            ),
            "expires_at_ms": st.integers(min_value=-(2**63), max_value=2**63 - 1),
            "signature": st.just("A" * 86),
        }
    ),
    st.fixed_dictionaries(
        {
            "nonce": st.just(_GOOD_NONCE),
            "expires_at_ms": st.integers(min_value=1, max_value=2**62),
            "signature": st.text(max_size=200).filter(lambda s: not _B64_SIGNATURE(s)),
        }
    ),
    st.fixed_dictionaries({"standing_id": bad_ids, "nonce": st.just(_GOOD_NONCE)}),
)

TRANSFER_MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "client_id": bad_client_ids,
    "from_account_id": st.one_of(bad_ids, st.sampled_from(["ghost", "omni", "fee", "susp", "bob"])),
    "to_account_id": st.one_of(
        bad_ids, st.sampled_from(["ghost", "omni", "fee", "own", "pbank", "susp", "alice"])
    ),
    "amount_minor": bad_amounts,
    "currency": bad_currencies,
    "purpose": unknown_enums,
    "platform_id": other_platforms,
    "authorisation": bad_authorisations,
}
OPEN_MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "account_id": st.one_of(bad_ids, st.just("alice")),
    "kind": st.one_of(unknown_enums, st.just(0)),
    "role": unknown_enums,
    "currency": st.text(max_size=12).filter(lambda s: s not in CURRENCY_EXPONENTS),
    "holder_name": st.one_of(bad_text, st.just("   ")),
    "platform_id": other_platforms,
}


def mutated(mutations: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A non-empty set of fields, each replaced by a malformed value."""
    names = sorted(mutations)
    return st.sets(st.sampled_from(names), min_size=1, max_size=3).flatmap(
        lambda chosen: st.fixed_dictionaries({n: mutations[n] for n in sorted(chosen)})
    )


def fresh(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}"


class Guard:
    """Balances and the log before a call; `check` asserts what may have changed."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.balances = self._balances()
        self.log_len = self._log_len()

    def _balances(self) -> dict[str, tuple[int, int, int, str]]:
        with self.world.service.reading("p1") as state:
            return {
                a.id: (a.posted_minor, a.held_minor, a.available_minor, str(a.status))
                for a in state.accounts.values()
            }

    def _log_len(self) -> int:
        return len(self.world.service.store.read(log_stream("p1"), -1, 10_000))

    def check(self, error: CustodyError | None, *, records_allowed: bool = True) -> None:
        if error is not None:
            assert error.code in REFUSAL_CODES, error
            assert error.domain == "custody.v1" and error.reason, error
        assert self._balances() == self.balances
        rows = self.world.service.store.read(log_stream("p1"), self.log_len - 1, 10_000)
        new = rows[1:]
        assert all(kind == "command_refused" for _, kind, _ in new), new
        pure_input = error is not None and error.reason in ("INVALID_ARGUMENT", "MALFORMED_REQUEST")
        if pure_input or not records_allowed:
            assert new == [], "an invalid instruction reached the log"


def call(fn: Any) -> CustodyError | None:
    try:
        fn()
    except CustodyError as exc:
        return exc
    return None


@SETTINGS
@given(bad=mutated(TRANSFER_MUTATIONS))
def test_malformed_transfers(world: World, bad: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "client_id": fresh("t"),
        "from_account_id": "alice",
        "to_account_id": "bob",
        "amount_minor": 1,
        "currency": CCY,
    }
    fields.update(bad)
    platform_id = fields.pop("platform_id", "")
    guard = Guard(world)
    client = world.p1
    request = movement_pb.TransferRequest(
        platform_id=platform_id, instruction=instruction_message("transfer", **fields)
    )
    error = call(lambda: client._call(client.movements.Transfer, request))
    assert error is not None, f"malformed transfer accepted: {bad}"
    guard.check(error)


@SETTINGS
@given(bad=mutated(OPEN_MUTATIONS))
def test_malformed_open_account(world: World, bad: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "client_id": fresh("o"),
        "account_id": fresh("acct"),
        "kind": common_pb.ACCOUNT_KIND_CUSTOMER,
        "currency": CCY,
        "role": common_pb.CUSTOMER_ROLE_LENDER,
    }
    fields.update(bad)
    platform_id = fields.pop("platform_id", "")
    guard = Guard(world)
    client = world.p1
    request = account_pb.OpenAccountRequest(
        platform_id=platform_id, instruction=common_pb.OpenAccount(**fields)
    )
    error = call(lambda: client._call(client.accounts.OpenAccount, request))
    assert error is not None, f"malformed account opening accepted: {bad}"
    guard.check(error)


@SETTINGS
@given(
    items=st.lists(
        st.one_of(
            st.none(), mutated({k: v for k, v in TRANSFER_MUTATIONS.items() if k != "platform_id"})
        ),
        min_size=1,
        max_size=6,
    ),
    linked=st.booleans(),
)
def test_malformed_batches(world: World, items: list[dict[str, Any] | None], linked: bool) -> None:
    instructions = []
    for bad in items:
        if bad is None:
            instructions.append(common_pb.Instruction())
            continue
        fields: dict[str, Any] = {
            "client_id": fresh("b"),
            "from_account_id": "alice",
            "to_account_id": "bob",
            "amount_minor": 1,
            "currency": CCY,
        }
        fields.update(bad)
        instructions.append(
            common_pb.Instruction(transfer=instruction_message("transfer", **fields))
        )
    guard = Guard(world)
    results: list[Any] = []
    error = call(lambda: results.extend(world.p1.submit_batch(instructions, linked=linked)))
    if error is None:
        assert len(results) == len(instructions)
        assert not any(r.status == "accepted" for r in results), results
        assert all(r.reason for r in results)
    guard.check(error)


# method -> the World client allowed to call it (so the bytes get past the role check)
METHODS = {
    "/custody.v1.MovementService/Transfer": "p1",
    "/custody.v1.MovementService/SubmitBatch": "p1",
    "/custody.v1.AccountService/OpenAccount": "p1",
    "/custody.v1.AccountService/ListAccounts": "p1",
    "/custody.v1.HoldService/PlaceHold": "p1",
    "/custody.v1.QueryService/GetBalance": "p1",
    "/custody.v1.CustomerService/BindPayee": "p1",
    "/custody.v1.CustomerService/GrantStandingAuthorisation": "p1",
    "/custody.v1.PolicyService/GetPolicy": "p1",
    "/custody.v1.PolicyService/ProposePolicy": "operator",
    "/custody.v1.PolicyService/SetPlatformGate": "operator",
    "/custody.v1.ApprovalService/ListRequests": "auditor",
    "/custody.v1.ApprovalService/ApproveRequest": "checker",
}


@SETTINGS
@given(method=st.sampled_from(sorted(METHODS)), payload=st.binary(max_size=300))
def test_random_bytes_never_crash_the_server(world: World, method: str, payload: bytes) -> None:
    guard = Guard(world)
    client = getattr(world, METHODS[method])
    rpc = client.channel.unary_unary(method)
    try:
        rpc(payload, timeout=5, metadata=client.metadata)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        assert code not in (SC.UNKNOWN, SC.INTERNAL), (code, exc.details())  # type: ignore[attr-defined]
        assert code in REFUSAL_CODES, code
    guard.check(None)


@SETTINGS
@given(
    page_size=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    token=st.one_of(st.text(max_size=600), st.binary(max_size=100).map(lambda b: b.hex())),
    account_id=st.one_of(bad_ids, st.text(max_size=70)),
)
def test_malformed_reads(world: World, page_size: int, token: str, account_id: str) -> None:
    p1 = world.p1
    for fn in (
        lambda: p1.list_accounts(page_size=page_size, page_token=token),
        lambda: p1.list_balances(page_size=page_size, page_token=token),
        lambda: p1.get_account(account_id),
        lambda: p1.get_balance(account_id),
        lambda: p1.list_requests(page_size=page_size, page_token=token),
        lambda: p1.get_request(account_id),
    ):
        error = call(fn)
        if error is not None:
            assert error.code in REFUSAL_CODES, error


@pytest.mark.parametrize("size", [8193, 20_000])
def test_oversize_batches_are_refused_whole(world: World, size: int) -> None:
    guard = Guard(world)
    item = common_pb.Instruction(
        transfer=instruction_message(
            "transfer",
            client_id="x",
            from_account_id="alice",
            to_account_id="bob",
            amount_minor=1,
            currency=CCY,
        )
    )
    error = call(lambda: world.p1.submit_batch([item] * size, timeout_s=30))
    assert error is not None and error.code is SC.INVALID_ARGUMENT
    assert error.reason == "BATCH_TOO_LARGE"
    guard.check(error, records_allowed=False)


@SETTINGS
@given(
    platform_id=st.one_of(
        st.just(""),
        st.text(max_size=100).filter(
            lambda s: re.fullmatch(r"[a-z0-9][a-z0-9\-]{0,62}", s) is None
        ),
    ),
    name=st.one_of(st.text(max_size=10), bad_text),
)
def test_malformed_platform_creation(world: World, platform_id: str, name: str) -> None:
    before = world.service.platform_ids()
    error = call(lambda: world.operator.create_platform(platform_id, name))
    assert error is not None and error.code is SC.INVALID_ARGUMENT, error
    assert world.service.platform_ids() == before


policy_documents = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(
        st.sampled_from(
            ["version", "limits", "fees", "blocklist", "auth_ttl_ms", "approval_ops", "colour"]
        ),
        st.one_of(
            st.integers(min_value=-(2**64), max_value=2**64),
            st.text(max_size=20),
            st.booleans(),
            st.lists(st.text(max_size=5), max_size=3),
            st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
        ),
        max_size=4,
    ).map(lambda d: msgspec.json.encode(d)),
)


@SETTINGS
@given(document=policy_documents)
def test_malformed_policy_proposals(world: World, document: bytes) -> None:
    """A policy document from the wire is refused (POLICY_INVALID, or ABORTED for a wrong
    version) or, if it happens to be a valid next version, becomes a request: never an INTERNAL
    error, never a policy change without a checker."""
    before = world.operator.get_policy(platform_id="p1")
    guard_balances = Guard(world).balances
    error = call(lambda: world.operator.propose_policy(fresh("pol"), document, platform_id="p1"))
    if error is not None:
        assert error.code in REFUSAL_CODES | {SC.ABORTED}, error
        assert error.domain == "custody.v1" and error.reason, error
    after = world.operator.get_policy(platform_id="p1")
    assert (after.version, after.policy_json) == (before.version, before.policy_json)
    assert Guard(world).balances == guard_balances


@SETTINGS
@given(
    gate=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    reason=st.one_of(st.just(""), bad_text),
)
def test_malformed_gate_changes(world: World, gate: int, reason: str) -> None:
    guard = Guard(world)
    request = policy_pb.SetPlatformGateRequest(
        platform_id="p1",
        instruction=common_pb.SetGate(client_id=fresh("g"), gate=gate, reason=reason),
    )
    client = world.operator
    error = call(lambda: client._call(client.policies.SetPlatformGate, request))
    assert error is not None, f"malformed gate change accepted: {gate} {reason!r}"
    guard.check(error)
