"""Fixtures for the audit tests: one real log of a few thousand records, exported once."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import PLATFORM, build_log

from ledger.checkpoint import (
    CheckpointLog,
    NoteSigner,
    generate_key,
    origin_for,
    tree_consistency,
)
from ledger.config import Config
from ledger.export import export_bundle
from ledger.merkle import MerkleLog, store_fetcher
from ledger.records import unpack_state
from ledger.store import LedgerStore, log_stream

CHECKPOINT_EVERY = 700


@dataclass
class Exported:
    dir: Path
    config: Config
    store: LedgerStore
    signer: NoteSigner
    checkpoints: CheckpointLog
    tree: MerkleLog
    bundle: Path
    data: bytes
    records: list[bytes]  # record bytes by position

    @property
    def vkey(self) -> str:
        return self.signer.vkey


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("audit")
    config = build_log(d / "data", n_batches=30, per_batch=100)
    store = LedgerStore(config)
    signer = NoteSigner(generate_key(d / "signing.pem"), origin_for("ledger-test", PLATFORM))
    records = [unpack_state(packed)[1] for _, _, packed in store.iter_rows(log_stream(PLATFORM))]
    tree = MerkleLog.build(records, store_fetcher(store, PLATFORM))
    cplog = CheckpointLog(d / "checkpoints", signer, tree_consistency(tree))
    # checkpoints published while the log grew, then the export signs the final one
    published = [cplog.sign(n, tree.root(n)) for n in (1000, 2000)]
    bundle = d / "p1.bundle"
    export_bundle(
        store,
        PLATFORM,
        bundle,
        signer,
        checkpoints=published,
        checkpoint_log=cplog,
        every=CHECKPOINT_EVERY,
    )
    yield Exported(d, config, store, signer, cplog, tree, bundle, bundle.read_bytes(), records)
    store.close()
