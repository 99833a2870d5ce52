"""The writer's export: streaming, partial exports, published checkpoints checked."""

from __future__ import annotations

import io

import pytest
from bundle_tools import lines_of, verify_bytes
from workload import PLATFORM

from custody_verify import merkle as vm
from ledger.checkpoint import NoteSigner, generate_key, sign_checkpoint
from ledger.export import ExportError, export_bundle


def test_export_prefix_with_progress(exported):
    seen = []
    buf = io.BytesIO()
    result = export_bundle(
        exported.store,
        PLATFORM,
        buf,
        exported.signer,
        upto=1500,
        progress=lambda n, total: seen.append((n, total)),
    )
    assert result.records == 1500 and seen[-1] == (1500, 1500)
    assert result.root == vm.root_from_leaves(exported.records[:1500])
    failure, summary = verify_bytes(buf.getvalue(), exported.vkey)
    assert failure is None and summary.records == 1500 and summary.checkpoints == 1


def test_export_includes_published_checkpoints(exported):
    sizes = [ln.size for ln in lines_of(exported.data) if ln.kind == "checkpoint"]
    assert {1000, 2000, 700, 1400, len(exported.records)} <= set(sizes)
    assert sizes == sorted(sizes)


def test_export_refuses_a_published_checkpoint_that_does_not_match(exported):
    wrong = sign_checkpoint(exported.signer, 1000, exported.tree.root(999))
    with pytest.raises(ExportError):
        export_bundle(exported.store, PLATFORM, io.BytesIO(), exported.signer, checkpoints=[wrong])


def test_export_refuses_origin_of_another_platform(exported, tmp_path):
    other = NoteSigner(generate_key(tmp_path / "k.pem"), "custody-ledger.example/x/p2")
    with pytest.raises(ValueError):
        export_bundle(exported.store, PLATFORM, tmp_path / "b", other)


def test_export_to_path_is_atomic(exported, tmp_path):
    target = tmp_path / "out.bundle"
    result = export_bundle(exported.store, PLATFORM, target, exported.signer, upto=10)
    assert result.path == target and target.exists()
    assert not (tmp_path / "out.bundle.partial").exists()
