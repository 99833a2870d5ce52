"""custody-verify as a separate process: inclusion and consistency proofs from the writer's tree,
notes, exit codes, help; and the verifier's independence from the writer's code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_tools import REPO, run_cli

from ledger.checkpoint import tlog_proof

VERIFIER = REPO / "custody_verify"


def test_inclusion_proof_round_trip(exported, tmp_path):
    size = exported.checkpoints.last.size
    note = exported.checkpoints.last.note
    for index in (0, 1, 255, 256, 1234, size - 1):
        proof = tlog_proof(index, exported.tree.inclusion_proof(index, size), note)
        (tmp_path / "p.tlog-proof").write_bytes(proof)
        (tmp_path / "leaf").write_bytes(exported.records[index])
        proc = run_cli(
            "inclusion",
            str(tmp_path / "p.tlog-proof"),
            "--leaf",
            str(tmp_path / "leaf"),
            "--vkey",
            exported.vkey,
            "--origin",
            exported.signer.name,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # the wrong record, a record with a trailing newline, another index: all refused
    (tmp_path / "leaf").write_bytes(exported.records[index - 1])
    proc = run_cli(
        "inclusion",
        str(tmp_path / "p.tlog-proof"),
        "--leaf",
        str(tmp_path / "leaf"),
        "--vkey",
        exported.vkey,
    )
    assert proc.returncode == 1
    (tmp_path / "leaf").write_bytes(exported.records[index] + b"\n")
    proc = run_cli(
        "inclusion",
        str(tmp_path / "p.tlog-proof"),
        "--leaf",
        str(tmp_path / "leaf"),
        "--vkey",
        exported.vkey,
        "--json",
    )
    assert proc.returncode == 1 and "newline" in json.loads(proc.stdout)["error"]
    bad = proof.replace(b"index %d" % index, b"index %d" % (index - 1))
    (tmp_path / "p.tlog-proof").write_bytes(bad)
    (tmp_path / "leaf").write_bytes(exported.records[index])
    proc = run_cli(
        "inclusion",
        str(tmp_path / "p.tlog-proof"),
        "--leaf",
        str(tmp_path / "leaf"),
        "--vkey",
        exported.vkey,
    )
    assert proc.returncode == 1


def test_note_and_consistency_commands(exported, tmp_path):
    history = list(exported.checkpoints.history())
    old, new = history[0], history[-1]
    (tmp_path / "old.note").write_bytes(old.note)
    (tmp_path / "new.note").write_bytes(new.note)
    proc = run_cli("note", str(tmp_path / "new.note"), "--vkey", exported.vkey, "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["checkpoint"]["size"] == new.size
    path = exported.tree.consistency_proof(old.size, new.size)
    import base64

    (tmp_path / "proof").write_text("".join(base64.b64encode(h).decode() + "\n" for h in path))
    args = [str(tmp_path / "old.note"), str(tmp_path / "new.note"), str(tmp_path / "proof")]
    proc = run_cli("consistency", *args, "--vkey", exported.vkey)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # swapped notes, or a proof for other sizes: refused
    proc = run_cli("consistency", args[1], args[0], args[2], "--vkey", exported.vkey)
    assert proc.returncode == 1
    other = exported.tree.consistency_proof(old.size + 1, new.size)
    (tmp_path / "proof").write_text("".join(base64.b64encode(h).decode() + "\n" for h in other))
    proc = run_cli("consistency", *args, "--vkey", exported.vkey)
    assert proc.returncode == 1
    # a note with a flipped byte in its body
    (tmp_path / "bad.note").write_bytes(new.note.replace(b"\n", b"\n ", 1))
    proc = run_cli("note", str(tmp_path / "bad.note"), "--vkey", exported.vkey)
    assert proc.returncode == 1


def test_usage_errors_exit_2(exported, tmp_path):
    assert run_cli().returncode == 2
    assert run_cli("bundle", str(exported.bundle)).returncode == 2  # no --vkey
    assert run_cli("bundle", str(tmp_path / "missing"), "--vkey", exported.vkey).returncode == 2
    proc = run_cli("bundle", str(exported.bundle), "--vkey", "not+a+vkey")
    assert proc.returncode == 2 and "vkey" in proc.stderr
    assert run_cli("frobnicate").returncode == 2


def test_vkey_from_file(exported, tmp_path):
    (tmp_path / "ledger.vkey").write_text(exported.vkey + "\n")
    proc = run_cli("bundle", str(exported.bundle), "--vkey", str(tmp_path / "ledger.vkey"), "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK ")


def test_help_teaches():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for word in ("bundle", "note", "inclusion", "consistency", "Exit status", "--vkey"):
        assert word in proc.stdout
    proc = run_cli("bundle", "--help")
    assert proc.returncode == 0 and "--json" in proc.stdout


# -- independence -------------------------------------------------------------------------------

ALLOWED_THIRD_PARTY = {"cryptography"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module or "")
    return names


def test_verifier_imports_only_stdlib_and_cryptography():
    files = sorted(VERIFIER.glob("*.py"))
    assert {f.name for f in files} >= {"merkle.py", "note.py", "proof.py", "bundle.py", "cli.py"}
    for f in files:
        for name in _imports(f):
            top = name.split(".")[0]
            assert (
                top == "custody_verify"
                or top in sys.stdlib_module_names
                or top in ALLOWED_THIRD_PARTY
            ), f"{f.name} imports {name}"


def test_verifier_runs_with_ledger_unimportable():
    code = (
        "import sys\n"
        "for m in ('ledger', 'controls', 'projections', 'msgspec', 'eventsourcing'):\n"
        "    sys.modules[m] = None\n"
        "import custody_verify.cli, custody_verify.bundle, custody_verify.proof\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("module", ["ledger/merkle.py", "ledger/checkpoint.py", "ledger/export.py"])
def test_writer_tree_shares_no_code_with_the_verifier(module):
    assert not any(n.startswith("custody_verify") for n in _imports(REPO / module))
