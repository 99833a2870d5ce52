"""The ledger service: one writer per platform, a group-commit queue in front of each.

Callers either hand over their own batch (`execute`, used by the CLI, batch RPCs and the
benchmarks) or submit single requests that a per-platform committer thread folds into one
database transaction with whatever else is waiting (`submit`, used by concurrent RPCs).
Reads take the platform's lock so they only ever see committed state.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Final

import msgspec

from controls.codes import Code
from controls.policy import Policy
from ledger import commands as c
from ledger.checkpoint import (
    CheckpointLog,
    NoteSigner,
    SignedCheckpoint,
    generate_key,
    load_key,
    origin_for,
    tree_consistency,
)
from ledger.config import Config
from ledger.domain import PlatformState
from ledger.pii import PiiVault, load_master_key
from ledger.store import LedgerStore
from ledger.validate import is_actor, is_platform_id
from ledger.writer import (
    CommitFailed,
    Outcome,
    PlatformWriter,
    Prepared,
    Request,
    WriterFenced,
)

_STOP: Final = object()
log = logging.getLogger("ledger.service")
SWEEPER_ACTOR: Final = "system:sweeper"


class PlatformNotFound(LookupError):
    pass


class Overloaded(RuntimeError):
    """The platform's queue is full; the caller should back off and retry with the same ids."""


class ServiceClosed(RuntimeError):
    pass


class _Platform:
    """A platform's writer, its lock, the condition 'every decided record is stored', and its
    checkpoint log."""

    __slots__ = (
        "checkpoints",
        "committer",
        "cond",
        "lock",
        "readers_waiting",
        "signed_at_s",
        "writer",
    )

    def __init__(self, writer: PlatformWriter, checkpoints: CheckpointLog) -> None:
        self.writer = writer
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.committer: GroupCommitter | None = None
        self.checkpoints = checkpoints
        self.signed_at_s = time.monotonic()
        self.readers_waiting = 0

    def is_drained(self) -> bool:
        writer = self.writer
        return writer.fenced or writer.committed_next_seq == writer.prepared_next_seq

    def wait_drained(self) -> None:
        """Caller holds `cond`: wait until no decided group is waiting for its commit.

        While anyone waits here the decide thread starts no new group (`readers_waiting`), so a
        steady stream of writes cannot starve reads, checkpoints or synchronous batches.
        """
        self.readers_waiting += 1
        try:
            self.cond.wait_for(self.is_drained)
        finally:
            self.readers_waiting -= 1
            self.cond.notify_all()
        if self.writer.fenced:
            raise WriterFenced(f"platform {self.writer.platform_id} is not served here")
        self.writer.ensure_clean()


