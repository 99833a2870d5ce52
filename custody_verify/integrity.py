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
reported. At most `2 * jobs` blocks are in flight: memory stays flat in the log size.
"""

from __future__ import annotations

import binascii
import hashlib
import multiprocessing
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, BinaryIO

from custody_verify.bundle import _position_problem, held_beyond, held_differs
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
GENESIS = b"\x00" * 32


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
    first: bytes = b""  # with prev None: the first record's bytes, and its stored link
    first_link: bytes = b""
    # at each size in `marks` (the checkpoints the auditor holds): (line index of the record
    # that completes it, size, the block's Merkle nodes over [start, size), chain head)
    marked: list[tuple[int, int, list[bytes], bytes]] = field(default_factory=list)


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
    block: bytes,
    start: int,
    prev: bytes | None,
    origin: str,
    verifiers: list[Verifier],
    final: bool,
    marks: tuple[int, ...] = (),
) -> ChunkResult:
    """Check the lines of `block` (whole lines, LF-terminated; the last one may lack its LF only
    when `final`), whose first record, if any, must be at position `start` and chain from
    `prev`. Same checks, order and messages as the full level's loop (bundle._run).

    `prev` None: the caller has checked that the first line is `R <start> <link> <data>` with a
    canonical 44-character link and non-empty data, but does not know the link before it; that
    record's stored link is taken as the chain head and its bytes returned in `first`, for the
    merge to check SHA-256(previous link || first) against `first_link`.

    `marks`: sorted sizes at which the block's Merkle nodes are kept (`marked`), for the merge
    to compare the root there with a checkpoint the auditor holds."""
    sha256 = hashlib.sha256
    b2a = binascii.b2a_base64
    lines = block.split(b"\n")
    tail = lines.pop()  # b"" when the block ends with LF; otherwise a line without its LF
    res = ChunkResult(start=start)
    stack: list[bytes] = []
    push = stack.append
    pop = stack.pop
    pos = start
    idx = 0
    ended = False
    later = [m for m in marks if m > start]
    mark = later.pop(0) if later else -1
    if prev is None:
        parts = lines[0].split(b" ", 3)
        head = binascii.a2b_base64(parts[2])
        res.first, res.first_link = parts[3], head
        push(sha256(b"\x00" + parts[3]).digest())  # a block's first leaf merges with nothing
        pos += 1
        if pos == mark:
            res.marked.append((0, pos, list(stack), head))
            mark = later.pop(0) if later else -1
        idx = 1
        del lines[0]
    else:
        head = prev
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
                    if pos == mark:
                        res.marked.append((idx, pos, list(stack), head))
                        mark = later.pop(0) if later else -1
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


# -- the reader: cut the stream into blocks of whole lines (--jobs 1, or not a plain file) ------


@dataclass
class Piece:
    block: bytes
    start: int  # position of its first record
    prev: bytes  # stored chain link of the record before it
    final: bool  # the last piece (may end without LF)


def pieces(
    f: BinaryIO,
    max_line: int,
    block_size: int | None = None,
    start: int = 0,
    prev: bytes = GENESIS,
    track: bool = True,
) -> Iterator[Piece]:
    """Blocks of whole lines read from `f`, each with the position and stored link its first
    record must continue from (taken from the blocks before it, as stored: a block that does
    not verify stops the run before the next one's `prev` matters). A line longer than
    `max_line` is cut there, as `readline(max_line)` does, and ends the file.

    `track` False: the caller checks each block before asking for the next and knows where it
    starts; `start` and `prev` are then not computed (counting the record lines costs ~8 %)."""
    a2b = binascii.a2b_base64
    # a line inside a block is at most block_size long: never longer than what readline takes
    block_size = min(block_size or BLOCK, max_line)
    carry = b""
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
        if not track:
            continue
        start += block.count(b"\nR ") + (block[:2] == b"R ")
        i = block.rfind(b"\nR ") + 1
        if i or block[:2] == b"R ":
            parts = block[i : block.index(b"\n", i)].split(b" ", 3)
            try:
                prev = a2b(parts[2]) if len(parts) == 4 else b""
            except (binascii.Error, ValueError):
                prev = b""  # that record fails in its own block


# -- workers that read their own byte ranges (--jobs >= 2 on a plain file) ----------------------


@dataclass
class Ranged:
    """A worker's answer for the byte range [s, e) of the body.

    status "ok": `result` covers the lines starting in [s, e), bytes [a, z), its first record
    trusted (ChunkResult.first); "empty": no line starts in [s, e); "recheck": the block [a, z)
    does not start with a usable record line (a checkpoint line, or damage): the merge checks it
    itself, knowing the state before it; "sequential": its last line has no LF within
    `max_line` bytes (an over-long or unterminated line): the merge reads on from `a` itself."""

    status: str
    a: int
    z: int = 0
    result: ChunkResult | None = None


def _canonical_position(text: bytes) -> bool:
    return text.isdigit() and (text == b"0" or text[:1] != b"0") and len(text) < 20


def check_range(
    fd: int,
    s: int,
    e: int,
    body_start: int,
    max_line: int,
    origin: str,
    verifiers: list[Verifier],
    marks: tuple[int, ...] = (),
) -> Ranged:
    """Check the lines that start in [s, e) of the file `fd`, reading them with os.pread."""
    if s > body_start:
        head = os.pread(fd, e - s + 1, s - 1)  # the first line starts after the first LF
        i = head.find(b"\n")
        if i == -1 or s + i >= e:
            return Ranged("empty", e)
        a = s + i
        buf = head[i + 1 :]
    else:
        a = s
        buf = os.pread(fd, e - s, s)
    if len(buf) < e - a:  # pragma: no cover - the file shrank while being verified
        return Ranged("sequential", a)
    if buf[-1:] != b"\n":  # complete the last line, which may not exceed max_line bytes
        room = max_line - (len(buf) - buf.rfind(b"\n") - 1)
        more = b""
        j = -1
        while j == -1 and len(more) < room:
            got = os.pread(fd, min(max(len(more), 1 << 14), room - len(more)), e + len(more))
            if not got:
                break
            j = got.find(b"\n")
            j = j if j == -1 else len(more) + j
            more += got
        if j == -1 or j + 1 > room:
            return Ranged("sequential", a)
        buf += more[: j + 1]
    z = a + len(buf)
    nl = buf.find(b"\n")
    parts = buf[:nl].split(b" ", 3)
    if (
        len(parts) != 4
        or parts[0] != b"R"
        or not _canonical_position(parts[1])
        or not parts[3]
        or len(parts[2]) != 44
    ):
        return Ranged("recheck", a, z)
    try:
        link = binascii.a2b_base64(parts[2])
    except (binascii.Error, ValueError):
        return Ranged("recheck", a, z)
    if binascii.b2a_base64(link, newline=False) != parts[2] or len(link) != 32:
        return Ranged("recheck", a, z)
    res = check_block(buf, int(parts[1]), None, origin, verifiers, False, marks)
    return Ranged("ok", a, z, res)


_W: dict[str, Any] = {}


def _init_worker(
    origin: str, vkey: str, fd: int, body_start: int, max_line: int, marks: tuple[int, ...]
) -> None:
    import gc

    gc.disable()
    _W["marks"] = marks
    _W["origin"] = origin
    _W["verifiers"] = [parse_vkey(vkey)]
    _W["fd"] = fd
    _W["body_start"] = body_start
    _W["max_line"] = max_line


def _check_piece(piece: Piece) -> ChunkResult:
    w = _W
    return check_block(
        piece.block, piece.start, piece.prev, w["origin"], w["verifiers"], piece.final, w["marks"]
    )


def _check_range(s: int, e: int) -> Ranged:
    w = _W
    return check_range(
        w["fd"], s, e, w["body_start"], w["max_line"], w["origin"], w["verifiers"], w["marks"]
    )


def _worker_main(conn: Connection, initargs: tuple[Any, ...]) -> None:
    """A worker process: tasks in, results out, in order, until None."""
    _init_worker(*initargs)
    while True:
        task = conn.recv()
        if task is None:
            return
        kind, arg = task
        conn.send(_check_range(*arg) if kind == "range" else _check_piece(arg))


class _Workers:
    """`jobs` worker processes, each with its own pipe; task k goes to worker k mod jobs, so
    results come back in task order. No thread in this process (a Pool's feeder threads could
    hang its terminate); at most `depth` tasks wait per worker, so memory stays flat."""

    def __init__(self, jobs: int, initargs: tuple[Any, ...], depth: int = 2) -> None:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.limit = jobs * depth
        self.sent = 0
        self.received = 0
        for _ in range(jobs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, initargs), daemon=True)  # type: ignore[attr-defined]
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def room(self) -> bool:
        return self.sent - self.received < self.limit

    def pending(self) -> bool:
        return self.received < self.sent

    def submit(self, task: tuple[str, Any]) -> None:
        self.conns[self.sent % len(self.conns)].send(task)
        self.sent += 1

    def result(self) -> Any:
        conn = self.conns[self.received % len(self.conns)]
        try:
            got = conn.recv()
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"an integrity worker process died: {exc!r}") from None
        self.received += 1
        return got

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join()
        for conn in self.conns:
            conn.close()


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
    held_checked: int


class _Merge:
    """The state of the file so far, advanced one block result at a time, in file order."""

    def __init__(self, lineno: int, held: list[Checkpoint]) -> None:
        self.waiting = sorted(held, key=lambda cp: cp.size)  # held checkpoints not yet reached
        self.held_checked = 0
        self.frontier = Frontier()
        self.pos = 0
        self.head = GENESIS
        self.lineno = lineno  # lines before the next block
        self.checkpoints = 0
        self.last_cp_size = -1
        self.cp_root: bytes | None = None
        self.ended = False

    def fail(
        self,
        where: str,
        reason: str,
        position: int | None,
        checkpoint: int | None,
        line: int,
        records: int,
        head: bytes,
    ) -> IntegrityFailed:
        return IntegrityFailed(
            where, reason, position, checkpoint, line, records, self.checkpoints, head
        )

    def take(self, res: ChunkResult) -> None:
        """Apply one block's result; raises IntegrityFailed at the first problem."""
        fail = self.fail
        base = self.lineno  # the line number of the block's line index -1
        if self.ended and res.lines:
            raise fail("end", "data after the end line", None, None, base + 1, self.pos, self.head)
        events: list[tuple[int, Any]] = [(m[0], m) for m in res.marked]
        events += [(cp.line, cp) for cp in res.checkpoints]
        for _, event in sorted(events, key=lambda ev: ev[0]):
            if isinstance(event, ChunkCheckpoint):
                self._checkpoint(res, event, base)
            else:
                idx, size, nodes, at_head = event
                at = self.frontier.copy()
                at.extend(res.start, size, nodes)
                self.held_at(size, at.root, base + idx + 1, at_head)
        self._end_and_failure(res, base)

    def held_at(self, size: int, root: Callable[[], bytes], line: int, head: bytes) -> None:
        """Compare the records' root at `size` with the checkpoints the auditor holds there."""
        while self.waiting and self.waiting[0].size == size:
            cp = self.waiting.pop(0)
            if root() != cp.root:
                raise self.fail("checkpoint", held_differs(size), None, size, line, size, head)
            self.held_checked += 1

    def _checkpoint(self, res: ChunkResult, cp: ChunkCheckpoint, base: int) -> None:
        fail = self.fail
        line = base + cp.line + 1
        last = self.last_cp_size
        if cp.size <= last:
            raise fail(
                "checkpoint",
                f"checkpoint sizes must increase (previous {last})",
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
        at = self.frontier.copy()
        at.extend(res.start, cp.pos, cp.nodes)
        if at.root() != cp.root:
            where = f"records {max(last, 0)}..{cp.pos - 1}" if cp.pos else "the empty log"
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
        self.last_cp_size = cp.size
        self.checkpoints += 1
        self.cp_root = cp.root

    def _end_and_failure(self, res: ChunkResult, base: int) -> None:
        fail = self.fail
        if res.end is not None:
            idx, raw, at_pos = res.end
            line = base + idx + 1
            at_head = res.head if res.records else self.head
            if raw != b"end %d %d\n" % (at_pos, self.checkpoints):
                raise fail(
                    "end",
                    f"end line {raw[:80]!r} does not match {at_pos} records and "
                    f"{self.checkpoints} checkpoints",
                    None,
                    self.last_cp_size,
                    line,
                    at_pos,
                    at_head,
                )
            if self.last_cp_size != at_pos:
                raise fail(
                    "end",
                    f"records {max(self.last_cp_size, 0)}..{at_pos - 1} are not covered by a "
                    "signed checkpoint",
                    None,
                    self.last_cp_size,
                    line,
                    at_pos,
                    at_head,
                )
            self.ended = True
        if res.failure is not None:
            where, reason, position, checkpoint, idx = res.failure
            raise fail(
                where,
                reason,
                position,
                checkpoint,
                base + idx + 1,
                res.start + res.records,
                res.head if res.records else self.head,
            )
        self.frontier.extend(res.start, res.start + res.records, res.nodes)
        if res.records:
            self.head = res.head
        self.pos = res.start + res.records
        self.lineno = base + res.lines

    def outcome(self) -> Outcome:
        if not self.ended:
            raise self.fail(
                "bundle",
                "bundle ends without its end line (truncated?)",
                self.pos,
                None,
                self.lineno,
                self.pos,
                self.head,
            )
        if self.waiting:
            held = self.waiting[0].size
            raise self.fail(
                "end", held_beyond(self.pos, held), None, held, self.lineno, self.pos, self.head
            )
        size = self.last_cp_size if self.checkpoints else None
        return Outcome(self.pos, self.checkpoints, self.head, size, self.cp_root, self.held_checked)


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
    held: list[Checkpoint],
) -> Outcome:
    """Check the body of a bundle (after its header, `lineno` lines) at the integrity level;
    `held`: checkpoints of this log the auditor already holds (signatures checked)."""
    merge = _Merge(lineno, held)
    merge.held_at(0, lambda: EMPTY_ROOT, lineno, GENESIS)
    marks = tuple(sorted({cp.size for cp in held}))
    ticker = _Ticker(progress, progress_every)
    fd = _plain_file(f)
    if jobs < 2:
        _sequential(f, merge, origin, verifiers, max_line, ticker, marks)
    elif fd is not None and max_line > BLOCK and "fork" in multiprocessing.get_all_start_methods():
        _ranges(f, fd, merge, origin, vkey, verifiers, max_line, jobs, ticker, marks)
    else:
        _shipped(f, merge, origin, vkey, max_line, jobs, ticker, marks)
    return merge.outcome()


class _Ticker:
    def __init__(self, progress: Callable[[int], None] | None, every: int) -> None:
        self.progress = progress
        self.every = every
        self.next = every

    def __call__(self, pos: int) -> None:
        if self.progress is not None and pos >= self.next:
            self.next = pos + self.every
            self.progress(pos)


def _plain_file(f: BinaryIO) -> int | None:
    """The descriptor of `f` when it is a regular file that workers may pread (else None)."""
    try:
        fd = f.fileno()
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) and hasattr(os, "pread") else None
    except (OSError, AttributeError, ValueError):
        return None


