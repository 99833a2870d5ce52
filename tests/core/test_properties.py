"""Stateful property test: random instructions against one ledger and a small reference model.

The model predicts the outcome of every instruction (accepted, or which refusal code) and its
effect on balances, holds and account states. After each step: per-currency double entry, no
non-negative account below zero, ledger == model. At teardown: a fresh service replaying the
same store reproduces the state exactly and the stored chain verifies.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import msgspec
from helpers import (
    BOOKKEEPING_POLICY,
    FakeClock,
    actor_for,
    assert_balanced,
    make_platform,
    open_service,
    pg_env,
    require_postgres,
    snapshot,
    sqlite_env,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ledger import commands as c
from ledger.config import Config
from ledger.writer import Outcome, verify_stored_chain

PID = "p1"
CUSTOMERS = ("c0", "c1", "c2", "c3")
OMNI, PBANK, OWN, FEE, SUSP = "omni", "pbank", "own", "fee", "susp"
NON_NEGATIVE = (*CUSTOMERS, OWN, FEE, SUSP)
ASSETS = (OMNI, PBANK)
# The customer side of the customer/platform money line (BRIEF §4, controls/segregation.py).
CUSTOMER_SIDE = (*CUSTOMERS, SUSP, OMNI)
FEE_MAX = BOOKKEEPING_POLICY.fees["F"].max_minor
REVERSIBLE = {"deposited", "transferred", "fee_charged", "shortfall_topped_up", "hold_captured"}

# Mostly ordinary amounts, now and then an out-of-range one (0, negative, 2^63).
amounts = st.integers(0, 30).flatmap(
    lambda k: st.sampled_from([0, -1, 2**63]) if k == 0 else st.integers(1, 1_500)
)
customers = st.sampled_from(CUSTOMERS)
picks = st.integers(0, 10_000)


class Model:
    """The expected ledger: posted and held per account, statuses, holds, reversible movements."""

    def __init__(self) -> None:
        accounts = (*CUSTOMERS, OMNI, PBANK, OWN, FEE, SUSP)
        self.posted = dict.fromkeys(accounts, 0)  # in each account's normal direction
        self.held = dict.fromkeys(accounts, 0)
        self.frozen: set[str] = set()
        # hold id -> [debit, credit, amount, expires, status, kind]
        self.holds: dict[str, list[Any]] = {}
        # client id -> [kind, entries, reversed]
        self.movements: dict[str, list[Any]] = {}

    def copy(self) -> Model:
        m = Model()
        m.posted, m.held, m.frozen = dict(self.posted), dict(self.held), set(self.frozen)
        m.holds = {k: list(v) for k, v in self.holds.items()}
        m.movements = {k: [v[0], v[1], v[2]] for k, v in self.movements.items()}
        return m

    def available(self, account: str) -> int:
        return self.posted[account] - self.held[account]

    def post(self, debit: str, credit: str, amount: int) -> None:
        self.posted[debit] += amount if debit in ASSETS else -amount
        self.posted[credit] += -amount if credit in ASSETS else amount

    # -- predictions: return a refusal code, or None and apply the effect -------------------------

    def move(self, cid: str, kind: str, debit: str, credit: str, amount: int) -> str | None:
        if not 1 <= amount <= 2**63 - 1:
            return "INVALID_AMOUNT"
        if debit == credit:
            return "SAME_ACCOUNT"
        if debit in NON_NEGATIVE and self.available(debit) < amount:
            return "INSUFFICIENT_FUNDS"
        if debit in self.frozen or credit in self.frozen:
            return "ACCOUNT_FROZEN"
        self.post(debit, credit, amount)
        self.movements[cid] = [kind, [(debit, credit, amount)], False]
        return None

    def place(
        self, cid: str, kind: str, debit: str, credit: str, amount: int, expires: int, now: int
    ) -> str | None:
        if expires <= now:
            return "HOLD_EXPIRY_INVALID"
        if (debit in CUSTOMER_SIDE) != (credit in CUSTOMER_SIDE):
            return "SEGREGATION_BREACH"  # a hold never crosses the line, not even to fees
        if not 1 <= amount <= 2**63 - 1:
            return "INVALID_AMOUNT"
        if debit == credit:
            return "SAME_ACCOUNT"
        if self.available(debit) < amount:
            return "INSUFFICIENT_FUNDS"
        if debit in self.frozen or credit in self.frozen:
            return "ACCOUNT_FROZEN"
        self.held[debit] += amount
        self.holds[cid] = [debit, credit, amount, expires, "pending", kind]
        self.movements[cid] = ["hold", [], False]
        return None

    def resolve(
        self, cid: str, hold_id: str, kind: str, captured: int | None, now: int
    ) -> str | None:
        """captured=None: release/fail; otherwise capture (hold) or settle (withdrawal)."""
        h = self.holds.get(hold_id)
        if h is None or h[5] != kind:
            return "HOLD_NOT_FOUND"
        debit, credit, amount, expires, status, _ = h
        if status != "pending":
            return "HOLD_NOT_PENDING"
        if captured is not None:
            if kind == "hold":
                if expires <= now:
                    return "HOLD_EXPIRED"
                if captured < 1:
                    return "INVALID_AMOUNT"
                if captured > amount:
                    return "HOLD_EXCEEDED"
            # a settlement records a payout the bank already made: a freeze does not stop it
            if kind == "hold" and (debit in self.frozen or credit in self.frozen):
                return "ACCOUNT_FROZEN"
        self.held[debit] -= amount
        if captured is None:
            h[4] = "released"
            self.movements[cid] = ["released", [], False]
        else:
            h[4] = "captured"
            self.post(debit, credit, captured)
            self.movements[cid] = [
                "hold_captured" if kind == "hold" else "settled",
                [(debit, credit, captured)],
                False,
            ]
        return None

    def expire(self, now: int) -> list[str]:
        expired = []
        for hold_id, h in self.holds.items():
            if h[4] == "pending" and h[3] <= now:
                h[4] = "expired"
                self.held[h[0]] -= h[2]
                expired.append(hold_id)
        return expired

    def reverse(self, cid: str, movement: str) -> str | None:
        m = self.movements.get(movement)
        if m is None:
            return "MOVEMENT_NOT_FOUND"
        kind, entries, reversed_ = m
        if kind not in REVERSIBLE or not entries:
            return "NOT_REVERSIBLE"
        if reversed_:
            return "ALREADY_REVERSED"
        [(debit, credit, amount)] = entries
        if credit in NON_NEGATIVE and self.available(credit) < amount:
            return "INSUFFICIENT_FUNDS"
        if debit in self.frozen or credit in self.frozen:
            return "ACCOUNT_FROZEN"
        self.post(credit, debit, amount)
        m[2] = True
        self.movements[cid] = ["reversed", [(credit, debit, amount)], False]
        return None


class LedgerMachine(RuleBasedStateMachine):
    STORE = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="custody-prop-"))
        self._pg: AbstractContextManager[dict[str, str]] | None = None
        if self.STORE == "postgres":
            require_postgres()
            self._pg = pg_env(self.tmp)
            env = self._pg.__enter__()
        else:
            env = sqlite_env(self.tmp)
        self.config = Config.from_env(env)
        self.clock = FakeClock()
        self.service = open_service(self.config, self.clock)
        make_platform(self.service, customers=CUSTOMERS)
        self.model = Model()
        self.n = 0
        self.accepted: list[tuple[c.Command, Outcome]] = []

    # -- plumbing -------------------------------------------------------------------------------

    def cid(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def execute(self, cmds: list[c.Command], linked: bool = False) -> list[Outcome]:
        # one actor per request: the platform relays movements, an operator gives the manual
        # operations (reversals, unfreezing, suspense clearing)
        [actor] = {actor_for(cmd) for cmd in cmds}
        outcomes = self.service.execute(PID, cmds, actor, linked=linked)
        for cmd, o in zip(cmds, outcomes, strict=True):
            if o.status == "accepted":
                self.accepted.append((cmd, o))
        return outcomes

    def check(self, cmd: c.Command, expected: str | None) -> Outcome:
        [o] = self.execute([cmd])
        if expected is None:
            assert o.status == "accepted", (cmd, o)
        else:
            assert (o.status, o.code) == ("refused", expected), (cmd, o)
        return o

    @property
    def now(self) -> int:
        return self.clock.now

    def pick(self, pool: list[str], i: int) -> str:
        return pool[i % len(pool)]

    # -- rules ----------------------------------------------------------------------------------

    @initialize(funds=st.lists(st.integers(0, 5_000), min_size=5, max_size=5))
    def fund(self, funds: list[int]) -> None:
        for account, amount in zip((*CUSTOMERS, SUSP), funds, strict=True):
            if amount:
                self.deposit(account, amount)
        self.deposit_own_funds(2_000)

    @rule(account=st.sampled_from((*CUSTOMERS, SUSP)), amount=amounts)
    def deposit(self, account: str, amount: int) -> None:
        cid = self.cid("d")
        expected = self.model.move(cid, "deposited", OMNI, account, amount)
        self.check(
            c.Deposit(
                client_id=cid,
                mirror_account_id=OMNI,
                account_id=account,
                amount_minor=amount,
                currency="CNY",
            ),
            expected,
        )

    @rule(amount=st.integers(1, 5_000))
    def deposit_own_funds(self, amount: int) -> None:
        cid = self.cid("do")
        expected = self.model.move(cid, "deposited", PBANK, OWN, amount)
        self.check(
            c.Deposit(
                client_id=cid,
                mirror_account_id=PBANK,
                account_id=OWN,
                amount_minor=amount,
                currency="CNY",
            ),
            expected,
        )

    @rule(
        src=st.sampled_from((*CUSTOMERS, SUSP)),
        dst=customers,
        amount=amounts,
        purpose=st.sampled_from(sorted(c.TRANSFER_PURPOSES)),
    )
    def transfer(self, src: str, dst: str, amount: int, purpose: str) -> None:
        cid = self.cid("t")
        expected = self.model.move(cid, "transferred", src, dst, amount)
        self.check(
            c.Transfer(
                client_id=cid,
                from_account_id=src,
                to_account_id=dst,
                amount_minor=amount,
                currency="CNY",
                purpose=purpose,
            ),
            expected,
        )

    @rule(src=customers, amount=amounts)
    def fee(self, src: str, amount: int) -> None:
        cid = self.cid("f")
        # segregation checks the fee against the published schedule before integrity looks at
        # the amount, so a fee above the schedule's maximum (2^63 here) is not in the schedule
        expected = (
            "FEE_NOT_IN_SCHEDULE"
            if amount > FEE_MAX
            else self.model.move(cid, "fee_charged", src, FEE, amount)
        )
        self.check(
            c.ChargeFee(
                client_id=cid,
                from_account_id=src,
                to_account_id=FEE,
                amount_minor=amount,
                currency="CNY",
                fee_code="F",
            ),
            expected,
        )

    @rule(dst=st.sampled_from((*CUSTOMERS, SUSP)), amount=amounts)
    def top_up(self, dst: str, amount: int) -> None:
        cid = self.cid("u")
        expected = self.model.move(cid, "shortfall_topped_up", OWN, dst, amount)
        self.check(
            c.TopUpShortfall(
                client_id=cid,
                from_account_id=OWN,
                to_account_id=dst,
                amount_minor=amount,
                currency="CNY",
                reason="r",
            ),
            expected,
        )

    @rule(
        src=customers,
        dst=st.sampled_from((*CUSTOMERS, FEE)),
        amount=amounts,
        ttl=st.integers(-5, 10_000),
    )
    def place_hold(self, src: str, dst: str, amount: int, ttl: int) -> None:
        cid = self.cid("h")
        expected = self.model.place(cid, "hold", src, dst, amount, self.now + ttl, self.now)
        self.check(
            c.PlaceHold(
                client_id=cid,
                from_account_id=src,
                to_account_id=dst,
                amount_minor=amount,
                currency="CNY",
                reason="bid",
                expires_at_ms=self.now + ttl,
            ),
            expected,
        )

    @rule(src=customers, dst=customers, amount=st.integers(1, 300), ttl=st.integers(1, 6_000))
    def place_small_hold(self, src: str, dst: str, amount: int, ttl: int) -> None:
        self.place_hold(src, dst, amount, ttl)

    @rule(src=customers, amount=amounts, ttl=st.integers(1, 5_000))
    def request_withdrawal(self, src: str, amount: int, ttl: int) -> None:
        cid = self.cid("w")
        expected = self.model.place(cid, "withdrawal", src, OMNI, amount, self.now + ttl, self.now)
        self.check(
            c.RequestWithdrawal(
                client_id=cid,
                account_id=src,
                mirror_account_id=OMNI,
                amount_minor=amount,
                currency="CNY",
                payee_ref=f"bank:{src}",
                expires_at_ms=self.now + ttl,
            ),
            expected,
        )

    @precondition(lambda self: self.model.holds)
    @rule(
        i=picks,
        amount=st.integers(-1, 5_000),
        op=st.sampled_from(["capture", "release", "settle", "fail"]),
    )
    def resolve_hold(self, i: int, amount: int, op: str) -> None:
        hold_id = self.pick(sorted(self.model.holds), i)
        cid = self.cid(op[0] + "r")
        if op == "capture":
            cmd: c.Command = c.CaptureHold(client_id=cid, hold_id=hold_id, amount_minor=amount)
            expected = self.model.resolve(cid, hold_id, "hold", amount, self.now)
        elif op == "release":
            cmd = c.ReleaseHold(client_id=cid, hold_id=hold_id, reason="r")
            expected = self.model.resolve(cid, hold_id, "hold", None, self.now)
        elif op == "settle":
            cmd = c.SettleWithdrawal(client_id=cid, withdrawal_id=hold_id)
            h = self.model.holds[hold_id]
            expected = self.model.resolve(cid, hold_id, "withdrawal", h[2], self.now)
        else:
            cmd = c.FailWithdrawal(client_id=cid, withdrawal_id=hold_id, reason="bank")
            expected = self.model.resolve(cid, hold_id, "withdrawal", None, self.now)
        self.check(cmd, expected)

    def _holds_of(self, kind: str) -> list[str]:
        return sorted(k for k, h in self.model.holds.items() if h[5] == kind)

    @precondition(lambda self: any(h[5] == "hold" for h in self.model.holds.values()))
    @rule(i=picks, percent=st.integers(0, 110))
    def capture(self, i: int, percent: int) -> None:
        self._capture(i, percent)

    @precondition(lambda self: any(h[5] == "hold" for h in self.model.holds.values()))
    @rule(i=picks)
    def capture_in_full(self, i: int) -> None:
        self._capture(i, 100)

    def _capture(self, i: int, percent: int) -> None:
        """Capture 0..110% of a hold (0: INVALID_AMOUNT, over 100: HOLD_EXCEEDED)."""
        hold_id = self.pick(self._holds_of("hold"), i)
        amount = self.model.holds[hold_id][2] * percent // 100
        cid = self.cid("cap")
        expected = self.model.resolve(cid, hold_id, "hold", amount, self.now)
        self.check(c.CaptureHold(client_id=cid, hold_id=hold_id, amount_minor=amount), expected)

    @precondition(lambda self: any(h[5] == "hold" for h in self.model.holds.values()))
    @rule(i=picks)
    def release(self, i: int) -> None:
        hold_id = self.pick(self._holds_of("hold"), i)
        cid = self.cid("rel")
        expected = self.model.resolve(cid, hold_id, "hold", None, self.now)
        self.check(c.ReleaseHold(client_id=cid, hold_id=hold_id, reason="r"), expected)

    @precondition(lambda self: any(h[5] == "withdrawal" for h in self.model.holds.values()))
    @rule(i=picks, settle=st.booleans())
    def settle_or_fail(self, i: int, settle: bool) -> None:
        hold_id = self.pick(self._holds_of("withdrawal"), i)
        cid = self.cid("ws" if settle else "wf")
        if settle:
            amount = self.model.holds[hold_id][2]
            expected = self.model.resolve(cid, hold_id, "withdrawal", amount, self.now)
            cmd: c.Command = c.SettleWithdrawal(client_id=cid, withdrawal_id=hold_id)
        else:
            expected = self.model.resolve(cid, hold_id, "withdrawal", None, self.now)
            cmd = c.FailWithdrawal(client_id=cid, withdrawal_id=hold_id, reason="bank")
        self.check(cmd, expected)

    @rule(ms=st.integers(0, 3_000), sweep=st.booleans())
    def advance_clock(self, ms: int, sweep: bool) -> None:
        self.clock.advance(ms)  # expired holds stay pending until a sweep, but are void
        if sweep:
            self.sweep()

    def sweep(self) -> None:
        expected = self.model.expire(self.now)
        cid = self.cid("x")
        o = self.check(c.ExpireHolds(client_id=cid), None)
        self.model.movements[cid] = ["holds_expired", [], False]
        with self.service.reading(PID) as state:
            for hold_id in expected:
                assert str(state.holds[hold_id].status) == "expired"
        assert o.kind == "holds_expired"

    @precondition(lambda self: self.model.movements)
    @rule(i=picks)
    def reverse(self, i: int) -> None:
        movement = self.pick(sorted(self.model.movements), i)
        cid = self.cid("r")
        expected = self.model.reverse(cid, movement)
        self.check(c.Reverse(client_id=cid, movement_id=movement, reason="undo"), expected)

    @rule(account=st.sampled_from((*CUSTOMERS, SUSP, OWN)), freeze=st.booleans())
    def freeze_or_unfreeze(self, account: str, freeze: bool) -> None:
        cid = self.cid("z")
        if freeze:
            expected = "ACCOUNT_FROZEN" if account in self.model.frozen else None
            cmd: c.Command = c.FreezeAccount(client_id=cid, account_id=account, reason="r")
        else:
            expected = None if account in self.model.frozen else "ACCOUNT_NOT_FROZEN"
            cmd = c.UnfreezeAccount(client_id=cid, account_id=account, reason="r")
        self.check(cmd, expected)
        if expected is None:
            (self.model.frozen.add if freeze else self.model.frozen.discard)(account)
            self.model.movements[cid] = ["lifecycle", [], False]

    @rule(legs=st.lists(st.tuples(customers, customers, amounts), min_size=1, max_size=4))
    def linked_transfers(self, legs: list[tuple[str, str, int]]) -> None:
        trial = self.model.copy()
        cmds = []
        failed: tuple[int, str] | None = None
        for index, (src, dst, amount) in enumerate(legs):
            cid = self.cid("l")
            cmds.append(
                c.Transfer(
                    client_id=cid,
                    from_account_id=src,
                    to_account_id=dst,
                    amount_minor=amount,
                    currency="CNY",
                )
            )
            if failed is None:
                code = trial.move(cid, "transferred", src, dst, amount)
                if code is not None:
                    failed = (index, code)
        outcomes = self.execute(cmds, linked=True)
        if failed is None:
            assert all(o.status == "accepted" for o in outcomes), outcomes
            self.model = trial
            return
        for index, o in enumerate(outcomes):
            assert o.status == "refused"
            assert o.code == (failed[1] if index == failed[0] else "LINKED_FAILED"), (
                failed,
                outcomes,
            )

    @precondition(lambda self: self.accepted)
    @rule(i=picks, conflict=st.booleans())
    def repeat_an_instruction(self, i: int, conflict: bool) -> None:
        cmd, first = self.accepted[i % len(self.accepted)]
        if conflict and isinstance(cmd, c.Transfer | c.Deposit):
            other = msgspec.structs.replace(cmd, amount_minor=cmd.amount_minor + 1)
            [o] = self.service.execute(PID, [other], actor_for(other))
            assert (o.status, o.code) == ("refused", "ID_REUSED")
        else:
            [o] = self.service.execute(PID, [cmd], actor_for(cmd))
            assert (o.status, o.seq, o.kind) == ("replayed", first.seq, first.kind)

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def matches_model_and_balances(self) -> None:
        with self.service.reading(PID) as state:
            assert state.totals_balanced()
            debits = sum(a.debits_posted_minor for a in state.accounts.values())
            credits = sum(a.credits_posted_minor for a in state.accounts.values())
            pend_d = sum(a.debits_pending_minor for a in state.accounts.values())
            pend_c = sum(a.credits_pending_minor for a in state.accounts.values())
            assert debits == credits == state.totals_by_currency.get("CNY", [0, 0])[0]
            assert pend_d == pend_c
            for account_id in NON_NEGATIVE:
                assert state.accounts[account_id].available_minor >= 0, account_id
            for account_id, posted in self.model.posted.items():
                a = state.accounts[account_id]
                assert (a.posted_minor, a.held_minor) == (posted, self.model.held[account_id]), (
                    account_id
                )
                assert (str(a.status) == "frozen") == (account_id in self.model.frozen), account_id
            for hold_id, h in self.model.holds.items():
                assert str(state.holds[hold_id].status) == h[4], hold_id
            assert set(state.pending_holds) == {
                k for k, h in self.model.holds.items() if h[4] == "pending"
            }

    def teardown(self) -> None:
        try:
            assert_balanced(self.service, PID)
            before = snapshot(self.service, PID)
            self.service.close()
            fresh = open_service(self.config, self.clock)
            try:
                assert snapshot(fresh, PID) == before
                assert verify_stored_chain(fresh.store, PID) == (before["next_seq"], None, "ok")
            finally:
                fresh.close()
        finally:
            if self._pg is not None:
                self._pg.__exit__(None, None, None)
            shutil.rmtree(self.tmp, ignore_errors=True)


class PostgresLedgerMachine(LedgerMachine):
    STORE = "postgres"


_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
}

TestLedgerSQLite = LedgerMachine.TestCase
TestLedgerSQLite.settings = settings(max_examples=100, stateful_step_count=50, **_COMMON)

TestLedgerPostgres = PostgresLedgerMachine.TestCase
TestLedgerPostgres.settings = settings(max_examples=10, stateful_step_count=30, **_COMMON)
