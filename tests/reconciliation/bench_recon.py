"""Import and match one camt.053 statement of N entries against N ledger deposits (SQLite).

Usage: python tests/reconciliation/bench_recon.py 100000 (figures in docs/RECONCILIATION.md).
Half the entries carry an end-to-end id (matched by reference), half none (amount + date).
"""

# ruff: noqa: E402
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests/reconciliation")]
import recon_helpers as h
from helpers import ACTOR, FakeClock, make_platform, open_service, sqlite_env

from ledger import commands as c
from ledger.config import Config
from reconciliation import matching
from reconciliation.ledger_view import read as read_ledger
from reconciliation.statements import PlatformConfig, ReconStore

N = int(sys.argv[1])
d = Path(tempfile.mkdtemp())
svc = open_service(Config.from_env(sqlite_env(d)), FakeClock())
make_platform(svc)
D = "2023-11-15"
t = time.perf_counter()
for start in range(0, N, 5000):
    svc.execute(
        "p1",
        [
            c.Deposit(
                client_id=f"d{i}",
                mirror_account_id="omni",
                account_id="alice",
                amount_minor=100 + i,
                currency="CNY",
                bank_ref=f"E{i}",
            )
            for i in range(start, min(N, start + 5000))
        ],
        ACTOR,
    )
print(f"ledger: {N} deposits in {time.perf_counter() - t:.1f}s")
txs = [h.Tx(100 + i, D, (f"E{i}" if i % 2 else "",)) for i in range(N)]
for i in range(0, N, 2):
    txs[i].e2e = ()
total = sum(100 + i for i in range(N))
raw = h.camt053([h.Stmt("S", 1, 0, total, D, txs)], 8)
cfg = PlatformConfig(accounts={h.IBAN: "omni"})
r = ReconStore(svc.store)
t = time.perf_counter()
res = r.import_file("p1", raw, "camt053", cfg, now_ms=1)
ti = time.perf_counter() - t
print(
    f"import: {len(raw) / 1e6:.1f} MB, {N} entries, {res.status}, {ti:.2f}s "
    f"({N / ti:,.0f} entries/s)"
)
t = time.perf_counter()
view = read_ledger(svc.store, "p1", D)
tv = time.perf_counter() - t
t = time.perf_counter()
bank, _ = matching.bank_items(r, "p1", D)
tb = time.perf_counter() - t
t = time.perf_counter()
m = matching.match(view, bank, D, cfg)
tm = time.perf_counter() - t
print(
    f"fold log {view.size} records {tv:.2f}s; load entries {tb:.2f}s; match {tm:.2f}s: {m.counts()}"
)
svc.close()
