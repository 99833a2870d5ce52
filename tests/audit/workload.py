"""A realistic mixed log on a real LedgerService: accounts, deposits, transfers, fees, holds,
captures, releases, withdrawals, reversals, and refusals of several kinds."""

from __future__ import annotations

import random
from pathlib import Path

from ledger import commands as c
from ledger.config import Config
from ledger.service import LedgerService

PLATFORM = "p1"


def build_log(data_dir: Path, n_batches: int = 40, per_batch: int = 100, seed: int = 7) -> Config:
    """Create platform p1 with roughly n_batches * per_batch records; returns the store config."""
    cfg = Config.from_env({"CUSTODY_DATA_DIR": str(data_dir)})
    svc = LedgerService(cfg)
    svc.start()
    try:
        assert svc.create_platform(PLATFORM, "Platform One", "operator:alice").ok
        rng = random.Random(seed)
        ccy = "CNY"
        setup = [
            c.OpenAccount(client_id="o-omni", account_id="omni", kind="omnibus", currency=ccy),
            c.OpenAccount(client_id="o-fee", account_id="fee", kind="fee_income", currency=ccy),
            c.OpenAccount(client_id="o-usd", account_id="omni-usd", kind="omnibus", currency="USD"),
        ]
        customers = [f"c{i}" for i in range(20)]
        for i, cid in enumerate(customers):
            setup.append(
                c.OpenAccount(
                    client_id=f"o-{cid}",
                    account_id=cid,
                    kind="customer",
                    currency=ccy,
                    role="lender" if i % 2 else "borrower",
                    holder_name=f"客户 {i}" if i % 5 == 0 else None,
                )
            )
        setup.append(
            c.OpenAccount(
                client_id="o-u0", account_id="u0", kind="customer", currency="USD", role="other"
            )
        )
        assert all(o.ok for o in svc.execute(PLATFORM, setup, "platform:p1"))
        n = 0
        holds: list[str] = []
        moves: list[str] = []
        for _b in range(n_batches):
            cmds: list[c.Command] = []
            for _ in range(per_batch):
                n += 1
                r = rng.random()
                a, z = rng.sample(customers, 2)
                amt = rng.randint(1, 5000)
                if r < 0.25:
                    cmds.append(
                        c.Deposit(
                            client_id=f"d{n}",
                            mirror_account_id="omni",
                            account_id=a,
                            amount_minor=amt * 10,
                            currency=ccy,
                        )
                    )
                elif r < 0.55:
                    cmds.append(
                        c.Transfer(
                            client_id=f"t{n}",
                            from_account_id=a,
                            to_account_id=z,
                            amount_minor=amt,
                            currency=ccy,
                        )
                    )
                    moves.append(f"t{n}")
                elif r < 0.62:
                    cmds.append(
                        c.ChargeFee(
                            client_id=f"f{n}",
                            from_account_id=a,
                            to_account_id="fee",
                            amount_minor=rng.randint(1, 50),
                            currency=ccy,
                            fee_code="service",
                        )
                    )
                elif r < 0.72:
                    cmds.append(
                        c.PlaceHold(
                            client_id=f"h{n}",
                            from_account_id=a,
                            to_account_id=z,
                            amount_minor=amt,
                            currency=ccy,
                            reason="bid",
                            expires_at_ms=4_102_444_800_000,
                        )
                    )
                    holds.append(f"h{n}")
                elif r < 0.78 and holds:
                    h = holds.pop(rng.randrange(len(holds)))
                    if rng.random() < 0.5:
                        cmds.append(
                            c.CaptureHold(
                                client_id=f"cap{n}", hold_id=h, amount_minor=rng.randint(1, 2000)
                            )
                        )
                    else:
                        cmds.append(c.ReleaseHold(client_id=f"rel{n}", hold_id=h, reason="lost"))
                elif r < 0.82 and moves:
                    m = moves.pop(rng.randrange(len(moves)))
                    cmds.append(c.Reverse(client_id=f"rev{n}", movement_id=m, reason="error"))
                elif r < 0.86:
                    # refused: currency mismatch / unknown account / insufficient funds
                    cmds.append(
                        c.Transfer(
                            client_id=f"x{n}",
                            from_account_id=a,
                            to_account_id="u0",
                            amount_minor=amt,
                            currency=ccy,
                        )
                    )
                elif r < 0.90:
                    cmds.append(
                        c.Transfer(
                            client_id=f"big{n}",
                            from_account_id=a,
                            to_account_id=z,
                            amount_minor=10**12,
                            currency=ccy,
                        )
                    )
                elif r < 0.93:
                    cmds.append(
                        c.Deposit(
                            client_id=f"du{n}",
                            mirror_account_id="omni-usd",
                            account_id="u0",
                            amount_minor=amt,
                            currency="USD",
                        )
                    )
                else:
                    cmds.append(
                        c.Transfer(
                            client_id=f"t{n}",
                            from_account_id=a,
                            to_account_id=z,
                            amount_minor=amt,
                            currency=ccy,
                        )
                    )
                    moves.append(f"t{n}")
            svc.execute(PLATFORM, cmds, "platform:p1")
    finally:
        svc.close()
    return cfg
