"""Tamper campaign on a real exported log of ~3,000 records: every kind of change is detected
and the report names the first bad record (or the checkpoint, header or end line)."""

from __future__ import annotations

import base64
import json
import random

import pytest
from bundle_tools import (
    lines_of,
    rebuild,
    record_line,
    verify_bytes,
    verify_file_cli,
)

from ledger.checkpoint import NoteSigner, generate_key, sign_checkpoint

# another actor of the same role: a change the replay accepts, only the chain and tree see it
PLATFORM_ACTOR = b'"actor":"platform:test"'
OTHER_PLATFORM_ACTOR = b'"actor":"platform:tesX"'


def _accept(line, count):
    """The (where, position-or-size) reports that correctly locate damage in `line`."""
    if line.kind == "header":
        return {("header", None)}
    if line.kind == "record":
        return {("record", line.position)}
    if line.kind == "checkpoint":
        return {("checkpoint", line.size), ("record", line.size)}
    return {("end", None), ("record", count)}


def _located(failure):
    if failure.where == "header" or failure.where == "end":
        return (failure.where, None)
    if failure.where == "checkpoint":
        return ("checkpoint", failure.checkpoint)
    return (failure.where, failure.position)


def test_untouched_bundle_verifies(exported):
    failure, summary = verify_bytes(exported.data, exported.vkey)
    assert failure is None, failure.describe()
    assert summary.records == len(exported.records) > 2500
    assert summary.checkpoints >= 6
    assert summary.checkpoint_size == len(exported.records)
    assert summary.refused > 0
    assert summary.kinds.get("hold_captured") and summary.kinds.get("reversed")
    assert all(sum(per.values()) >= 0 for per in summary.balances.values())


def test_untouched_bundle_verifies_as_a_separate_process(exported):
    code, report, err = verify_file_cli(exported.bundle, exported.vkey)
    assert code == 0, err
    assert report["ok"] is True
    assert report["summary"]["records"] == len(exported.records)


