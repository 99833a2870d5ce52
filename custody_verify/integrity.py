"""The `integrity` verification level of a `custody-bundle/v1` file, chunked and parallel.

What it checks is exactly the non-semantic part of the full level (docs/BUNDLE.md §2, checks
1-6): the header, the syntax of every line, positions 0, 1, 2, ..., every stored chain link, the
RFC 6962 root and the Ed25519 signature of every checkpoint, the end line. It does not decode
the records: no JSON, no replay (check 7). A failure it reports is the one the full level
reports for the same bundle whenever the first problem is one of checks 1-6, with the same
place, line and reason.

Why it can run in parallel: every record line carries its stored chain link, so the links of a
range of lines are checkable given only the stored link of the record before the range; and the
Merkle hashes of the leaves in [a, b) reduce to the maximal aligned 2^k blocks inside [a, b),
which merge into the running right frontier in order (an RFC 9162 §2.1.2 stack whose entries
know their size). The file is cut into blocks of whole lines (`BLOCK` bytes); the reader counts
the record lines of each block (the start position of the next one) and takes the stored link of
its last record (the `prev` of the next one); workers check blocks independently; the reader
merges their results strictly in file order, so the first problem in the file is the one
reported. At most `2 * jobs + 1` blocks are in flight: memory stays flat in the log size.
"""

from __future__ import annotations

import binascii
import hashlib
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from custody_verify.bundle import _position_problem
from custody_verify.note import (
    Checkpoint,
    NoteError,
    Verifier,
    b64decode_strict,
    open_checkpoint,
    parse_vkey,
)

BLOCK = 1 << 19  # bytes of whole lines checked as one unit (about 1,100 records)
EMPTY_ROOT = hashlib.sha256(b"").digest()


@dataclass
class ChunkCheckpoint:
    line: int  # 0-based line index in the block
    pos: int  # records before the line
    size: int
    root: bytes
    nodes: list[bytes]  # the block's Merkle nodes covering [start, pos)
    head: bytes  # chain link of record pos - 1


@dataclass
class ChunkResult:
    """What one block proved. On a failure the block stops there: `records`, `head` and `nodes`
    describe the state just before the failing line."""

    start: int
    records: int = 0
    lines: int = 0
    head: bytes = b""
    nodes: list[bytes] = field(default_factory=list)
    checkpoints: list[ChunkCheckpoint] = field(default_factory=list)
    end: tuple[int, bytes, int] | None = None  # (line index, raw line with LF, pos)
    # (where, reason, position, checkpoint, line index)
    failure: tuple[str, str, int | None, int | None, int] | None = None


def blocks(a: int, e: int) -> list[int]:
    """Sizes of the maximal aligned 2^k blocks that partition leaves [a, e), in order: the
    nodes a block's Merkle stack holds after pushing those leaves with merges kept inside."""
    out: list[int] = []
    while a < e:
        size = a & -a if a else 1 << 62
        while size > e - a:
            size >>= 1
        out.append(size)
        a += size
    return out


def check_block(
    block: bytes, start: int, prev: bytes, origin: str, verifiers: list[Verifier], final: bool
) -> ChunkResult:
    """Check the lines of `block` (whole lines, LF-terminated; the last one may lack its LF only
    when `final`), whose first record, if any, must be at position `start` and chain from
    `prev`. Same checks, order and messages as the full level's loop (bundle._run)."""
    sha256 = hashlib.sha256
    b2a = binascii.b2a_base64
    lines = block.split(b"\n")
    tail = lines.pop()  # b"" when the block ends with LF; otherwise a line without its LF
    res = ChunkResult(start=start)
    head = prev
    stack: list[bytes] = []
    push = stack.append
    pop = stack.pop
    pos = start
    idx = 0
    ended = False
    for line in lines:
        if line[:2] == b"R " and not ended:
            parts = line.split(b" ", 3)
            if len(parts) == 4 and parts[1] == b"%d" % pos and parts[3]:
                data = parts[3]
                link = sha256(head + data).digest()
                if b2a(link, newline=False) == parts[2]:
                    head = link
                    push(sha256(b"\x00" + data).digest())
                    # merge while this node is a right child whose left sibling is in the block
                    n = pos
                    span = 1
                    while n & 1 and pos + 1 - 2 * span >= start:
                        right = pop()
                        stack[-1] = sha256(b"\x01" + stack[-1] + right).digest()
                        n >>= 1
                        span <<= 1
                    pos += 1
                    idx += 1
                    continue
        why = _other(line + b"\n", idx, pos, head, stack, origin, verifiers, res, ended)
        if why is not None:
            return _stop(res, why, pos, idx, head, stack)
        if res.end is not None:
            ended = True
        idx += 1
    if tail:
        assert final, "a block that is not the last ends with LF (the reader cuts at line ends)"
        why = _other(tail, idx, pos, head, stack, origin, verifiers, res, ended)
        if why is not None:
            return _stop(res, why, pos, idx, head, stack)
        idx += 1  # an end line without its LF: the merge reports that it does not match
    res.records = pos - start
    res.lines = idx
    res.head = head
    res.nodes = stack
    return res


