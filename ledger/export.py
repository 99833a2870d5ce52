"""Export one platform's log to a `custody-bundle/v1` file (specified in docs/BUNDLE.md).

Streaming: records are read page by page from the store and written as they come, so memory
stays flat for any log size. The bundle carries every record with its stored chain link, the
signed checkpoints that fall inside the exported range, and a final checkpoint signed at the
exported size, so the auditor's `custody-verify bundle` can check everything offline.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ledger.checkpoint import CheckpointLog, NoteSigner, parse_checkpoint_note, sign_checkpoint
from ledger.records import HASH_LEN
from ledger.store import LedgerStore, log_stream

FORMAT_LINE = b"custody-bundle/v1\n"
WRITE_BATCH = 4096

Progress = Callable[[int, int | None], None]


class ExportError(RuntimeError):
    """The store's log cannot be exported as it is (gap, bad row, mismatching checkpoint)."""


@dataclass(frozen=True)
class ExportResult:
    platform: str
    origin: str
    records: int
    checkpoints: int
    root: bytes
    note: bytes  # the final signed checkpoint
    path: Path | None


class _Frontier:
    """O(log n) Merkle root of a stream of leaves (the bundle's own, independent of MerkleLog)."""

    def __init__(self) -> None:
        self.stack: list[bytes] = []
        self.size = 0

    def push(self, data: bytes) -> None:
        sha = hashlib.sha256
        stack = self.stack
        stack.append(sha(b"\x00" + data).digest())
        n = self.size
        while n & 1:
            right = stack.pop()
            stack[-1] = sha(b"\x01" + stack[-1] + right).digest()
            n >>= 1
        self.size += 1

    def root(self) -> bytes:
        if not self.stack:
            return hashlib.sha256(b"").digest()
        r = self.stack[-1]
        for left in reversed(self.stack[:-1]):
            r = hashlib.sha256(b"\x01" + left + r).digest()
        return r


def header(platform_id: str, origin: str, vkey: str) -> bytes:
    return FORMAT_LINE + f"platform {platform_id}\norigin {origin}\nvkey {vkey}\nbegin\n".encode()


def export_bundle(
    store: LedgerStore,
    platform_id: str,
    out: Path | str | BinaryIO,
    signer: NoteSigner,
    *,
    checkpoints: Iterable[bytes] = (),
    checkpoint_log: CheckpointLog | None = None,
    every: int | None = None,
    upto: int | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Write records 0 .. `upto`-1 (default: all stored) of `platform_id` as a bundle.

    * `signer` signs with key name = origin, which must end in `/<platform_id>`.
    * `checkpoints`: already signed checkpoint notes to include (those beyond the exported size
      are skipped; any whose root does not match the exported records raises ExportError).
    * `every`: also sign a checkpoint every `every` records (at sizes not already signed).
    * The final checkpoint, at the exported size, goes through `checkpoint_log` when given (so
      it is persisted and checked for consistency with everything signed before), else it is
      signed directly with `signer`.
    * `progress(records written, total or None)` is called every 4096 records.

    A path is written through a temporary file and renamed at the end, so a bundle that exists
    is always complete.
    """
    origin = signer.name
    if not origin.endswith(f"/{platform_id}"):
        raise ValueError(f"origin {origin!r} does not name platform {platform_id!r}")
    if checkpoint_log is not None and checkpoint_log.origin != origin:
        raise ValueError("the checkpoint log signs for another origin")
    stream = log_stream(platform_id)
    if upto is None:
        last = store.last_row(stream)
        upto = 0 if last is None else last[0] + 1
    known: dict[int, bytes] = {}
    for note in checkpoints:
        note_origin, size, _ = parse_checkpoint_note(note)
        if note_origin == origin and size <= upto:
            known[size] = note
    if isinstance(out, (str, Path)):
        path = Path(out)
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as f:
            result = _write(
                store, stream, platform_id, f, signer, known, checkpoint_log, every, upto, progress
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return ExportResult(**{**result.__dict__, "path": path})
    return _write(
        store, stream, platform_id, out, signer, known, checkpoint_log, every, upto, progress
    )


def _write(
    store: LedgerStore,
    stream: str,
    platform_id: str,
    f: BinaryIO,
    signer: NoteSigner,
    known: dict[int, bytes],
    checkpoint_log: CheckpointLog | None,
    every: int | None,
    upto: int,
    progress: Progress | None,
) -> ExportResult:
    origin = signer.name
    f.write(header(platform_id, origin, signer.vkey))
    tree = _Frontier()
    b2a = binascii.b2a_base64
    lines: list[bytes] = []
    count = 0
    n_checkpoints = 0

    def checkpoint(size: int, final: bool) -> bytes | None:
        nonlocal n_checkpoints
        root = tree.root()
        note = known.get(size)
        if note is not None:
            _, _, signed_root = parse_checkpoint_note(note)
            if signed_root != root:
                raise ExportError(f"signed checkpoint at size {size} does not match the log")
        elif final:
            if checkpoint_log is not None:
                note = checkpoint_log.sign(size, root)
            else:
                note = sign_checkpoint(signer, size, root)
        elif every and size % every == 0:
            note = sign_checkpoint(signer, size, root)
        if note is not None:
            lines.append(b"C " + base64.b64encode(note) + b"\n")
            n_checkpoints += 1
        return note

    if upto == 0:
        final_note = checkpoint(0, True)
    else:
        if 0 in known:
            checkpoint(0, False)
        final_note = None
        for pos, _kind, packed in store.iter_rows(stream, stop=upto - 1):
            if pos != count:
                raise ExportError(f"platform {platform_id}: position {count} missing in the store")
            if len(packed) <= HASH_LEN:
                raise ExportError(f"platform {platform_id}: row {pos} is too short")
            data = packed[HASH_LEN:]
            if b"\n" in data:
                raise ExportError(f"platform {platform_id}: record {pos} contains a newline")
            lines.append(b"R %d %s %s\n" % (pos, b2a(packed[:HASH_LEN], newline=False), data))
            tree.push(data)
            count += 1
            if count == upto:
                final_note = checkpoint(count, True)
            elif count in known or every:
                checkpoint(count, False)
            if len(lines) >= WRITE_BATCH:
                f.write(b"".join(lines))
                lines.clear()
                if progress is not None:
                    progress(count, upto)
        if count != upto:
            raise ExportError(f"platform {platform_id}: store has {count} records, expected {upto}")
    assert final_note is not None
    lines.append(b"end %d %d\n" % (count, n_checkpoints))
    f.write(b"".join(lines))
    if progress is not None:
        progress(count, upto)
    return ExportResult(platform_id, origin, count, n_checkpoints, tree.root(), final_note, None)