class LedgerService:
    def __init__(self, config: Config, clock_ms: Callable[[], int] | None = None) -> None:
        self.config = config
        self.store = LedgerStore(config)
        master = load_master_key(config)
        self.vault = PiiVault(self.store.datastore, self.store.is_postgres, master)
        self._clock_ms = clock_ms
        self._platforms: dict[str, _Platform] = {}
        self._create_lock = threading.Lock()
        self._closed = False
        self.signing_key = _signing_key(config)
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._sweeper: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(
        self, progress: Callable[[str, int], None] | None = None, sweep: bool = False
    ) -> None:
        """Load every platform's live state from its log (verifying the chain as it goes).

        `sweep` (the server sets it) also starts the thread that releases expired holds every
        CUSTODY_SWEEP_INTERVAL_S; tests and one-shot CLI commands call `sweep_expired` instead.
        """
        for platform_id in self.store.platform_ids():
            writer = self._new_writer(platform_id)
            writer.load(None if progress is None else _bind_progress(progress, platform_id))
            self._platforms[platform_id] = self._new_platform(writer)
        _tune_gc()
        if self.config.checkpoint_every > 0:
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="checkpointer", daemon=True
            )
            self._checkpointer.start()
        if sweep and self.config.sweep_interval_s > 0:
            self._sweeper = threading.Thread(target=self._sweep_loop, name="sweeper", daemon=True)
            self._sweeper.start()

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=30)
        if self._sweeper is not None:
            self._sweeper.join(timeout=30)
        for platform in self._platforms.values():
            if platform.committer is not None:
                platform.committer.stop()
        self.store.close()

    def _new_platform(self, writer: PlatformWriter) -> _Platform:
        platform_id = writer.platform_id
        signer = NoteSigner(self.signing_key, origin_for(self.config.ledger_id, platform_id))

        def consistent(old_size: int, old_root: bytes, new_size: int, new_root: bytes) -> bool:
            # the writer replaces its tree when it rebuilds; always ask the current one
            return tree_consistency(writer.tree)(old_size, old_root, new_size, new_root)

        directory = self.config.data_dir / "checkpoints" / platform_id
        return _Platform(writer, CheckpointLog(directory, signer, consistent))

    def _new_writer(self, platform_id: str) -> PlatformWriter:
        vault = self.vault
        return PlatformWriter(
            self.store,
            platform_id,
            sealer=lambda subject, text: vault.seal(platform_id, subject, text),
            blinder=lambda subject, value: vault.blind(platform_id, subject, value),
            screener=vault.screening_token,
            clock_ms=self._clock_ms,
        )

    # -- platforms ------------------------------------------------------------------------------

    def create_platform(
        self, platform_id: str, name: str, actor: str, policy: Policy | None = None
    ) -> Outcome:
        if not is_platform_id(platform_id):
            return Outcome(
                "",
                "invalid",
                code=Code.INVALID_ARGUMENT,
                field="platform_id",
                message="platform id must match [a-z0-9][a-z0-9-]{0,62}",
            )
        cmd = c.CreatePlatform(client_id=f"create:{platform_id}", name=name, policy=policy)
        with self._create_lock:
            if platform_id in self._platforms:
                # The existing log answers: an identical retry is replayed (same id, same
                # content); another name is ID_REUSED; either way the attempt is recorded.
                return self.execute(platform_id, [cmd], actor)[0]
            writer = self._new_writer(platform_id)
            prepared = writer.prepare([Request([cmd], actor)])
            [[outcome]] = prepared.answers
            if outcome.status != "accepted":
                # A platform that does not exist has no log to record the refusal in: writing
                # it at position 0 would block the id forever. Answer, record nothing.
                return msgspec.structs.replace(outcome, seq=-1)
            writer.commit(prepared)  # CommitFailed propagates: nothing was created
            writer.mark_committed(prepared)
            self._platforms[platform_id] = self._new_platform(writer)
            return outcome

    def platform_ids(self) -> list[str]:
        return sorted(self._platforms)

    def _platform(self, platform_id: str) -> _Platform:
        platform = self._platforms.get(platform_id)
        if platform is None:
            raise PlatformNotFound(platform_id)
        return platform

    # -- writes ---------------------------------------------------------------------------------

    def execute(
        self, platform_id: str, commands: Sequence[c.Command], actor: str, linked: bool = False
    ) -> list[Outcome]:
        """Run the caller's own batch as one transaction (plus anything it shares it with)."""
        if self._closed:
            raise ServiceClosed()
        _check_request(commands, actor)
        platform = self._platform(platform_id)
        with platform.cond:
            platform.wait_drained()
            [answer] = platform.writer.execute([Request(commands, actor, linked)])
        return answer

    def submit(
        self, platform_id: str, commands: Sequence[c.Command], actor: str, linked: bool = False
    ) -> Future[list[Outcome]]:
        """Queue a request for the platform's group committer; the future resolves after commit."""
        if self._closed:
            raise ServiceClosed()
        _check_request(commands, actor)
        platform = self._platform(platform_id)
        if platform.committer is None:
            with self._create_lock:
                if platform.committer is None:
                    platform.committer = GroupCommitter(platform, self.config)
                    platform.committer.start()
        assert platform.committer is not None
        return platform.committer.enqueue(Request(commands, actor, linked))

    # -- reads ----------------------------------------------------------------------------------

    @contextmanager
    def reading(self, platform_id: str) -> Iterator[PlatformState]:
        """The platform's committed state, held still while the caller reads it."""
        platform = self._platform(platform_id)
        with platform.cond:
            platform.wait_drained()
            yield platform.writer.state

    # -- checkpoints and proofs -----------------------------------------------------------------

    def vkey(self, platform_id: str) -> str:
        """The verifier key auditors use for this platform's checkpoints."""
        return self._platform(platform_id).checkpoints.signer.vkey

    def sign_checkpoint(self, platform_id: str) -> SignedCheckpoint:
        """Sign the log at its committed size (on demand; the checkpointer does it on schedule)."""
        platform = self._platform(platform_id)
        with platform.cond:
            writer = platform.writer
            if writer.fenced:
                raise WriterFenced(f"platform {platform_id} is not served here")
            if writer.dirty:
                platform.wait_drained()  # rebuilds first, or raises StoreUnavailable
            size = writer.committed_next_seq  # the tree holds exactly the stored records
            if size == 0:
                raise ValueError("an empty log has no checkpoint")
            last = platform.checkpoints.last
            if last is not None and last.size == size:
                return last
            note = platform.checkpoints.sign(size, writer.tree.root(size))
            platform.signed_at_s = time.monotonic()
            cp = platform.checkpoints.last
            assert cp is not None and cp.note == note
            return cp

    def checkpoint(self, platform_id: str, size: int | None = None) -> SignedCheckpoint | None:
        """The latest signed checkpoint, or the one signed at exactly `size`."""
        checkpoints = self._platform(platform_id).checkpoints
        return checkpoints.last if size is None else checkpoints.at_size(size)

    def inclusion_proof(
        self, platform_id: str, index: int, size: int | None = None
    ) -> tuple[SignedCheckpoint, list[bytes], bytes]:
        """(checkpoint, audit path, record bytes) proving record `index` is in the checkpoint."""
        platform = self._platform(platform_id)
        cp = self.checkpoint(platform_id, size)
        if cp is None:
            raise LookupError(f"no checkpoint signed at size {size}")
        if not 0 <= index < cp.size:
            raise ValueError(f"index {index} is outside the checkpoint of size {cp.size}")
        with platform.cond:
            if platform.writer.dirty or platform.writer.fenced:
                platform.wait_drained()
            path = platform.writer.tree.inclusion_proof(index, cp.size)
        rows = self.store.read(platform.writer.stream, after=index - 1, limit=1)
        assert rows and rows[0][0] == index
        return cp, path, rows[0][2][32:]

    def consistency_proof(self, platform_id: str, first: int, second: int) -> list[bytes]:
        platform = self._platform(platform_id)
        with platform.cond:
            if platform.writer.dirty or platform.writer.fenced:
                platform.wait_drained()
            committed = platform.writer.committed_next_seq
            if not 0 < first <= second <= committed:
                raise ValueError(f"need 0 < first <= second <= {committed}")
            return platform.writer.tree.consistency_proof(first, second)

    def export(
        self,
        platform_id: str,
        out: Any,
        *,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> Any:
        """Write the export bundle up to a checkpoint signed now (through the checkpoint log,
        under the platform lock), with every checkpoint signed before it."""
        from ledger.export import export_bundle

        cp = self.sign_checkpoint(platform_id)
        checkpoints = self._platform(platform_id).checkpoints
        return export_bundle(
            self.store,
            platform_id,
            out,
            checkpoints.signer,
            # only checkpoints the checkpoint log signed: nothing is signed over unchecked rows
            checkpoints=[signed.note for signed in checkpoints.history()],
            upto=cp.size,
            progress=progress,
        )

    def _checkpoint_loop(self) -> None:
        every = self.config.checkpoint_every
        interval_s = self.config.checkpoint_interval_s
        while not self._stop.wait(1.0):
            for platform_id, platform in list(self._platforms.items()):
                committed = platform.writer.committed_next_seq
                last = platform.checkpoints.last
                signed = 0 if last is None else last.size
                due = committed - signed >= every or (
                    committed > signed and time.monotonic() - platform.signed_at_s >= interval_s
                )
                if due and not platform.writer.fenced:
                    try:
                        self.sign_checkpoint(platform_id)
                    except Exception:  # never let the schedule die; the next tick retries
                        log.exception("checkpoint for %s failed", platform_id)

    def sweep_expired(self, max_holds: int = 1000) -> dict[str, Outcome]:
        """Release expired holds on every platform that has some (BRIEF §4 holds discipline):
        one `expire_holds` record per platform, by the `system:sweeper` actor."""
        answers: dict[str, Outcome] = {}
        for platform_id, platform in list(self._platforms.items()):
            writer = platform.writer
            if writer.fenced:
                continue
            with self.reading(platform_id) as state:
                now_ms = writer.clock_ms()
                due = any(h.expires_at_ms <= now_ms for h in state.pending_holds.values())
            if due:
                cmd = c.ExpireHolds(client_id=f"sweep:{uuid.uuid4()}", max_holds=max_holds)
                [answers[platform_id]] = self.execute(platform_id, [cmd], SWEEPER_ACTOR)
        return answers

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.config.sweep_interval_s):
            try:
                self.sweep_expired()
            except Exception:  # never let the schedule die; the next tick retries
                log.exception("expiry sweep failed")

    def head(self, platform_id: str) -> tuple[int, bytes]:
        platform = self._platform(platform_id)
        with platform.cond:
            platform.wait_drained()
            return platform.writer.state.next_seq, platform.writer.head


