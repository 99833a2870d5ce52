"""The verifier's `--level integrity` path (custody_verify/integrity.py): blocks of lines checked
independently (in worker processes with --jobs 2) and merged in file order.

Every tampering that checks 1-6 of docs/BUNDLE.md §2 catch must be reported by this path exactly
as the full level reports it (same place, line and reason), including damage right at the edges
of the blocks; its Merkle merging of aligned blocks must give the RFC 6962 roots.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import tempfile
from pathlib import Path

import pytest
from bundle_tools import lines_of, rebuild, run_cli, verify_bytes

from custody_verify import integrity
from custody_verify import merkle as vm
from custody_verify.bundle import MAX_LINE, VerificationFailed, verify_bundle
from custody_verify.note import open_checkpoint, parse_vkey
from ledger.checkpoint import NoteSigner, sign_checkpoint

VECTORS = Path("/work/shared/vectors/merkle-rfc6962.json")
SMALL_BLOCK = 2048  # a few records per block: many block edges in a 3,000-record bundle


def verify_integrity(data: bytes, vkey: str, jobs: int = 1, on_disk: bool = False):
    """On disk with jobs >= 2, the workers read their own byte ranges (integrity._ranges); from
    memory, this process ships them the blocks (integrity._shipped)."""
    with tempfile.TemporaryDirectory() as tmp:
        if on_disk:
            path = Path(tmp) / "b.bundle"
            path.write_bytes(data)
            f = open(path, "rb", buffering=1 << 20)  # noqa: SIM115
        else:
            f = io.BytesIO(data)
        try:
            with f:
                summary = verify_bundle(f, [parse_vkey(vkey)], jobs=jobs, level="integrity")
        except VerificationFailed as exc:
            return exc.failure, exc.summary
    return None, summary


def _report(failure, summary):
    f = failure
    return (
        (f.where, f.position, f.checkpoint, f.line, f.reason),
        (summary.records, summary.checkpoints, summary.chain_head),
    )


def _same_as_full(data: bytes, vkey: str, jobs: int = 1, on_disk: bool = False) -> None:
    full = verify_bytes(data, vkey)
    fast = verify_integrity(data, vkey, jobs, on_disk)
    assert full[0] is not None, "the tampering was not detected at all"
    assert fast[0] is not None, f"integrity level missed: {full[0].describe()}"
    assert _report(*fast) == _report(*full), (fast[0].describe(), full[0].describe())


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(integrity, "BLOCK", SMALL_BLOCK)


def _block_edges(data: bytes) -> list[int]:
    """Byte offsets (in the whole file) where the reader starts a new block."""
    header_end = data.index(b"begin\n") + len(b"begin\n")
    f = io.BytesIO(data[header_end:])
    edges, off = [], header_end
    for piece in integrity.pieces(f, MAX_LINE):
        off += len(piece.block)
        edges.append(off)
    return edges[:-1]


# -- Merkle: aligned blocks merged into the frontier give the RFC 6962 root ----------------------


def _root_by_blocks(leaf_hashes: list[bytes], cuts: list[int]) -> bytes:
    frontier = integrity.Frontier()
    bounds = [0, *cuts, len(leaf_hashes)]
    for a, e in itertools.pairwise(bounds):
        nodes, at = [], a
        for size in integrity.blocks(a, e):
            sub = vm.RootBuilder()
            for h in leaf_hashes[at : at + size]:
                sub.push(h)
            nodes.append(sub.root())
            at += size
        frontier.extend(a, e, nodes)
    return frontier.root()


def test_blocked_roots_match_the_rfc6962_vectors():
    v = json.loads(VECTORS.read_text())
    leaves = [vm.leaf_hash(bytes.fromhex(x)) for x in v["leaves_hex"]]
    checked = 0
    for case in v["roots"]:
        n = case["size"]
        for mask in range(1 << max(n - 1, 0)):  # every way to cut 0..n into blocks
            cuts = [i for i in range(1, n) if mask >> (i - 1) & 1]
            assert _root_by_blocks(leaves[:n], cuts) == bytes.fromhex(case["root_hex"])
            checked += 1
    assert checked > 200


def test_blocked_roots_match_the_stack_algorithm_on_random_cuts():
    rng = random.Random(11)
    for n in [*range(0, 70), 127, 128, 129, 300, 1025]:
        leaves = [vm.leaf_hash(b"%d" % i) for i in range(n)]
        want = vm.root_from_leaves(b"%d" % i for i in range(n))
        for _ in range(4):
            cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, 6)))) if n > 1 else []
            assert _root_by_blocks(leaves, cuts) == want, (n, cuts)


def test_blocks_partition_the_range_into_aligned_powers_of_two():
    for a in range(0, 70):
        for e in range(a, 140):
            sizes = integrity.blocks(a, e)
            assert sum(sizes) == e - a
            at = a
            for s in sizes:
                assert s & (s - 1) == 0 and at % s == 0
                at += s


# -- the whole bundle ---------------------------------------------------------------------------


@pytest.mark.parametrize(("jobs", "on_disk"), [(1, False), (2, False), (2, True), (3, True)])
@pytest.mark.parametrize("block", [SMALL_BLOCK, 777, None])
def test_untouched_bundle_verifies_at_the_integrity_level(
    exported, monkeypatch, jobs, on_disk, block
):
    if block is not None:
        monkeypatch.setattr(integrity, "BLOCK", block)
    failure, fast = verify_integrity(exported.data, exported.vkey, jobs, on_disk)
    assert failure is None, failure.describe()
    failure, full = verify_bytes(exported.data, exported.vkey)
    assert failure is None
    assert fast.level == "integrity" and full.level == "full"
    assert fast.records == full.records == len(exported.records)
    assert (fast.checkpoints, fast.checkpoint_size, fast.checkpoint_root, fast.chain_head) == (
        full.checkpoints,
        full.checkpoint_size,
        full.checkpoint_root,
        full.chain_head,
    )
    assert fast.accounts == 0 and fast.kinds == {}  # nothing replayed, and it does not pretend


def test_every_byte_flip_at_block_edges_is_reported_as_the_full_level_does(exported, small_blocks):
    data = exported.data
    edges = _block_edges(data)
    assert len(edges) > 300
    rng = random.Random(3)
    offsets = sorted({e + d for e in rng.sample(edges, 40) for d in (-2, -1, 0, 1, 2, 50)})
    offsets += [len(data) - 1, len(data) - 2]  # the end line and its LF
    for i, off in enumerate(offsets):
        bad = bytearray(data)
        bad[off] ^= (0x01, 0x20, 0x80, 0x0B)[i % 4]
        _same_as_full(bytes(bad), exported.vkey)


@pytest.mark.parametrize("on_disk", [False, True])
def test_random_byte_flips_in_two_processes(exported, small_blocks, on_disk):
    rng = random.Random(9)
    data = exported.data
    for off in rng.sample(range(len(data)), 12):
        bad = bytearray(data)
        bad[off] ^= 0x04
        _same_as_full(bytes(bad), exported.vkey, jobs=2, on_disk=on_disk)


def test_byte_flips_at_block_edges_with_workers_reading_the_file(exported, small_blocks):
    """Each worker finds its own first line and trusts its first record's stored link until the
    merge checks it: damage to that record, or to the line before it, must still be reported
    exactly as the full level does."""
    data = exported.data
    edges = _block_edges(data)
    rng = random.Random(4)
    offsets = sorted({e + d for e in rng.sample(edges, 6) for d in (-2, -1, 0, 1, 3, 60)})
    for i, off in enumerate(offsets):
        bad = bytearray(data)
        bad[off] ^= (0x01, 0x20, 0x80, 0x0B)[i % 4]
        _same_as_full(bytes(bad), exported.vkey, jobs=2, on_disk=True)


def _records_around_edges(data: bytes, count: int) -> list[int]:
    """Positions of the first record of some blocks (and the one before it)."""
    lines = lines_of(data)
    starts = {ln.start: ln for ln in lines}
    out = set()
    for edge in _block_edges(data)[::25]:
        ln = starts.get(edge)
        if ln is not None and ln.kind == "record":
            out.update({ln.position, ln.position - 1})
    return sorted(p for p in out if 0 <= p < count)


def _edit(data: bytes, how: str, pos: int) -> bytes:
    lines = lines_of(data)
    i = next(k for k, ln in enumerate(lines) if ln.kind == "record" and ln.position == pos)
    raw = [ln.raw for ln in lines]
    if how == "delete":
        del raw[i]
    elif how == "duplicate":
        raw.insert(i, raw[i])
    elif how == "swap":
        j = next(k for k in range(i + 1, len(lines)) if lines[k].kind == "record")
        raw[i], raw[j] = raw[j], raw[i]
    elif how == "truncate":
        return b"".join(raw[:i]) + raw[i][: len(raw[i]) // 2]
    return b"".join(raw)


@pytest.mark.parametrize("how", ["delete", "duplicate", "swap", "truncate"])
def test_deletion_insertion_reordering_truncation_at_block_edges(exported, small_blocks, how):
    positions = _records_around_edges(exported.data, len(exported.records))
    assert len(positions) >= 10
    for n, pos in enumerate(positions):
        jobs, on_disk = ((2, True), (2, False), (1, False))[min(n // 3, 2)]
        _same_as_full(_edit(exported.data, how, pos), exported.vkey, jobs, on_disk)


def test_checkpoint_lines_damaged_or_moved(exported, small_blocks):
    data = exported.data
    lines = lines_of(data)
    cps = [k for k, ln in enumerate(lines) if ln.kind == "checkpoint"]
    raw = [ln.raw for ln in lines]
    # a checkpoint moved one record later, one dropped, one repeated, and the end line changed
    moved = list(raw)
    k = cps[1]
    moved[k], moved[k + 1] = moved[k + 1], moved[k]
    dropped = raw[: cps[0]] + raw[cps[0] + 1 :]
    repeated = [*raw[: cps[2] + 1], raw[cps[2]], *raw[cps[2] + 1 :]]
    no_end = raw[:-1]
    extra = [*raw, b"R 0 x y\n"]
    for bad in (moved, dropped, repeated, no_end, extra):
        _same_as_full(b"".join(bad), exported.vkey)
        _same_as_full(b"".join(bad), exported.vkey, jobs=2, on_disk=True)


def test_a_rewritten_history_is_caught_at_its_checkpoint(exported, small_blocks):
    """Records changed and re-chained without the key: the chain verifies, the next signed
    root does not (the operator's old signatures are kept)."""
    records = list(exported.records)
    records[1234] = records[1234].replace(b'"ts":', b'"ts": ', 1)
    lines = lines_of(exported.data)
    header = b"".join(ln.raw for ln in lines if ln.kind == "header")
    cps = [ln.size for ln in lines if ln.kind == "checkpoint"]
    forged = rebuild(header, records, exported.signer, cps)  # re-signed: must pass the hashes
    failure, _ = verify_integrity(forged, exported.vkey)
    assert failure is None  # a key holder can re-sign: only the replay (or held notes) see it
    # keep the old checkpoint lines: now the root check must fire at the first one after 1234
    old_cps = [ln.raw for ln in lines if ln.kind == "checkpoint"]
    new = [ln for ln in lines_of(forged) if ln.kind != "checkpoint"]
    mixed, c = [], 0
    for ln in lines_of(forged):
        if ln.kind == "checkpoint":
            mixed.append(old_cps[c])
            c += 1
        else:
            mixed.append(ln.raw)
    assert new
    failure, _ = verify_integrity(b"".join(mixed), exported.vkey, jobs=2, on_disk=True)
    assert failure is not None and failure.where == "checkpoint"
    assert failure.checkpoint == min(s for s in cps if s > 1234)
    _same_as_full(b"".join(mixed), exported.vkey)


def test_the_integrity_level_does_not_replay(exported):
    """What the level leaves out, shown: an overdraft re-signed with the real key passes the
    integrity level and fails the full level."""
    records = list(exported.records)
    i = next(n for n in range(1500, len(records)) if b'"kind":"transferred"' in records[n])
    rec = json.loads(records[i])
    rec["entries"][0][2] = 10**15
    records[i] = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    lines = lines_of(exported.data)
    header = b"".join(ln.raw for ln in lines if ln.kind == "header")
    cps = [ln.size for ln in lines if ln.kind == "checkpoint"]
    forged = rebuild(header, records, exported.signer, cps)
    assert verify_integrity(forged, exported.vkey)[0] is None
    failure, _ = verify_bytes(forged, exported.vkey)
    assert failure is not None and "below zero" in failure.reason


def test_cli_integrity_level(exported, tmp_path):
    proc = run_cli(
        "bundle", str(exported.bundle), "--vkey", exported.vkey, "--level", "integrity",
        "--jobs", "2", "--json", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)["summary"]
    assert summary["level"] == "integrity" and summary["records"] == len(exported.records)
    proc = run_cli("bundle", str(exported.bundle), "--vkey", exported.vkey, "--level", "integrity")
    assert proc.returncode == 0 and "NOT replayed" in proc.stdout
    bad = bytearray(exported.data)
    bad[len(bad) // 2] ^= 0x01
    path = tmp_path / "bad.bundle"
    path.write_bytes(bytes(bad))
    proc = run_cli(
        "bundle", str(path), "--vkey", exported.vkey, "--level", "integrity", "--jobs", "2",
        "--json", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["failure"]["where"] in ("record", "checkpoint")
    proc = run_cli("bundle", str(path), "--vkey", exported.vkey, "--level", "fast")
    assert proc.returncode == 2


# -- checkpoints the auditor already holds (--checkpoint) ---------------------------------------


def _held(exported, *sizes):
    return [
        open_checkpoint(
            sign_checkpoint(exported.signer, n, exported.tree.root(n)), [parse_vkey(exported.vkey)]
        )
        for n in sizes
    ]


def _both_levels(data, exported, held, on_disk=False):
    """(full, integrity --jobs 1, integrity --jobs 2) results with `held` checkpoints."""
    v = [parse_vkey(exported.vkey)]
    out = []
    for level, jobs in (("full", 1), ("integrity", 1), ("integrity", 2)):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "b.bundle"
            path.write_bytes(data)
            f = open(path, "rb") if on_disk else io.BytesIO(data)  # noqa: SIM115
            try:
                with f:
                    out.append((None, verify_bundle(f, v, jobs=jobs, level=level, held=held)))
            except VerificationFailed as exc:
                out.append((exc.failure, exc.summary))
    return out


@pytest.mark.parametrize("on_disk", [False, True])
def test_held_checkpoints_that_match(exported, small_blocks, on_disk):
    count = len(exported.records)
    edges = _records_around_edges(exported.data, count)[:5]
    held = _held(exported, 1, 2, 700, 1000, count, *edges)
    for failure, summary in _both_levels(exported.data, exported, held, on_disk):
        assert failure is None, failure.describe()
        assert summary.held_checkpoints == len(held)


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_history_rewritten_and_resigned_is_caught_by_a_held_checkpoint(
    exported, small_blocks, on_disk
):
    """The operator (who has the key) changes record 1234, re-chains and re-signs every
    checkpoint: the bundle is self-consistent; only a checkpoint kept from before shows it."""
    records = list(exported.records)
    records[1234] = records[1234].replace(b'"ts":', b'"ts": ', 1)
    lines = lines_of(exported.data)
    header = b"".join(ln.raw for ln in lines if ln.kind == "header")
    forged = rebuild(header, records, exported.signer, [ln.size for ln in lines if ln.size])
    assert verify_integrity(forged, exported.vkey)[0] is None
    results = _both_levels(forged, exported, _held(exported, 1000, 1500, 2000), on_disk)
    reports = [_report(*r) for r in results]
    assert reports[0] == reports[1] == reports[2], reports
    failure = results[0][0]
    assert (failure.where, failure.checkpoint) == ("checkpoint", 1500)
    assert "rewritten" in failure.reason


def test_a_bundle_shorter_than_a_held_checkpoint_fails(exported, small_blocks):
    records = list(exported.records)[:2000]
    lines = lines_of(exported.data)
    header = b"".join(ln.raw for ln in lines if ln.kind == "header")
    sizes = [ln.size for ln in lines if ln.size and ln.size <= 2000]
    cut = rebuild(header, records, exported.signer, sizes)
    results = _both_levels(cut, exported, _held(exported, 1000, 2500), on_disk=True)
    reports = [_report(*r) for r in results]
    assert reports[0] == reports[1] == reports[2], reports
    failure = results[0][0]
    assert (failure.where, failure.checkpoint) == ("end", 2500) and "cut back" in failure.reason


def test_held_checkpoint_of_another_log(exported):
    other = NoteSigner(exported.signer.key, "custody-ledger.example/other/p9")
    note = sign_checkpoint(other, 10, exported.tree.root(10))
    held = [open_checkpoint(note, [parse_vkey(other.vkey)])]
    for failure, _ in _both_levels(exported.data, exported, held):
        assert (
            failure is not None
            and failure.where == "checkpoint"
            and "another log" in (failure.reason)
        )


def test_cli_held_checkpoints(exported, tmp_path):
    good = tmp_path / "good.note"
    good.write_bytes(sign_checkpoint(exported.signer, 1500, exported.tree.root(1500)))
    bad = tmp_path / "bad.note"
    bad.write_bytes(sign_checkpoint(exported.signer, 1500, exported.tree.root(1499)))
    for level in ("full", "integrity"):
        args = ["bundle", str(exported.bundle), "--vkey", exported.vkey, "--level", level]
        proc = run_cli(*args, "--checkpoint", str(good), "--json", "--quiet")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["summary"]["held_checkpoints"] == 1
        proc = run_cli(*args, "--checkpoint", str(bad), "--json", "--quiet")
        assert proc.returncode == 1
        assert json.loads(proc.stdout)["failure"]["checkpoint"] == 1500
    unsigned = tmp_path / "unsigned.note"
    unsigned.write_bytes(b"not a note\n")
    proc = run_cli("bundle", str(exported.bundle), "--vkey", exported.vkey, "--checkpoint",
                   str(unsigned))  # fmt: skip
    assert proc.returncode == 2


# -- lines longer than a block, and longer than the verifier reads ------------------------------


def _with_long_refusal(exported, size: int) -> bytes:
    """The log with one refusal's message made `size` bytes long, re-chained and re-signed:
    a valid bundle with a line that spans several blocks."""
    records = list(exported.records)
    i = next(n for n in range(1200, len(records)) if b'"kind":"command_refused"' in records[n])
    rec = json.loads(records[i])
    rec["message"] = "x" * size
    records[i] = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    lines = lines_of(exported.data)
    header = b"".join(ln.raw for ln in lines if ln.kind == "header")
    return rebuild(header, records, exported.signer, [ln.size for ln in lines if ln.size])


@pytest.mark.parametrize(("jobs", "on_disk"), [(1, False), (2, False), (2, True)])
def test_a_line_longer_than_several_blocks(exported, small_blocks, jobs, on_disk):
    data = _with_long_refusal(exported, 5 * SMALL_BLOCK + 17)
    full = verify_bytes(data, exported.vkey)
    assert full[0] is None, full[0].describe()
    failure, fast = verify_integrity(data, exported.vkey, jobs, on_disk)
    assert failure is None, failure.describe()
    assert (fast.records, fast.chain_head) == (full[1].records, full[1].chain_head)


@pytest.mark.parametrize(("jobs", "on_disk"), [(1, False), (2, False), (2, True)])
def test_a_line_longer_than_the_verifier_reads(exported, monkeypatch, jobs, on_disk):
    """A record line longer than MAX_LINE is cut where readline(MAX_LINE) cuts it, and reported
    at that record by both levels (here MAX_LINE is made small so the bundle stays small)."""
    from custody_verify import bundle

    monkeypatch.setattr(bundle, "MAX_LINE", 8192)
    monkeypatch.setattr(integrity, "BLOCK", 2048)
    data = _with_long_refusal(exported, 3 * 8192)
    full = verify_bytes(data, exported.vkey)
    assert full[0] is not None and full[0].reason == "malformed record line"
    fast = verify_integrity(data, exported.vkey, jobs, on_disk)
    assert fast[0] is not None
    assert _report(*fast) == _report(*full), (fast[0].describe(), full[0].describe())
