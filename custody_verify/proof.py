"""C2SP `tlog-proof` files: an entry's inclusion proof together with the signed checkpoint.

    c2sp.org/tlog-proof@v1
    [extra <base64 opaque data>]
    index <leaf index>
    <base64 hash>            zero or more, the leaf's sibling first
    <blank line>
    <checkpoint note, verbatim>

The verifier hashes the entry itself (LEAF = SHA-256(0x00 || entry bytes)); it never takes a leaf
hash from the prover.
"""

from __future__ import annotations

from dataclasses import dataclass

from custody_verify.merkle import inclusion_failure, leaf_hash
from custody_verify.note import (
    Checkpoint,
    NoteError,
    Verifier,
    b64decode_strict,
    b64encode,
    open_checkpoint,
)

HEADER = b"c2sp.org/tlog-proof@v1"


class ProofFormatError(ValueError):
    """The proof file does not follow the tlog-proof syntax."""


class ProofInvalid(ValueError):
    """The proof is well formed but does not verify."""


@dataclass(frozen=True)
class TlogProof:
    index: int
    path: tuple[bytes, ...]
    note: bytes
    extra: bytes | None = None


def _decimal(text: bytes, what: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[:1] == b"0"):
        raise ProofFormatError(f"{what} must be ASCII decimal without leading zeros")
    value = int(text)
    if value >= 2**64:
        raise ProofFormatError(f"{what} out of range")
    return value


def parse_tlog_proof(data: bytes) -> TlogProof:
    head, sep, note = data.partition(b"\n\n")
    if not sep:
        raise ProofFormatError("no blank line between the proof and the checkpoint")
    lines = head.split(b"\n")
    if lines[0] != HEADER:
        raise ProofFormatError(f"first line must be {HEADER.decode()}")
    pos = 1
    extra = None
    if pos < len(lines) and lines[pos].startswith(b"extra "):
        try:
            extra = b64decode_strict(lines[pos][6:])
        except ValueError as exc:
            raise ProofFormatError(f"extra: {exc}") from None
        pos += 1
    if pos >= len(lines) or not lines[pos].startswith(b"index "):
        raise ProofFormatError("missing 'index <n>' line")
    index = _decimal(lines[pos][6:], "index")
    pos += 1
    path = []
    for i, line in enumerate(lines[pos:]):
        try:
            h = b64decode_strict(line)
        except ValueError as exc:
            raise ProofFormatError(f"proof hash {i}: {exc}") from None
        if len(h) != 32:
            raise ProofFormatError(f"proof hash {i} is not 32 bytes")
        path.append(h)
    return TlogProof(index, tuple(path), note, extra)


def format_tlog_proof(
    index: int, path: list[bytes], note: bytes, extra: bytes | None = None
) -> bytes:
    out = [HEADER]
    if extra is not None:
        out.append(b"extra " + b64encode(extra).encode())
    out.append(b"index %d" % index)
    out.extend(b64encode(h).encode() for h in path)
    return b"\n".join(out) + b"\n\n" + note


def verify_tlog_proof(
    data: bytes,
    entry: bytes,
    verifiers: list[Verifier] | tuple[Verifier, ...],
    origin: str | None = None,
) -> tuple[TlogProof, Checkpoint]:
    """Verify a tlog-proof against the entry bytes. Raises ProofFormatError or ProofInvalid."""
    proof = parse_tlog_proof(data)
    try:
        checkpoint = open_checkpoint(proof.note, verifiers)
    except NoteError as exc:
        raise ProofInvalid(f"checkpoint: {exc}") from None
    if origin is not None and checkpoint.origin != origin:
        raise ProofInvalid(f"checkpoint origin {checkpoint.origin!r} is not {origin!r}")
    why = inclusion_failure(
        proof.index, checkpoint.size, leaf_hash(entry), proof.path, checkpoint.root
    )
    if why is not None:
        raise ProofInvalid(f"inclusion of entry {proof.index} in tree {checkpoint.size}: {why}")
    return proof, checkpoint