def _stop(
    res: ChunkResult,
    why: tuple[str, str, int | None, int | None],
    pos: int,
    idx: int,
    head: bytes,
    stack: list[bytes],
) -> ChunkResult:
    res.failure = (*why, idx)
    res.records = pos - res.start
    res.lines = idx + 1
    res.head = head
    res.nodes = stack
    return res


def _other(
    line: bytes,
    idx: int,
    pos: int,
    head: bytes,
    stack: list[bytes],
    origin: str,
    verifiers: list[Verifier],
    res: ChunkResult,
    ended: bool,
) -> tuple[str, str, int | None, int | None] | None:
    """Every line but a valid record: the reason it fails, or None (a checkpoint or end line
    whose remaining checks need the state of the blocks before it is noted in `res`)."""
    if ended:
        return ("end", "data after the end line", None, None)
    if line[:2] == b"R ":
        parts = line.split(b" ", 3)
        if len(parts) != 4 or line[-1:] != b"\n":
            return ("record", "malformed record line", pos, None)
        if parts[1] != b"%d" % pos:
            return ("record", _position_problem(parts[1], pos), pos, None)
        if not parts[3][:-1]:
            return ("record", "empty record", pos, None)
        return (
            "record",
            "chain link mismatch: the stored link is not SHA-256(previous link || record)",
            pos,
            None,
        )
    if line[:2] == b"C ":
        if line[-1:] != b"\n":
            return ("checkpoint", "truncated checkpoint line", None, pos)
        try:
            note = b64decode_strict(line[2:-1])
        except ValueError as exc:
            return ("checkpoint", f"checkpoint line: {exc}", None, pos)
        try:
            cp: Checkpoint = open_checkpoint(note, verifiers)
        except NoteError as exc:
            return ("checkpoint", f"checkpoint note: {exc}", None, pos)
        if cp.origin != origin:
            return (
                "checkpoint",
                f"checkpoint origin {cp.origin!r} is not {origin!r}",
                None,
                cp.size,
            )
        res.checkpoints.append(ChunkCheckpoint(idx, pos, cp.size, cp.root, list(stack), head))
        return None
    if line[:4] == b"end ":
        res.end = (idx, line, pos)
        return None
    return ("record", f"unknown line {line[:40]!r}", pos, None)


class Frontier:
    """The right frontier of the Merkle tree over the records so far: (size, hash) of the
    aligned blocks of the binary decomposition of the size, largest first."""

    __slots__ = ("nodes",)

    def __init__(self) -> None:
        self.nodes: list[tuple[int, bytes]] = []

    def extend(self, start: int, end: int, hashes: list[bytes]) -> None:
        """Append the maximal aligned blocks of leaves [start, end) (their hashes in order)."""
        nodes = self.nodes
        sizes = blocks(start, end)
        assert len(sizes) == len(hashes), "a block's Merkle nodes do not match its range"
        sha256 = hashlib.sha256
        for size, h in zip(sizes, hashes, strict=True):
            while nodes and nodes[-1][0] == size:
                left = nodes.pop()[1]
                h = sha256(b"\x01" + left + h).digest()
                size <<= 1
            nodes.append((size, h))

    def root(self) -> bytes:
        nodes = self.nodes
        if not nodes:
            return EMPTY_ROOT
        r = nodes[-1][1]
        for _, left in reversed(nodes[:-1]):
            r = hashlib.sha256(b"\x01" + left + r).digest()
        return r

    def copy(self) -> Frontier:
        other = Frontier()
        other.nodes = list(self.nodes)
        return other


# -- the reader: cut the file into blocks of whole lines ---------------------------------------


