"""Every case of shared/vectors/signed-note.json, read directly from the file: the auditor's
note verifier (custody_verify.note) and, where it applies, the writer's signer
(ledger.checkpoint): key IDs, vkeys, deterministic re-signing, checkpoint bodies."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from custody_verify import merkle as vm
from custody_verify import note as vn
from ledger import checkpoint as wc

VECTORS = Path("/work/shared/vectors/signed-note.json")
V = json.loads(VECTORS.read_text())


def _note_bytes(case):
    return bytes.fromhex(case["note_hex"]) if "note_hex" in case else case["note"].encode()


def _verifiers(case):
    if "vkeys_from_key_of" in case:
        donor = vn.parse_vkey(case["vkeys_from_key_of"])
        name = case["vkey_name"]
        return [vn.Verifier(name, vn.key_id(name, donor.public_key), donor.public_key)]
    return [vn.parse_vkey(k) for k in case["vkeys"]]


def _pairs(sigs):
    return [[s.name, s.key_id_hex] for s in sigs]


@pytest.mark.parametrize("case", V["valid"], ids=lambda c: c["id"])
def test_valid_notes_open(case):
    note = vn.open_note(_note_bytes(case), _verifiers(case))
    want = case["expect"]
    assert want["accept"] is True
    assert note.text.decode() == want["text"]
    assert _pairs(note.verified) == want["verified"]
    assert _pairs(note.unverified) == want["unverified"]


@pytest.mark.parametrize("case", V["invalid"], ids=lambda c: c["id"])
def test_invalid_notes_rejected(case):
    assert case["expect"]["accept"] is False
    with pytest.raises(vn.NoteError):
        vn.open_note(_note_bytes(case), _verifiers(case))


@pytest.mark.parametrize("case", V["valid"], ids=lambda c: c["id"])
def test_vkeys_roundtrip_with_both_implementations(case):
    for vkey in case["vkeys"]:
        v = vn.parse_vkey(vkey)
        assert v.vkey == vkey
        assert wc.key_id(v.name, v.public_key) == v.key_id  # writer's key ID agrees
        assert wc.vkey_for(v.name, v.public_key) == vkey  # writer's vkey string agrees


def test_vkey_split_at_most_twice():
    # the Go checksum database key has '+' inside its base64
    v = vn.parse_vkey("sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8")
    assert v.name == "sum.golang.org" and v.key_id == 0x033DE0AE


def test_go_skey_resigns_deterministically():
    case = next(c for c in V["valid"] if c["id"] == "go-peterneumann-single")
    name, key = wc.parse_go_skey(case["skey"])
    signer = wc.NoteSigner(key, name)
    assert signer.vkey == case["vkeys"][0]
    assert signer.sign(case["expect"]["text"].encode()) == case["note"].encode()


def test_enoch_root_zero_seed_resign():
    case = next(c for c in V["valid"] if c["id"] == "go-two-signatures-both-known")
    enoch = wc.NoteSigner(wc.key_from_seed(bytes.fromhex(case["enoch_seed_hex"])), "EnochRoot")
    assert f"{enoch.key_id:08x}" == "af0cfe78"
    assert enoch.vkey == case["vkeys"][1]
    peter_case = next(c for c in V["valid"] if c["id"] == "go-peterneumann-single")
    _, pkey = wc.parse_go_skey(peter_case["skey"])
    peter = wc.NoteSigner(pkey, "PeterNeumann")
    text = case["expect"]["text"].encode()
    assert enoch.cosign(peter.sign(text)) == case["note"].encode()


def test_sumdb_checkpoint_body():
    case = next(c for c in V["valid"] if c["id"] == "sumdb-checkpoint-20852163-reconstructed")
    cp = vn.open_checkpoint(case["note"].encode(), _verifiers(case))
    want = case["checkpoint"]
    assert (cp.origin, cp.size, vn.b64encode(cp.root)) == (
        want["origin"],
        want["size"],
        want["root_b64"],
    )
    body = wc.checkpoint_body(cp.origin, cp.size, cp.root)
    assert body.decode() == case["expect"]["text"]


def test_parse_only_cosignature_example():
    case = next(c for c in V["parse_only"] if c["id"] == "c2sp-cosignature-example")
    text, sigs = vn.split_note(case["note"].encode())
    want = case["expect"]
    cp = vn.parse_checkpoint(text)
    assert (cp.origin, cp.size, vn.b64encode(cp.root)) == (
        want["checkpoint"]["origin"],
        want["checkpoint"]["size"],
        want["checkpoint"]["root_b64"],
    )
    assert len(sigs) == len(want["signatures"])
    for sig, w in zip(sigs, want["signatures"], strict=True):
        assert (sig.name, sig.key_id_hex, len(sig.signature)) == (
            w["name"],
            w["key_id"],
            w["sig_len"],
        )
        if "cosignature_timestamp" in w:
            assert int.from_bytes(sig.signature[:8], "big") == w["cosignature_timestamp"]
            msg = f"cosignature/v1\ntime {w['cosignature_timestamp']}\n".encode() + text
            assert msg.decode() == want["cosigned_message"]


def test_parse_only_sumdb_tree_note_text():
    case = next(c for c in V["parse_only"] if c["id"] == "go-sumdb-tree-note-text")
    cp = vn.parse_checkpoint(case["text"].encode())
    want = case["expect"]
    assert (cp.origin, cp.size) == (want["origin"], want["size"])
    assert cp.root == vm.leaf_hash(want["root_is_leaf_hash_of_utf8"].encode())


def test_fresh_checkpoint_sign_verify_and_tamper(tmp_path):
    key = wc.generate_key(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    origin = wc.origin_for("ledger-1", "p1")
    signer = wc.NoteSigner(wc.load_key(tmp_path / "k.pem"), origin)
    assert signer.public_key == wc.public_bytes(key)
    root = vm.leaf_hash(b"x")
    note = wc.sign_checkpoint(signer, 1, root)
    verifier = vn.parse_vkey(signer.vkey)
    cp = vn.open_checkpoint(note, [verifier])
    assert (cp.origin, cp.size, cp.root) == (origin, 1, root)
    with pytest.raises(vn.NoteError):
        vn.open_checkpoint(note.replace(b"\n1\n", b"\n2\n", 1), [verifier])
    renamed = vn.Verifier("other", vn.key_id("other", verifier.public_key), verifier.public_key)
    with pytest.raises(vn.NoteError):
        vn.open_checkpoint(note, [renamed])


def test_key_file_formats(tmp_path):
    seed = bytes(range(32))
    raw = tmp_path / "raw.key"
    raw.write_bytes(seed)
    raw.chmod(0o600)
    assert wc.public_bytes(wc.load_key(raw)) == wc.public_bytes(wc.key_from_seed(seed))
    hexed = tmp_path / "hex.key"
    hexed.write_text(seed.hex() + "\n")
    hexed.chmod(0o600)
    assert wc.public_bytes(wc.load_key(hexed)) == wc.public_bytes(wc.key_from_seed(seed))
    b64 = tmp_path / "b64.key"
    b64.write_text(base64.b64encode(seed).decode())
    b64.chmod(0o644)
    with pytest.raises(wc.KeyFileError):
        wc.load_key(b64)  # readable by others
    wc.generate_key(tmp_path / "new.pem")
    with pytest.raises(FileExistsError):
        wc.generate_key(tmp_path / "new.pem")  # never overwritten