def _sequential(
    f: BinaryIO,
    merge: _Merge,
    origin: str,
    verifiers: list[Verifier],
    max_line: int,
    ticker: _Ticker,
    marks: tuple[int, ...],
) -> None:
    """--jobs 1 (and the rest of a file after an odd line in --jobs N): block after block in
    this process, continuing from the merge's state."""
    for p in pieces(f, max_line, track=False):  # each block checked before the next is read
        merge.take(check_block(p.block, merge.pos, merge.head, origin, verifiers, p.final, marks))
        ticker(merge.pos)


def _shipped(
    f: BinaryIO,
    merge: _Merge,
    origin: str,
    vkey: str,
    max_line: int,
    jobs: int,
    ticker: _Ticker,
    marks: tuple[int, ...],
) -> None:
    """--jobs N on a stream that is not a plain file: this process reads the blocks and sends
    them to the workers (each block crosses a pipe)."""
    workers = _Workers(jobs, (origin, vkey, -1, 0, max_line, marks))
    try:
        source = pieces(f, max_line)
        exhausted = False
        while True:
            while not exhausted and workers.room():
                piece = next(source, None)
                if piece is None:
                    exhausted = True
                else:
                    workers.submit(("piece", piece))
            if not workers.pending():
                return
            merge.take(workers.result())
            ticker(merge.pos)
    finally:
        workers.close()