def _flip_positions(lines, data, rng):
    """Every byte of the header, the end line and the first record; samples of the first
    checkpoint line and of a middle record line (with their newlines); 60 random bytes."""
    picks = set()
    rec = [ln for ln in lines if ln.kind == "record"]
    cps = [ln for ln in lines if ln.kind == "checkpoint"]
    for ln in [*(ln for ln in lines if ln.kind in ("header", "end")), rec[0]]:
        picks.update(range(ln.start, ln.start + len(ln.raw)))
    for ln, k in ((cps[0], 60), (rec[len(rec) // 2], 30)):
        picks.update(rng.sample(range(ln.start, ln.start + len(ln.raw)), k))
        picks.update((ln.start, ln.start + 1, ln.start + len(ln.raw) - 1))
    picks.update(rng.sample(range(len(data)), 60))
    return sorted(picks)


def test_every_single_byte_flip_is_detected_at_the_right_place(exported):
    data = exported.data
    lines = lines_of(data)
    count = len(exported.records)
    starts = [ln.start for ln in lines]
    rng = random.Random(5)
    positions = _flip_positions(lines, data, rng)
    assert len(positions) > 500
    import bisect

    for i, off in enumerate(positions):
        mask = (0x01, 0x20, 0x80, 0x0B)[i % 4]
        bad = bytearray(data)
        bad[off] ^= mask
        failure, _ = verify_bytes(bytes(bad), exported.vkey)
        line = lines[bisect.bisect_right(starts, off) - 1]
        assert failure is not None, f"flip at byte {off} ({line.kind}) not detected"
        assert _located(failure) in _accept(line, count), (off, line.kind, failure.describe())


def _body(lines):
    return [ln for ln in lines if ln.kind != "header"]


def _join(lines):
    return b"".join(ln.raw for ln in lines)


def _record_index(lines, pos):
    return next(i for i, ln in enumerate(lines) if ln.kind == "record" and ln.position == pos)


@pytest.mark.parametrize("pos", [0, 1, 7, 699, 999, 1500, -2, -1])
def test_deleted_record(exported, pos):
    lines = lines_of(exported.data)
    pos = pos % len(exported.records)
    i = _record_index(lines, pos)
    failure, _ = verify_bytes(_join(lines[:i] + lines[i + 1 :]), exported.vkey)
    assert (failure.where, failure.position) == ("record", pos), failure.describe()


@pytest.mark.parametrize("pos", [0, 3, 1000, 2222, -1])
def test_inserted_foreign_record(exported, pos):
    lines = lines_of(exported.data)
    pos = pos % len(exported.records)
    i = _record_index(lines, pos)
    donor = exported.records[(pos + 17) % len(exported.records)]
    forged = record_line(pos, b"\x11" * 32, donor)
    failure, _ = verify_bytes(_join(lines[:i]) + forged + _join(lines[i:]), exported.vkey)
    assert (failure.where, failure.position) == ("record", pos), failure.describe()


@pytest.mark.parametrize("pos", [0, 5, 1001, -2])
def test_duplicated_record(exported, pos):
    lines = lines_of(exported.data)
    pos = pos % len(exported.records)
    i = _record_index(lines, pos)
    failure, _ = verify_bytes(_join(lines[: i + 1] + lines[i:]), exported.vkey)
    assert (failure.where, failure.position) == ("record", pos + 1), failure.describe()


@pytest.mark.parametrize("pos", [0, 10, 1234, 2998])
def test_reordered_records(exported, pos):
    lines = lines_of(exported.data)
    i = _record_index(lines, pos)
    j = i + 1
    assert lines[j].kind == "record"
    swapped = [*lines[:i], lines[j], lines[i], *lines[j + 1 :]]
    failure, _ = verify_bytes(_join(swapped), exported.vkey)
    assert (failure.where, failure.position) == ("record", pos), failure.describe()


def test_reordered_with_renumbered_positions(exported):
    # positions fixed up, but the chain links still betray the swap
    lines = lines_of(exported.data)
    i = _record_index(lines, 500)
    a, b = lines[i].raw.split(b" ", 3), lines[i + 1].raw.split(b" ", 3)
    la = b" ".join([b"R", b"500", b[2], b[3]])
    lb = b" ".join([b"R", b"501", a[2], a[3]])
    out = _join(lines[:i]) + la + lb + _join(lines[i + 2 :])
    failure, _ = verify_bytes(out, exported.vkey)
    assert (failure.where, failure.position) == ("record", 500), failure.describe()


def test_truncation_anywhere(exported):
    data = exported.data
    lines = lines_of(data)
    starts = [ln.start for ln in lines]
    rng = random.Random(11)
    cuts = sorted({*rng.sample(range(len(data)), 60), *starts[:8], len(data) - 1, 0})
    import bisect

    for cut in cuts:
        failure, _ = verify_bytes(data[:cut], exported.vkey)
        assert failure is not None, f"truncation at {cut} not detected"
        line = lines[bisect.bisect_right(starts, cut) - 1] if cut else lines[0]
        if line.kind == "record" and cut > line.start:
            assert (failure.where, failure.position) == ("record", line.position)
        if cut in starts and lines[starts.index(cut)].kind == "record":
            # cut on a line boundary: everything before verifies, the end is missing
            assert (failure.where, failure.position) == (
                "bundle",
                lines[starts.index(cut)].position,
            ), failure.describe()


def test_dropping_the_final_checkpoint_and_end(exported):
    lines = lines_of(exported.data)
    body = [ln for ln in lines if ln.kind != "end"][:-1]  # final checkpoint gone too
    failure, _ = verify_bytes(_join(body), exported.vkey)
    assert failure.where == "bundle"
    # ... and with a made-up end line, the uncovered tail is still refused
    count = len(exported.records)
    n_cps = sum(1 for ln in body if ln.kind == "checkpoint")
    failure, _ = verify_bytes(_join(body) + b"end %d %d\n" % (count, n_cps), exported.vkey)
    assert failure.where == "end" and "not covered" in failure.reason


def _replace_checkpoint(exported, size, note):
    lines = lines_of(exported.data)
    k = next(i for i, ln in enumerate(lines) if ln.kind == "checkpoint" and ln.size == size)
    raw = b"C " + base64.b64encode(note) + b"\n"
    return _join(lines[:k]) + raw + _join(lines[k + 1 :])


def test_checkpoint_signed_by_another_key(exported, tmp_path):
    other = NoteSigner(generate_key(tmp_path / "other.pem"), exported.signer.name)
    note = sign_checkpoint(other, 1400, exported.tree.root(1400))
    out = _replace_checkpoint(exported, 1400, note)
    failure, _ = verify_bytes(out, exported.vkey)
    assert (failure.where, failure.checkpoint) == ("checkpoint", 1400), failure.describe()
    assert "trusted" in failure.reason
    path = tmp_path / "other-key.bundle"
    path.write_bytes(out)
    code, report, _ = verify_file_cli(path, exported.vkey)
    assert code == 1
    assert report["failure"]["where"] == "checkpoint"
    assert report["failure"]["checkpoint"] == 1400


def test_two_inconsistent_checkpoints(exported, tmp_path):
    # a checkpoint at 2100 signed by the REAL key over a different history (record 2050 altered)
    forked = list(exported.records)
    pos = _find(forked, PLATFORM_ACTOR, 2050)
    assert pos < 2100
    forked[pos] = forked[pos].replace(PLATFORM_ACTOR, OTHER_PLATFORM_ACTOR)
    assert forked[pos] != exported.records[pos]
    from ledger.merkle import MerkleLog

    fork_root = MerkleLog.build(forked[:2100]).root()
    note = sign_checkpoint(exported.signer, 2100, fork_root)
    out = _replace_checkpoint(exported, 2100, note)
    failure, _ = verify_bytes(out, exported.vkey)
    assert (failure.where, failure.checkpoint) == ("checkpoint", 2100), failure.describe()
    assert "does not match" in failure.reason
    path = tmp_path / "fork.bundle"
    path.write_bytes(out)
    code, report, _ = verify_file_cli(path, exported.vkey)
    assert code == 1 and report["failure"]["checkpoint"] == 2100
    # both checkpoints present, genuine then forged at the same size: also refused
    lines = lines_of(exported.data)
    k = next(i for i, ln in enumerate(lines) if ln.kind == "checkpoint" and ln.size == 2100)
    both = _join(lines[: k + 1]) + b"C " + base64.b64encode(note) + b"\n" + _join(lines[k + 1 :])
    failure, _ = verify_bytes(both, exported.vkey)
    assert (failure.where, failure.checkpoint) == ("checkpoint", 2100)


def test_rechained_alteration_is_caught_by_the_signed_root(exported):
    # change a record and recompute every later chain link (no signing key): the chain is
    # self-consistent again, but the next checkpoint's signed Merkle root no longer matches
    import hashlib

    lines = lines_of(exported.data)
    records = list(exported.records)
    pos = _find(records, PLATFORM_ACTOR, 1750)
    records[pos] = records[pos].replace(PLATFORM_ACTOR, OTHER_PLATFORM_ACTOR)
    out = []
    link = b"\x00" * 32
    for ln in lines:
        if ln.kind == "record":
            link = hashlib.sha256(link + records[ln.position]).digest()
            out.append(record_line(ln.position, link, records[ln.position]))
        else:
            out.append(ln.raw)
    failure, _ = verify_bytes(b"".join(out), exported.vkey)
    next_cp = min(ln.size for ln in lines if ln.kind == "checkpoint" and ln.size > pos)
    assert (failure.where, failure.checkpoint) == ("checkpoint", next_cp), failure.describe()


# -- a dishonest operator with the signing key: only the replay can catch these -----------------


def _header(exported):
    return b"".join(ln.raw for ln in lines_of(exported.data) if ln.kind == "header")


def _find(records, needle, start=0):
    return next(i for i in range(start, len(records)) if needle in records[i])


def _resigned(exported, records):
    return rebuild(_header(exported), records, exported.signer, [1000, 2000])


def test_resigned_honest_records_verify(exported):
    failure, _ = verify_bytes(_resigned(exported, list(exported.records)), exported.vkey)
    assert failure is None


def test_overdraft_caught_by_replay(exported):
    records = list(exported.records)
    i = _find(records, b'"kind":"transferred"', 100)
    rec = json.loads(records[i])
    rec["entries"][0][2] = 10**15
    records[i] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
    failure, _ = verify_bytes(_resigned(exported, records), exported.vkey)
    assert (failure.where, failure.position) == ("record", i), failure.describe()
    assert "below zero" in failure.reason


def test_refusal_that_moves_money_caught_by_replay(exported):
    records = list(exported.records)
    i = _find(records, b'"kind":"command_refused"', 100)
    rec = json.loads(records[i])
    rec["entries"] = [["omni", "c1", 5]]
    records[i] = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    failure, _ = verify_bytes(_resigned(exported, records), exported.vkey)
    assert (failure.where, failure.position) == ("record", i), failure.describe()
    assert "change nothing" in failure.reason


def test_cross_currency_posting_caught_by_replay(exported):
    records = list(exported.records)
    i = _find(records, b'"kind":"deposited"', 100)
    rec = json.loads(records[i])
    rec["entries"][0][1] = "u0"  # a USD account in a CNY posting
    records[i] = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    failure, _ = verify_bytes(_resigned(exported, records), exported.vkey)
    assert (failure.where, failure.position) == ("record", i), failure.describe()
    assert "currenc" in failure.reason


def test_foreign_platform_and_wrong_position_caught_by_replay(exported):
    records = list(exported.records)
    records[300] = records[300].replace(b'"platform":"p1"', b'"platform":"p9"')
    failure, _ = verify_bytes(_resigned(exported, records), exported.vkey)
    assert (failure.where, failure.position) == ("record", 300), failure.describe()
    records = list(exported.records)
    records[301] = records[301].replace(b'"seq":301,', b'"seq":300,')
    failure, _ = verify_bytes(_resigned(exported, records), exported.vkey)
    assert (failure.where, failure.position) == ("record", 301), failure.describe()


def test_duplicate_json_keys_rejected(exported):
    records = list(exported.records)
    records[200] = records[200][:-1] + b',"v":1}'
    failure, _ = verify_bytes(_resigned(exported, records), exported.vkey)
    assert (failure.where, failure.position) == ("record", 200), failure.describe()


def test_wrong_vkey_is_a_header_failure(exported, tmp_path):
    other = NoteSigner(generate_key(tmp_path / "o.pem"), exported.signer.name)
    failure, _ = verify_bytes(exported.data, other.vkey)
    assert failure.where == "header"


# -- the same campaign through the command line, as a separate process -------------------------


def _tampered(exported, how):
    lines = lines_of(exported.data)
    i = _record_index(lines, 1234)
    if how == "flip":
        bad = bytearray(exported.data)
        bad[lines[i].start + 100] ^= 0x04
        return bytes(bad), ("record", 1234)
    if how == "delete":
        return _join(lines[:i] + lines[i + 1 :]), ("record", 1234)
    if how == "insert":
        forged = record_line(1234, b"\x22" * 32, exported.records[10])
        return _join(lines[:i]) + forged + _join(lines[i:]), ("record", 1234)
    if how == "duplicate":
        return _join(lines[: i + 1] + lines[i:]), ("record", 1235)
    if how == "reorder":
        return _join([*lines[:i], lines[i + 1], lines[i], *lines[i + 2 :]]), ("record", 1234)
    if how == "truncate":
        return exported.data[: lines[i].start + 50], ("record", 1234)
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip", "delete", "insert", "duplicate", "reorder", "truncate"])
def test_tampering_detected_by_the_cli(exported, tmp_path, how):
    data, (where, position) = _tampered(exported, how)
    path = tmp_path / f"{how}.bundle"
    path.write_bytes(data)
    code, report, _ = verify_file_cli(path, exported.vkey)
    assert code == 1
    assert report["ok"] is False
    assert (report["failure"]["where"], report["failure"]["position"]) == (where, position)


# -- the two-process replay (--jobs 2) reports exactly what the single process does -------------


def _overdraft_then_flip(exported):
    records = list(exported.records)
    i = _find(records, b'"kind":"transferred"', 1500)
    rec = json.loads(records[i])
    rec["entries"][0][2] = 10**15
    records[i] = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    data = bytearray(_resigned(exported, records))
    data[-2000] ^= 0x01  # and an integrity failure later in the file
    return bytes(data)


@pytest.mark.parametrize(
    "how", ["flip", "delete", "insert", "duplicate", "reorder", "truncate", "replay", "clean"]
)
def test_two_process_replay_agrees(exported, how):
    if how == "clean":
        data = exported.data
    elif how == "replay":
        data = _overdraft_then_flip(exported)
    else:
        data = _tampered(exported, how)[0]
    f1, s1 = verify_bytes(data, exported.vkey, jobs=1)
    f2, s2 = verify_bytes(data, exported.vkey, jobs=2)
    if how == "clean":
        assert f1 is None and f2 is None
        timing = {"seconds": 0, "records_per_second": 0}
        assert s1.to_json() | timing == s2.to_json() | timing
    else:
        assert f1 is not None and f2 is not None
        assert (f1.where, f1.position, f1.checkpoint, f1.line, f1.reason) == (
            f2.where,
            f2.position,
            f2.checkpoint,
            f2.line,
            f2.reason,
        )
    if how == "replay":
        assert "below zero" in f1.reason


def test_two_process_cli(exported, tmp_path):
    path = tmp_path / "replay.bundle"
    path.write_bytes(_overdraft_then_flip(exported))
    code, report, _ = verify_file_cli(path, exported.vkey, jobs=2)
    assert code == 1 and "below zero" in report["failure"]["reason"]
    code, report, _ = verify_file_cli(exported.bundle, exported.vkey, jobs=2)
    assert code == 0 and report["summary"]["records"] == len(exported.records)


def test_money_moved_on_a_frozen_account_caught_by_replay(exported):
    """Turn a refusal (which changes nothing) into a freeze of the next transfer's payer,
    re-signed with the real key: the replay knows frozen accounts take no new money."""
    records = list(exported.records)
    i = next(
        n
        for n in range(1, len(records))
        if b'"kind":"transferred"' in records[n] and b'"kind":"command_refused"' in records[n - 1]
    )
    payer = json.loads(records[i])["entries"][0][0]
    refusal = json.loads(records[i - 1])
    for key in ("code", "control", "message", "linked_to", "auth_failed", "suppressed"):
        refusal.pop(key, None)
    cmd = {"op": "freeze_account", "client_id": refusal["cid"], "account_id": payer, "reason": "x"}
    refusal.update(kind="account_frozen", subject=payer, actor="platform:test", cmd=cmd)
    records[i - 1] = json.dumps(
        refusal, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    failure, _ = verify_bytes(_resigned(exported, records), exported.vkey)
    assert (failure.where, failure.position) == ("record", i), failure.describe()
    assert "frozen" in failure.reason
