"""A realistic mixed log on a real LedgerService, under a policy with the controls on: signed
customer instructions (Ed25519), key registration and rotation, payout binding and withdrawals,
standing authorisations, maker-checker requests (approved, rejected, expired), policy and gate
changes, large-value tags, early-warning alerts (raised by the system and by an operator,
acknowledged and closed by the roles allowed for their level) with an automatic restriction of
the gate, daily reconciliations signed off by a checker (an excess returned to the platform's
bank in two settlements a checker approves), and refusals of many kinds (bad
signatures among them)."""

from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import START_MS, FakeClock, actor_for  # type: ignore[import-not-found]

from controls.customer_authorisation import b64url_encode, payload
from controls.policy import DAY_MS, FeeRule, LvtThresholds, Policy
from ledger import commands as c
from ledger.config import Config
from ledger.service import LedgerService
from reconciliation import ledger_view

PLATFORM = "p1"
# not `checker:test`: the platform acts as `platform:test`, and a checker must be another person
CHECKER = "checker:carol"
OPERATOR = "operator:alice"
EARLY_WARNING = "system:early-warning"  # the early-warning engine's actor
CCY = "CNY"
FAR = START_MS + 9 * 365 * DAY_MS  # holds and standing authorisations outlive the test
APPROVAL_ABOVE = 40_000  # transfers from this amount on need a checker
POLICY = Policy(
    require_customer_signature=1,
    require_bound_payee=1,
    approval_ops=frozenset({"reverse", "top_up_shortfall", "unfreeze_account"}),
    approval_above_minor=APPROVAL_ABOVE,
    approval_ttl_ms=20 * 60_000,
    limits={},
    outflow_cap_bp=0,
    fees={"service": FeeRule(max_minor=100)},
    hold_max_ms=10 * 365 * DAY_MS,
    standing_max_ms=10 * 365 * DAY_MS,
    lvt={"CNY": LvtThresholds(individual_minor=60_000, corporate_minor=200_000)},
    auth_max_failures=3,
    auth_lock_ms=5 * 60_000,
    refusal_records_per_min=150,
)


class Customer:
    """A customer with the Ed25519 key their account is registered with."""

    def __init__(self, account_id: str, index: int) -> None:
        self.id = account_id
        self.index = index
        self.key_version = 0
        self.key = _key(account_id, 0)

    def rotate(self) -> Ed25519PrivateKey:
        self.key_version += 1
        self.key = _key(self.id, self.key_version)
        return self.key