def _ranges(
    f: BinaryIO,
    fd: int,
    merge: _Merge,
    origin: str,
    vkey: str,
    verifiers: list[Verifier],
    max_line: int,
    jobs: int,
    ticker: _Ticker,
    marks: tuple[int, ...],
) -> None:
    """--jobs N on a plain file: each worker reads its own byte range (nothing crosses a pipe
    but offsets and small results); this process only merges, and checks itself the few blocks
    a worker cannot start (a block opening with a checkpoint line, or damage)."""
    body_start = f.tell()
    size = os.fstat(fd).st_size
    workers = _Workers(jobs, (origin, vkey, fd, body_start, max_line, marks))
    try:
        s = body_start
        while True:
            while s < size and workers.room():
                e = min(s + BLOCK, size)
                workers.submit(("range", (s, e)))
                s = e
            if not workers.pending():
                return
            got: Ranged = workers.result()
            if got.status == "empty":
                continue
            if got.status == "sequential":
                f.seek(got.a)
                _sequential(f, merge, origin, verifiers, max_line, ticker, marks)
                return
            res = got.result
            if res is not None and (
                res.start != merge.pos
                or hashlib.sha256(merge.head + res.first).digest() != res.first_link
            ):
                res = None  # starts elsewhere than the blocks before it end: check it here
            if res is None:
                block = os.pread(fd, got.z - got.a, got.a)
                res = check_block(block, merge.pos, merge.head, origin, verifiers, False, marks)
            merge.take(res)
            ticker(merge.pos)
    finally:
        workers.close()