@dataclass
class Piece:
    block: bytes
    start: int  # position of its first record
    prev: bytes  # stored chain link of the record before it
    final: bool  # the last piece (may end without LF)


def pieces(f: BinaryIO, max_line: int, block_size: int | None = None) -> Iterator[Piece]:
    """Blocks of whole lines read from `f`, each with the position and stored link its first
    record must continue from (taken from the blocks before it, as stored: a block that does
    not verify stops the run before the next one's `prev` matters). A line longer than
    `max_line` is cut there, as `readline(max_line)` does, and ends the file."""
    a2b = binascii.a2b_base64
    # a line inside a block is at most block_size long: never longer than what readline takes
    block_size = min(block_size or BLOCK, max_line)
    carry = b""
    start = 0
    prev = b"\x00" * 32
    while True:
        chunk = f.read(block_size)
        buf = carry + chunk if carry else chunk
        first_nl = buf.find(b"\n", 0, max_line)
        if first_nl == -1 and (len(buf) >= max_line or not chunk):
            if buf:  # an over-long line, or the file's last line without its LF
                yield Piece(buf[:max_line], start, prev, True)
            return
        cut = buf.rfind(b"\n") + 1
        if cut == 0:
            carry = buf
            continue
        block, carry = (buf, b"") if cut == len(buf) else (buf[:cut], buf[cut:])
        if not chunk and not carry:
            yield Piece(block, start, prev, True)
            return
        yield Piece(block, start, prev, False)
        start += block.count(b"\nR ") + (block[:2] == b"R ")
        i = block.rfind(b"\nR ") + 1
        if i or block[:2] == b"R ":
            parts = block[i : block.index(b"\n", i)].split(b" ", 3)
            try:
                prev = a2b(parts[2]) if len(parts) == 4 else b""
            except (binascii.Error, ValueError):
                prev = b""  # that record fails in its own block


# -- workers -------------------------------------------------------------------------------------

_W: dict[str, Any] = {}


def _init_worker(origin: str, vkey: str) -> None:
    import gc

    gc.disable()
    _W["origin"] = origin
    _W["verifiers"] = [parse_vkey(vkey)]


def _check_piece(piece: Piece) -> ChunkResult:
    return check_block(
        piece.block, piece.start, piece.prev, _W["origin"], _W["verifiers"], piece.final
    )


class _Local:
    """jobs = 1: check each block in this process, when its result is asked for."""

    def __init__(self, origin: str, verifiers: list[Verifier]) -> None:
        self.origin = origin
        self.verifiers = verifiers

    def submit(self, piece: Piece) -> Callable[[], ChunkResult]:
        def run() -> ChunkResult:
            return check_block(
                piece.block, piece.start, piece.prev, self.origin, self.verifiers, piece.final
            )

        return run

    def close(self) -> None:
        pass


class _Pool:
    """jobs >= 2: worker processes (fork where available), results taken in submission order."""

    def __init__(self, jobs: int, origin: str, vkey: str) -> None:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.pool = ctx.Pool(jobs, initializer=_init_worker, initargs=(origin, vkey))

    def submit(self, piece: Piece) -> Callable[[], ChunkResult]:
        pending = self.pool.apply_async(_check_piece, (piece,))
        return pending.get

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


# -- merging the blocks' results in file order -------------------------------------------------


class IntegrityFailed(Exception):
    def __init__(
        self,
        where: str,
        reason: str,
        position: int | None,
        checkpoint: int | None,
        line: int,
        records: int,
        checkpoints: int,
        head: bytes,
    ) -> None:
        super().__init__(reason)
        self.where = where
        self.reason = reason
        self.position = position
        self.checkpoint = checkpoint
        self.line = line
        self.records = records
        self.checkpoints = checkpoints
        self.head = head


@dataclass
class Outcome:
    records: int
    checkpoints: int
    head: bytes
    checkpoint_size: int | None
    checkpoint_root: bytes | None


def run(
    f: BinaryIO,
    origin: str,
    vkey: str,
    verifiers: list[Verifier],
    lineno: int,
    max_line: int,
    jobs: int,
    progress: Callable[[int], None] | None,
    progress_every: int,
) -> Outcome:
    """Check the body of a bundle (after its header, `lineno` lines) at the integrity level."""
    executor: _Local | _Pool = _Local(origin, verifiers) if jobs < 2 else _Pool(jobs, origin, vkey)
    try:
        return _merge(f, executor, jobs, lineno, max_line, progress, progress_every)
    finally:
        executor.close()