def _key(account_id: str, version: int) -> Ed25519PrivateKey:
    seed = hashlib.sha256(f"workload-key/{account_id}/{version}".encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key(key: Ed25519PrivateKey) -> str:
    return b64url_encode(key.public_key().public_bytes_raw())


Signed = TypeVar(
    "Signed",
    c.Transfer,
    c.PlaceHold,
    c.RequestWithdrawal,
    c.RegisterKey,
    c.BindPayee,
    c.GrantStanding,
)


def signed(cmd: Signed, key: Ed25519PrivateKey, nonce: str, expires_ms: int) -> Signed:
    """`cmd` with the customer's authorisation: an Ed25519 signature over the payload the
    ledger recomputes (controls.customer_authorisation.payload)."""
    unsigned = msgspec.structs.replace(
        cmd, auth=c.Authorisation(nonce=nonce, expires_at_ms=expires_ms)
    )
    signature = key.sign(payload(PLATFORM, msgspec.to_builtins(unsigned)))
    return msgspec.structs.replace(
        cmd,
        auth=c.Authorisation(
            nonce=nonce, expires_at_ms=expires_ms, signature=b64url_encode(signature)
        ),
    )


class Workload:
    def __init__(self, svc: LedgerService, clock: FakeClock, rng: random.Random) -> None:
        self.svc = svc
        self.clock = clock
        self.rng = rng
        self.n = 0
        self.customers = [Customer(f"c{i}", i) for i in range(20)]
        self.holds: list[str] = []
        self.moves: list[str] = []
        self.withdrawals: list[str] = []
        self.requests: list[str] = []  # pending maker-checker requests
        self.standing: list[tuple[str, Customer]] = []
        self.policy = POLICY
        self.outcomes: dict[str, str] = {}
        self.late: list[str] = []  # requests the checker leaves to expire

    def next_id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def run(self, cmds: Sequence[c.Command], actor: str | None = None) -> None:
        """Each actor's instructions as one request, platform first, then operator."""
        groups: dict[str, list[c.Command]] = {}
        for cmd in cmds:
            groups.setdefault(actor or actor_for(cmd), []).append(cmd)
        for who, group in groups.items():
            for outcome in self.svc.execute(PLATFORM, group, who):
                self.outcomes[outcome.client_id] = outcome.status

    def sign(self, cmd: Signed, who: Customer, key: Ed25519PrivateKey | None = None) -> Signed:
        expires = self.clock.now + 60_000
        self.n += 1
        return signed(cmd, key or who.key, f"nonce-{self.n:06d}", expires)

    # -- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        opened: list[c.Command] = [
            c.OpenAccount(client_id="o-omni", account_id="omni", kind="omnibus", currency=CCY),
            c.OpenAccount(client_id="o-fee", account_id="fee", kind="fee_income", currency=CCY),
            c.OpenAccount(client_id="o-own", account_id="own", kind="own_funds", currency=CCY),
            c.OpenAccount(client_id="o-susp", account_id="susp", kind="suspense", currency=CCY),
            c.OpenAccount(
                client_id="o-bank-p1", account_id="bank-p1", kind="platform_bank", currency=CCY
            ),
            c.OpenAccount(client_id="o-usd", account_id="omni-usd", kind="omnibus", currency="USD"),
            c.OpenAccount(
                client_id="o-u0", account_id="u0", kind="customer", currency="USD", role="other"
            ),
        ]
        for cust in self.customers:
            i = cust.index
            opened.append(
                c.OpenAccount(
                    client_id=f"o-{cust.id}",
                    account_id=cust.id,
                    kind="customer",
                    currency=CCY,
                    role="lender" if i % 2 else "borrower",
                    holder_name=f"客户 {i}" if i % 5 == 0 else None,
                    holder_type="corporate" if i == 3 else "individual",
                    # c19 registers its first key later (trust on first use)
                    public_key=public_key(cust.key) if i != 19 else "",
                )
            )
        self.run(opened, "platform:p1")
        late = self.customers[19]
        self.run(
            [
                c.RegisterKey(
                    client_id="key-c19", account_id=late.id, public_key=public_key(late.key)
                )
            ]
        )
        # customers with a name bind their payout account (signed)
        binds = [
            self.sign(
                c.BindPayee(
                    client_id=f"bind-{cust.id}",
                    account_id=cust.id,
                    payee_ref=f"bank-{cust.id}",
                    bank_account=f"6222 0000 {cust.index:04d}",
                    holder_name=f"客户 {cust.index}",
                ),
                cust,
            )
            for cust in self.customers
            if cust.index % 5 == 0
        ]
        self.run(binds)
        # a standing authorisation for auto-bids, and a key rotation signed by the old key
        bidder = self.customers[1]
        self.run(
            [
                self.sign(
                    c.GrantStanding(
                        client_id="grant-auto-bid",
                        account_id=bidder.id,
                        standing_id="auto-bid-c1",
                        purpose="bid",
                        per_txn_max_minor=3000,
                        valid_until_ms=FAR,
                    ),
                    bidder,
                )
            ]
        )
        self.standing.append(("auto-bid-c1", bidder))
        self.rotate(self.customers[2])

    def rotate(self, cust: Customer) -> None:
        old = cust.key
        new = cust.rotate()
        cmd = c.RegisterKey(
            client_id=self.next_id("rot-"), account_id=cust.id, public_key=public_key(new)
        )
        self.run([self.sign(cmd, cust, old)])

    # -- one batch ------------------------------------------------------------------------------

    def batch(self, size: int, b: int) -> None:
        rng = self.rng
        cmds: list[c.Command] = []
        for _ in range(size):
            cmds.append(self.one(rng.random()))
        self.run(cmds)
        self.governance(b)
        self.clock.advance(37_000)

    def one(self, r: float) -> c.Command:
        rng = self.rng
        a, z = rng.sample(self.customers, 2)
        amt = rng.randint(1, 5000)
        n = self.next_id("")
        if r < 0.22:
            return c.Deposit(
                client_id=f"d{n}",
                mirror_account_id="omni",
                account_id=a.id,
                amount_minor=amt * 10,
                currency=CCY,
            )
        if r < 0.50:
            self.moves.append(f"t{n}")
            return self.sign(self.transfer(f"t{n}", a, z, amt), a)
        if r < 0.56:
            return c.ChargeFee(
                client_id=f"f{n}",
                from_account_id=a.id,
                to_account_id="fee",
                amount_minor=rng.randint(1, 50),
                currency=CCY,
                fee_code="service",
            )
        if r < 0.64:
            self.holds.append(f"h{n}")
            hold = c.PlaceHold(
                client_id=f"h{n}",
                from_account_id=a.id,
                to_account_id=z.id,
                amount_minor=amt,
                currency=CCY,
                reason="bid",
                expires_at_ms=FAR,
            )
            return self.sign(hold, a)
        if r < 0.69 and self.holds:
            h = self.holds.pop(rng.randrange(len(self.holds)))
            if rng.random() < 0.5:
                return c.CaptureHold(
                    client_id=f"cap{n}", hold_id=h, amount_minor=rng.randint(1, 2000)
                )
            return c.ReleaseHold(client_id=f"rel{n}", hold_id=h, reason="lost")
        if r < 0.72:
            # auto-bid under the standing authorisation (revoked ones are refused)
            sid, who = self.standing[0] if self.standing else ("auto-bid-c1", self.customers[1])
            transfer = self.transfer(f"sb{n}", who, z if z is not who else a, min(amt, 3000))
            transfer = msgspec.structs.replace(
                transfer, purpose="bid", auth=c.Authorisation(standing_id=sid)
            )
            self.moves.append(f"sb{n}")
            return transfer
        if r < 0.75:
            # a large transfer: waits for a checker
            self.requests.append(f"L{n}")
            return self.sign(self.transfer(f"L{n}", a, z, APPROVAL_ABOVE + amt), a)
        if r < 0.78:
            bound = self.customers[5 * rng.randrange(4)]
            self.withdrawals.append(f"w{n}")
            withdrawal = c.RequestWithdrawal(
                client_id=f"w{n}",
                account_id=bound.id,
                mirror_account_id="omni",
                amount_minor=amt,
                currency=CCY,
                payee_ref=f"bank-{bound.id}",
                expires_at_ms=FAR,
            )
            return self.sign(withdrawal, bound)
        if r < 0.81:
            # refused: a signature by the wrong key (recorded with auth_failed)
            return self.sign(self.transfer(f"bad{n}", a, z, amt), a, key=z.key)
        if r < 0.84:
            # refused: no authorisation at all, or currency mismatch
            if rng.random() < 0.5:
                return self.transfer(f"x{n}", a, z, amt)
            return self.sign(
                c.Transfer(
                    client_id=f"x{n}",
                    from_account_id=a.id,
                    to_account_id="u0",
                    amount_minor=amt,
                    currency=CCY,
                ),
                a,
            )
        if r < 0.87:
            return self.sign(self.transfer(f"big{n}", a, z, 10**12), a)
        if r < 0.90:
            return c.Deposit(
                client_id=f"du{n}",
                mirror_account_id="omni-usd",
                account_id="u0",
                amount_minor=amt,
                currency="USD",
            )
        if r < 0.92:
            # refused: the platform tries to move customer money to its own account
            return c.Transfer(
                client_id=f"seg{n}",
                from_account_id=a.id,
                to_account_id="own",
                amount_minor=amt,
                currency=CCY,
            )
        self.moves.append(f"t{n}")
        return self.sign(self.transfer(f"t{n}", a, z, amt), a)

    @staticmethod
    def transfer(cid: str, a: Customer, z: Customer, amount: int) -> c.Transfer:
        return c.Transfer(
            client_id=cid,
            from_account_id=a.id,
            to_account_id=z.id,
            amount_minor=amount,
            currency=CCY,
        )

    # -- operators and checkers -----------------------------------------------------------------

    def governance(self, b: int) -> None:
        rng = self.rng
        operator: list[c.Command] = []
        if self.moves and b % 2 == 0:
            m = self.moves.pop(rng.randrange(len(self.moves)))
            rid = self.next_id("rev")
            operator.append(c.Reverse(client_id=rid, movement_id=m, reason="error"))
            self.requests.append(rid)
        for w in self.withdrawals[:2]:
            cid = self.next_id("ws" if rng.random() < 0.7 else "wf")
            if cid.startswith("ws"):
                operator.append(c.SettleWithdrawal(client_id=cid, withdrawal_id=w))
            else:
                operator.append(c.FailWithdrawal(client_id=cid, withdrawal_id=w, reason="bank"))
        del self.withdrawals[:2]
        if b % 9 == 4:
            version = self.policy.version + 1
            self.policy = msgspec.structs.replace(
                self.policy, version=version, approval_above_minor=APPROVAL_ABOVE + version
            )
            rid = f"policy-{version}"
            operator.append(c.SetPolicy(client_id=rid, policy=self.policy))
            self.requests.append(rid)
        if b % 13 == 6:
            operator.append(c.SetGate(client_id=f"gate-r{b}", gate="RESTRICTED", reason="alert"))
            self.requests.append(f"gate-r{b}")
        if b % 13 == 8:
            operator.append(c.SetGate(client_id=f"gate-n{b}", gate="NORMAL", reason="cleared"))
            self.requests.append(f"gate-n{b}")
        if b == 10:
            operator.append(
                c.ExpireHolds(client_id=f"sweep{b}")
            )  # nothing expired yet: an empty sweep
        self.run(operator, "operator:alice")
        if b == 12 and self.standing:
            sid, who = self.standing.pop()
            self.run(
                [c.RevokeStanding(client_id=f"revoke-{sid}", account_id=who.id, standing_id=sid)]
            )
        if b == 20:
            self.rotate(self.customers[4])
        # a burst of instructions from a role that may do none of them: refusals, most suppressed
        if b == 15:
            burst = [
                c.Deposit(
                    client_id=f"spam{b}-{k}",
                    mirror_account_id="omni",
                    account_id="c0",
                    amount_minor=1,
                    currency=CCY,
                )
                for k in range(200)
            ]
            self.run(burst, "auditor:eve")
        if b == 17:  # a minute later: the next refusal record counts the suppressed ones
            self.run(
                [c.FreezeAccount(client_id="spam-late", account_id="c0", reason="x")], "auditor:eve"
            )
        self.alerts(b)
        self.check(b)
        if b in (1, 5):
            self.reconcile(b)

    def alerts(self, b: int) -> None:
        """Early warning: a RED alert restricts the gate at once (no checker: the policy's
        auto_restrict is 1); a checker later lets the platform reopen. Alerts of each level are
        acknowledged and closed by roles allowed to."""
        if b == 2:
            raise_ = [
                c.RaiseAlert(
                    client_id="al-red", alert_id="W3-red", rule="W3", level="RED", summary="-"
                ),
                c.RaiseAlert(
                    client_id="al-yel",
                    alert_id="W1-c0",
                    rule="W1",
                    level="YELLOW",
                    subject="c0",
                    summary="-",
                ),
            ]
            self.run(raise_, EARLY_WARNING)
            self.run(
                [c.SetGate(client_id="auto-gate", gate="RESTRICTED", reason="W3")], EARLY_WARNING
            )
            self.run(
                [
                    c.AcknowledgeAlert(client_id="ack-yel", alert_id="W1-c0", note="seen"),
                    c.CloseAlert(client_id="close-yel", alert_id="W1-c0", reason="explained"),
                ],
                "platform:p1",
            )
            assert self.outcomes["auto-gate"] == "accepted", "the automatic restriction"
        if b == 3:
            self.run(
                [
                    c.AcknowledgeAlert(client_id="ack-red", alert_id="W3-red", note="on it"),
                    c.RaiseAlert(
                        client_id="al-or",
                        alert_id="M-or",
                        rule="manual",
                        level="ORANGE",
                        summary="-",
                    ),
                    c.RaiseAlert(
                        client_id="al-gr",
                        alert_id="M-gr",
                        rule="manual",
                        level="GREEN",
                        summary="-",
                    ),
                    c.CloseAlert(client_id="close-gr", alert_id="M-gr", reason="noise"),
                    c.SetGate(client_id="gate-n-ew", gate="NORMAL", reason="W3 cured"),
                ],
                OPERATOR,
            )
            self.requests.append("gate-n-ew")
        if b == 4:
            self.run(
                [
                    c.CloseAlert(client_id="close-red", alert_id="W3-red", reason="cured"),
                    c.AcknowledgeAlert(client_id="ack-or", alert_id="M-or", note="-"),
                    c.CloseAlert(client_id="close-or", alert_id="M-or", reason="done"),
                ],
                CHECKER,
            )

    def reconcile(self, b: int) -> None:
        """The day's reconciliation of each currency, requested by the operator with the log's
        own requirement at the current size, and signed off by the checker."""
        view = ledger_view.read(self.svc.store, PLATFORM)
        for k, (ccy, transit) in enumerate((("CNY", -200), ("USD", 0))):
            requirement = view.requirement.get(ccy, 0)
            closing = requirement + (500 if ccy == "CNY" else 0) - b * k
            difference = closing + transit - requirement
            rid = f"rec-{ccy}-{b}"
            cmd = c.RecordReconciliation(
                client_id=rid,
                reconciliation_id=f"r-{ccy}-{b}",
                currency=ccy,
                as_of_ms=self.clock.now,
                snapshot_size=view.snapshot_size,
                statements=[hashlib.sha256(f"{rid}/{i}".encode()).hexdigest() for i in range(2)],
                bank_closing_minor=closing,
                in_transit_minor=transit,
                requirement_minor=requirement,
                difference_minor=difference,
                breaks=k,
                result="balanced"
                if difference == 0
                else "excess"
                if difference > 0
                else "shortfall",
            )
            self.run([cmd], OPERATOR)
            self.run([c.ApproveRequest(client_id=f"ok-{rid}", request_id=rid)], CHECKER)
            assert (self.outcomes[rid], self.outcomes[f"ok-{rid}"]) == ("pending", "accepted")
            view.snapshot_size += 2  # the request and its approval; no money moved
        if b == 1:  # the CNY excess (300) is returned to the platform's bank, in two parts
            for part, amount in enumerate((100, 200)):
                sid = f"settle-r-CNY-{b}-{part}"
                settle = c.SettleReconciliation(
                    client_id=sid,
                    reconciliation_id=f"r-CNY-{b}",
                    own_account_id="own",
                    platform_bank_account_id="bank-p1",
                    amount_minor=amount,
                    currency=CCY,
                )
                self.run([settle], OPERATOR)
                self.run([c.ApproveRequest(client_id=f"ok-{sid}", request_id=sid)], CHECKER)
                assert (self.outcomes[sid], self.outcomes[f"ok-{sid}"]) == ("pending", "accepted")

    def check(self, b: int) -> None:
        """The checker decides on pending requests: most approved, some rejected, some left to
        expire (their late approval is refused), and one approval by the maker (refused)."""
        pending = [r for r in self.requests if self.outcomes.get(r) == "pending"]
        self.requests = [r for r in self.requests if r not in pending]
        approvals: list[c.Command] = []
        for rid in pending:
            roll = self.rng.random()
            if rid.startswith(("policy-", "gate-")) or roll < 0.7:
                approvals.append(c.ApproveRequest(client_id=f"ok-{rid}", request_id=rid))
            elif roll < 0.85:
                approvals.append(
                    c.RejectRequest(client_id=f"no-{rid}", request_id=rid, reason="not justified")
                )
            else:
                self.late.append(rid)
        self.run(approvals, CHECKER)
        if b % 5 == 0 and self.late:
            late, self.late = self.late, []
            self.run(
                [c.ApproveRequest(client_id=f"late-{rid}", request_id=rid) for rid in late],
                CHECKER,
            )
        if b == 3 and pending:
            # the maker approving their own request: refused (CHECKER_ROLE_REQUIRED)
            self.run([c.ApproveRequest(client_id=f"self-{b}", request_id="none")], "operator:alice")


def build_log(
    data_dir: Path,
    n_batches: int = 40,
    per_batch: int = 100,
    seed: int = 7,
    store_env: dict[str, str] | None = None,
) -> Config:
    """Create platform p1 with roughly n_batches * per_batch records; returns the store config."""
    env = dict(store_env or {})
    env.setdefault("CUSTODY_DATA_DIR", str(data_dir))
    env["CUSTODY_CHECKPOINT_EVERY"] = "0"
    cfg = Config.from_env(env)
    clock = FakeClock(START_MS)
    svc = LedgerService(cfg, clock_ms=clock)
    svc.start()
    try:
        assert svc.create_platform(PLATFORM, "Platform One", "operator:alice", POLICY).ok
        work = Workload(svc, clock, random.Random(seed))
        work.setup()
        for b in range(n_batches):
            work.batch(per_batch, b)
            if b % 7 == 6:
                clock.advance(30 * 60_000)  # half an hour: late approvals find requests expired
    finally:
        svc.close()
    return cfg
