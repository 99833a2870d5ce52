"""Test helpers to take a bundle apart, tamper with it and put it back together."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from custody_verify.bundle import VerificationFailed, verify_bundle
from custody_verify.note import parse_checkpoint, parse_vkey, split_note

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Line:
    kind: str  # header | record | checkpoint | end
    start: int  # byte offset in the bundle
    raw: bytes
    position: int | None = None  # record position
    size: int | None = None  # checkpoint size


def lines_of(data: bytes) -> list[Line]:
    out: list[Line] = []
    off = 0
    in_header = True
    for raw in data.splitlines(keepends=True):
        if in_header:
            out.append(Line("header", off, raw))
            in_header = raw != b"begin\n"
        elif raw.startswith(b"R "):
            out.append(Line("record", off, raw, position=int(raw.split(b" ")[1])))
        elif raw.startswith(b"C "):
            text, _ = split_note(base64.b64decode(raw[2:]))
            out.append(Line("checkpoint", off, raw, size=parse_checkpoint(text).size))
        else:
            out.append(Line("end", off, raw))
        off += len(raw)
    return out


def verify_bytes(data: bytes, vkey: str, jobs: int = 1):
    """(failure or None, summary) from an in-process verification."""
    try:
        summary = verify_bundle(io.BytesIO(data), [parse_vkey(vkey)], jobs=jobs)
    except VerificationFailed as exc:
        return exc.failure, exc.summary
    return None, summary


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "custody_verify", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def verify_file_cli(path: Path, vkey: str, jobs: int = 1):
    """Run `python -m custody_verify bundle --json` as a separate process."""
    proc = run_cli("bundle", str(path), "--vkey", vkey, "--json", "--quiet", "--jobs", str(jobs))
    report = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, report, proc.stderr


def record_line(pos: int, link: bytes, data: bytes) -> bytes:
    return b"R %d %s %s\n" % (pos, base64.b64encode(link), data)


def rebuild(header: bytes, records: list[bytes], signer, checkpoint_sizes: list[int]) -> bytes:
    """A fully re-chained, re-rooted and re-signed bundle over `records`: what a dishonest
    operator holding the signing key could produce."""
    from ledger.checkpoint import sign_checkpoint
    from ledger.merkle import MerkleLog

    tree = MerkleLog.build(records, lambda a, b: records[a:b])
    out = [header]
    link = b"\x00" * 32
    sizes = set(checkpoint_sizes) | {len(records)}
    for pos, data in enumerate(records):
        link = hashlib.sha256(link + data).digest()
        out.append(record_line(pos, link, data))
        if pos + 1 in sizes:
            note = sign_checkpoint(signer, pos + 1, tree.root(pos + 1))
            out.append(b"C " + base64.b64encode(note) + b"\n")
    out.append(b"end %d %d\n" % (len(records), len(sizes)))
    return b"".join(out)