def _merge(
    f: BinaryIO,
    executor: _Local | _Pool,
    jobs: int,
    lineno: int,
    max_line: int,
    progress: Callable[[int], None] | None,
    progress_every: int,
) -> Outcome:
    frontier = Frontier()
    pos = 0
    head = b"\x00" * 32
    checkpoints = 0
    last_cp_size = -1
    cp_root: bytes | None = None
    ended = False
    next_progress = progress_every
    inflight: deque[Callable[[], ChunkResult]] = deque()
    source = pieces(f, max_line)
    limit = 1 if jobs < 2 else 2 * jobs + 1
    exhausted = False

    def fail(
        where: str,
        reason: str,
        position: int | None,
        checkpoint: int | None,
        line: int,
        records: int,
        at_head: bytes,
    ) -> IntegrityFailed:
        return IntegrityFailed(
            where, reason, position, checkpoint, line, records, checkpoints, at_head
        )

    while True:
        while not exhausted and len(inflight) < limit:
            piece = next(source, None)
            if piece is None:
                exhausted = True
            else:
                inflight.append(executor.submit(piece))
        if not inflight:
            break
        res = inflight.popleft()()
        base = lineno  # line number of the block's line index -1
        if ended and res.lines:
            raise fail("end", "data after the end line", None, None, base + 1, pos, head)
        for cp in res.checkpoints:
            line = base + cp.line + 1
            if cp.size <= last_cp_size:
                raise fail(
                    "checkpoint",
                    f"checkpoint sizes must increase (previous {last_cp_size})",
                    None,
                    cp.size,
                    line,
                    cp.pos,
                    cp.head,
                )
            if cp.size > cp.pos:
                raise fail(
                    "record",
                    f"record {cp.pos} missing: checkpoint at size {cp.size} follows record "
                    f"{cp.pos - 1}",
                    cp.pos,
                    None,
                    line,
                    cp.pos,
                    cp.head,
                )
            if cp.size < cp.pos:
                raise fail(
                    "checkpoint",
                    f"checkpoint for size {cp.size} placed after record {cp.pos - 1}",
                    None,
                    cp.size,
                    line,
                    cp.pos,
                    cp.head,
                )
            at = frontier.copy()
            at.extend(res.start, cp.pos, cp.nodes)
            if at.root() != cp.root:
                where = (
                    f"records {max(last_cp_size, 0)}..{cp.pos - 1}" if cp.pos else "the empty log"
                )
                raise fail(
                    "checkpoint",
                    "signed root does not match the Merkle root of the records "
                    f"(history altered in {where}, or the checkpoint is inconsistent with it)",
                    None,
                    cp.size,
                    line,
                    cp.pos,
                    cp.head,
                )
            last_cp_size = cp.size
            checkpoints += 1
            cp_root = cp.root
        if res.end is not None:
            idx, raw, at_pos = res.end
            line = base + idx + 1
            if raw != b"end %d %d\n" % (at_pos, checkpoints):
                raise fail(
                    "end",
                    f"end line {raw[:80]!r} does not match {at_pos} records and "
                    f"{checkpoints} checkpoints",
                    None,
                    last_cp_size,
                    line,
                    at_pos,
                    _head_at(res, head),
                )
            if last_cp_size != at_pos:
                raise fail(
                    "end",
                    f"records {max(last_cp_size, 0)}..{at_pos - 1} are not covered by a signed "
                    "checkpoint",
                    None,
                    last_cp_size,
                    line,
                    at_pos,
                    _head_at(res, head),
                )
            ended = True
        if res.failure is not None:
            where, reason, position, checkpoint, idx = res.failure
            raise fail(
                where,
                reason,
                position,
                checkpoint,
                base + idx + 1,
                res.start + res.records,
                res.head if res.records else head,
            )
        frontier.extend(res.start, res.start + res.records, res.nodes)
        if res.records:
            head = res.head
        pos = res.start + res.records
        lineno = base + res.lines
        if progress is not None and pos >= next_progress:
            next_progress = pos + progress_every
            progress(pos)
    if not ended:
        raise fail(
            "bundle", "bundle ends without its end line (truncated?)", pos, None, lineno, pos, head
        )
    return Outcome(pos, checkpoints, head, last_cp_size if checkpoints else None, cp_root)


def _head_at(res: ChunkResult, head: bytes) -> bytes:
    return res.head if res.records else head