def _check_request(commands: Sequence[c.Command], actor: str) -> None:
    """Refuse, to this caller only, what would otherwise fail a whole shared group."""
    if len(commands) > c.MAX_BATCH_COMMANDS:
        raise ValueError(f"at most {c.MAX_BATCH_COMMANDS} instructions per batch")
    if not is_actor(actor):
        raise ValueError("actor must be 1..128 printable characters")


def _signing_key(config: Config) -> Any:
    """The checkpoint key: loaded, or created on first start (like the dev TLS authority)."""
    path = config.signing_key_path
    assert path is not None
    if not path.exists():
        generate_key(path)
        log.warning("created a checkpoint signing key in %s; keep it offline in production", path)
    return load_key(path)


def _tune_gc() -> None:
    """Live state is millions of long-lived objects; the hot path allocates many short ones.

    Freezing what was loaded keeps every later full collection from walking it again, and a
    larger first generation threshold turns thousands of tiny collections per second into a few
    (measured ~2 us per transfer in bench/stages.py). Reference counting still frees almost
    everything at once; only cycles wait for a collection.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 50_000), max(gen1, 20), max(gen2, 100))


def _bind_progress(progress: Callable[[str, int], None], platform_id: str) -> Callable[[int], None]:
    def report(position: int) -> None:
        progress(platform_id, position)

    return report


class GroupCommitter:
    """Group commit in two stages so that deciding and storing overlap.

    The decide thread drains the bounded request queue and folds everything waiting into one
    prepared group (under the platform lock); the commit thread stores groups in order, one
    transaction each, and only then resolves the callers' futures. While group k is being
    written (SQLite and psycopg release the GIL), group k+1 is being decided.
    """

    PIPELINE_DEPTH: Final = 2

    def __init__(self, platform: _Platform, config: Config) -> None:
        self._platform = platform
        # Bounded by instructions, not requests: one request may carry thousands of them.
        self._queue: queue.Queue[object] = queue.Queue()
        self._queued_max = config.queue_max
        self._queued = 0  # instructions waiting, guarded by _admit
        self._admit = threading.Lock()
        self._stopped = False
        self._prepared: queue.Queue[object] = queue.Queue(maxsize=self.PIPELINE_DEPTH)
        self._group_max = config.group_max
        name = platform.writer.platform_id
        self._decider = threading.Thread(
            target=self._decide_loop, name=f"decide-{name}", daemon=True
        )
        self._committer = threading.Thread(
            target=self._commit_loop, name=f"commit-{name}", daemon=True
        )

    def start(self) -> None:
        self._decider.start()
        self._committer.start()

    def stop(self) -> None:
        """Finish what was admitted before the stop; refuse anything that arrives after it."""
        with self._admit:
            self._stopped = True
            self._queue.put(_STOP)
        self._decider.join(timeout=30)
        self._committer.join(timeout=30)

    def enqueue(self, request: Request) -> Future[list[Outcome]]:
        size = len(request.commands)
        future: Future[list[Outcome]] = Future()
        with self._admit:
            if self._stopped:
                raise ServiceClosed()
            if self._queued + size > self._queued_max:
                raise Overloaded("the platform's queue is full; retry with the same client ids")
            self._queued += size
            self._queue.put_nowait((request, future))
        return future

    def _taken(self, size: int) -> None:
        with self._admit:
            self._queued -= size

    def _gather(self) -> tuple[list[tuple[Request, Future[list[Outcome]]]], bool]:
        """Block for one request, then take whatever else is waiting, up to the group limit."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        size = len(first[0].commands)  # type: ignore[index]
        stop = False
        while size < self._group_max:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                stop = True
                break
            batch.append(nxt)
            size += len(nxt[0].commands)  # type: ignore[index]
        self._taken(size)
        return batch, stop  # type: ignore[return-value]

    def _decide_loop(self) -> None:
        platform = self._platform
        while True:
            batch, stop = self._gather()
            live = [(r, f) for r, f in batch if f.set_running_or_notify_cancel()]
            if live:
                try:
                    with platform.cond:
                        platform.cond.wait_for(lambda: platform.readers_waiting == 0)
                        if platform.writer.dirty:
                            platform.wait_drained()
                        prepared = platform.writer.prepare([r for r, _ in live])
                except Exception as exc:
                    for _, f in live:
                        f.set_exception(exc)
                else:
                    self._prepared.put((prepared, [f for _, f in live]))
            if stop:
                self._prepared.put(_STOP)
                return

    def _commit_loop(self) -> None:
        platform = self._platform
        writer = platform.writer
        while True:
            item = self._prepared.get()
            if item is _STOP:
                return
            prepared: Prepared
            futures: list[Future[list[Outcome]]]
            prepared, futures = item  # type: ignore[misc]
            try:
                if prepared.rows:
                    writer.commit(prepared)
                elif prepared.epoch != writer.epoch:
                    raise CommitFailed("an earlier commit failed")
                with platform.cond:
                    if prepared.epoch != writer.epoch:
                        raise CommitFailed("an earlier commit failed")
                    writer.mark_committed(prepared)
                    platform.cond.notify_all()
            except BaseException as exc:  # whatever it is, no caller may wait forever
                failure = exc if isinstance(exc, CommitFailed) else CommitFailed(repr(exc))
                for f in futures:
                    f.set_exception(failure)
                with platform.cond:
                    if prepared.epoch == writer.epoch:  # the first failure of this epoch
                        writer.recover(exc.__cause__ or exc)
                    platform.cond.notify_all()
                continue
            for f, answer in zip(futures, prepared.answers, strict=True):
                f.set_result(answer)
