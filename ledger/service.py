"""The ledger service: one writer per platform, a group-commit queue in front of each.

Callers either hand over their own batch (`execute`, used by the CLI, batch RPCs and the
benchmarks) or submit single requests that a per-platform committer thread folds into one
database transaction with whatever else is waiting (`submit`, used by concurrent RPCs).
Reads take the platform's lock so they only ever see committed state.

On PostgreSQL several servers may share one store: each platform is written by exactly one of
them, the holder of the platform's write lease (`ledger/lease.py`, a session advisory lock on a
dedicated connection). The others are followers: they keep the platform's state current by
tailing its log (before every read, and every lease poll), serve reads from it, and answer
writes with `WriterElsewhere` (the writer's advertised address, read from `custody_writers`).
When the writer dies, PostgreSQL releases its lock and a follower takes the lease within one
poll interval, catches up with the log and starts writing. On SQLite there is no lease: the one
process writes every platform, as before.
"""

from __future__ import annotations

import gc
import hmac
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from hashlib import sha256
from typing import Any, Final

import msgspec

from controls.codes import Code
from controls.policy import Policy
from ledger import balance, metrics
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
from ledger.checkpoint_store import SharedCheckpoints
from ledger.config import Config
from ledger.domain import PlatformState
from ledger.lease import (
    LeaseLost,
    LeaseManager,
    TakeoverBlocked,
    WriterElsewhere,
    WriterInfo,
    lookup_writer,
    writer_history,
)
from ledger.pii import PiiVault, load_master_key
from ledger.placement import GONE, OUT_DONE, MoveState, latest_moves
from ledger.store import LedgerStore, WriterSuperseded
from ledger.validate import is_actor, is_platform_id
from ledger.writer import (
    CommitFailed,
    Outcome,
    PlatformWriter,
    Prepared,
    Request,
    StoreUnavailable,
    WriterFenced,
)

__all__ = [
    "LedgerService",
    "Overloaded",
    "PlacedElsewhere",
    "PlatformNotFound",
    "ServiceClosed",
    "WriterElsewhere",
    "WriterFenced",
    "WriterInfo",
]

_STOP: Final = object()
log = logging.getLogger("ledger.service")
SWEEPER_ACTOR: Final = "system:sweeper"
WRITER: Final = "writer"
FOLLOWER: Final = "follower"
_DRAIN_TIMEOUT_S: Final = 30.0
SHUTDOWN_SNAPSHOT_MIN: Final = 10_000  # records of tail worth a snapshot at a planned stop


class PlatformNotFound(LookupError):
    pass


class PlacedElsewhere(WriterElsewhere):
    """The platform lives in another store (database) of the placement: go to `address`, a
    server of that store (empty when the placement names none for it)."""

    def __init__(self, platform_id: str, store: str, address: str, retry_after_ms: int) -> None:
        super().__init__(platform_id, f"store:{store}", address, retry_after_ms=retry_after_ms)
        self.store = store
        where = f"; its servers: {address}" if address else ""
        self.args = (f"platform {platform_id} is in store {store}, another database{where}",)


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
        "elsewhere",
        "lock",
        "readers_waiting",
        "role",
        "signed_at_s",
        "snapshot_at",
        "writer",
    )

    def __init__(
        self,
        writer: PlatformWriter,
        checkpoints: CheckpointLog,
        elsewhere: Callable[[], WriterElsewhere] | None = None,
    ) -> None:
        self.writer = writer
        # WRITER: this server holds the platform's write role (always, without leases);
        # FOLLOWER: another server writes it, the writer here is fenced and only tails the log.
        self.role = WRITER
        self.elsewhere = elsewhere
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.committer: GroupCommitter | None = None
        self.checkpoints = checkpoints
        self.signed_at_s = time.monotonic()
        self.snapshot_at = -1  # position of the last snapshot this process stored
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
            raise self.not_written_here()
        self.writer.ensure_clean()

    def not_written_here(self) -> WriterFenced:
        if self.role == FOLLOWER and self.elsewhere is not None:
            return self.elsewhere()
        return WriterFenced(f"platform {self.writer.platform_id} is not served here")

    def drained_or_timeout(self) -> None:
        """Caller holds `cond`: wait until no decided group waits for its commit, fenced or
        not (a follower's tail must not race a group still in flight from its writing days)."""
        writer = self.writer
        if not self.cond.wait_for(
            lambda: writer.committed_next_seq == writer.prepared_next_seq,
            timeout=_DRAIN_TIMEOUT_S,
        ):
            raise StoreUnavailable(f"platform {writer.platform_id}: a commit is still in flight")


class LedgerService:
    def __init__(
        self,
        config: Config,
        clock_ms: Callable[[], int] | None = None,
        *,
        lease: bool | None = None,
    ) -> None:
        """`lease`: take per-platform write leases (default: on PostgreSQL, never on SQLite).

        Without leases this process writes every platform it knows; a second writer on the same
        store is stopped by the primary key (`WriterFenced`), never forks a log."""
        self.config = config
        self.store = LedgerStore(config)
        use_lease = self.store.is_postgres if lease is None else lease
        if use_lease and not self.store.is_postgres:
            self.store.close()
            raise ValueError("write leases need PostgreSQL")
        self._lease = LeaseManager(config) if use_lease else None
        self._lease_thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        # called (platform id, WRITER or FOLLOWER, writers-table row or None) on every change
        self.role_listener: Callable[[str, str, WriterInfo | None], None] | None = None
        master = load_master_key(config)
        self.vault = PiiVault(self.store.datastore, self.store.is_postgres, master)
        # snapshots are authenticated: whoever can write the database cannot forge a state
        self._snapshot_key = hmac.new(master, b"custody-snapshot/v1", sha256).digest()
        self._clock_ms = clock_ms
        self._platforms: dict[str, _Platform] = {}
        # PostgreSQL: each platform's latest `custody_moves` row in this store (ledger/move.py);
        # a platform moving out or gone elsewhere is neither written nor read here
        self._moves: dict[str, MoveState] = {}
        self._last_share: int | None = None  # CUSTODY_LEASE_BALANCE: the last fair share
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
        self._refresh_moves()
        for platform_id in self.store.platform_ids():
            if self._gone(platform_id):
                continue  # moved to another store: its rows stay here, history only
            writer = self._new_writer(platform_id)
            writer.load(None if progress is None else _bind_progress(progress, platform_id))
            platform = self._new_platform(writer)
            if self._lease is not None:
                writer.fenced = True  # a follower until it holds the lease
                platform.role = FOLLOWER
            self._platforms[platform_id] = platform
        tune_gc()
        if self._lease is not None:
            self._lease.connect()
            self._lease_tick()  # take what nobody writes before serving anything
            self._lease_thread = threading.Thread(
                target=self._lease_loop, name="lease", daemon=True
            )
            self._lease_thread.start()
            self._watchdog = threading.Thread(
                target=self._watchdog_loop, name="lease-watchdog", daemon=True
            )
            self._watchdog.start()
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
        for thread in (self._lease_thread, self._watchdog):
            if thread is not None:
                thread.join(timeout=30)
        for platform in self._platforms.values():
            if platform.committer is not None:
                platform.committer.stop()
        self._snapshot_at_shutdown()
        if self._lease is not None:
            for platform_id, platform in self._platforms.items():
                if platform.role == WRITER:  # the handover shows in the logs, not only in the db
                    log.info("no longer writing platform %s: shutting down", platform_id)
            self._lease.close()  # after the last commit: PostgreSQL releases every lease
        self.store.close()

    def _new_platform(self, writer: PlatformWriter) -> _Platform:
        platform_id = writer.platform_id
        signer = NoteSigner(self.signing_key, origin_for(self.config.ledger_id, platform_id))

        def consistent(old_size: int, old_root: bytes, new_size: int, new_root: bytes) -> bool:
            # the writer replaces its tree when it rebuilds; always ask the current one
            return tree_consistency(writer.tree)(old_size, old_root, new_size, new_root)

        directory = self.config.data_dir / "checkpoints" / platform_id

        def elsewhere() -> WriterElsewhere:
            return self.writer_elsewhere(platform_id)

        shared = None
        if self.store.is_postgres:  # every server of the store shares one checkpoint history
            schema = self.config.postgres.get("POSTGRES_SCHEMA") or "public"
            shared = SharedCheckpoints(self.store.datastore, schema, platform_id)
        checkpoints = CheckpointLog(directory, signer, consistent, shared)
        return _Platform(writer, checkpoints, elsewhere)

    def _new_writer(self, platform_id: str) -> PlatformWriter:
        vault = self.vault
        writer = PlatformWriter(
            self.store,
            platform_id,
            sealer=lambda subject, text: vault.seal(platform_id, subject, text),
            blinder=lambda subject, value: vault.blind(platform_id, subject, value),
            screener=vault.screening_token,
            clock_ms=self._clock_ms,
        )
        writer.snapshot_key = self._snapshot_key
        return writer

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
            if self._lease is not None:
                self._discover()  # another server may have created it
            if self._gone(platform_id) or platform_id not in self._platforms:
                self._refuse_if_placed_elsewhere(platform_id)
            if platform_id in self._platforms:
                # The existing log answers: an identical retry is replayed (same id, same
                # content); another name is ID_REUSED; either way the attempt is recorded.
                return self.execute(platform_id, [cmd], actor)[0]
            lease = self._lease
            if lease is not None:
                try:
                    if not lease.try_acquire(platform_id):
                        raise self.writer_elsewhere(platform_id)
                except LeaseLost as exc:
                    raise StoreUnavailable(f"cannot take the write lease: {exc}") from exc
            try:
                writer = self._new_writer(platform_id)
                prepared = writer.prepare([Request([cmd], actor)])
                [[outcome]] = prepared.answers
                if outcome.status != "accepted":
                    # A platform that does not exist has no log to record the refusal in:
                    # writing it at position 0 would block the id forever. Answer, record
                    # nothing.
                    if lease is not None:
                        lease.release(platform_id)
                    return msgspec.structs.replace(outcome, seq=-1)
                info = None if lease is None else lease.announce(platform_id, 0)
                if info is not None:
                    writer.claim = (platform_id, info.server_id, info.epoch)
                writer.commit(prepared)  # CommitFailed propagates: nothing was created
                writer.mark_committed(prepared)
            except BaseException:
                if lease is not None:
                    lease.release(platform_id)
                raise
            self._platforms[platform_id] = self._new_platform(writer)
            if info is not None:
                self._notify_role(platform_id, WRITER, info)
            return outcome

    def platform_ids(self) -> list[str]:
        """The platforms this server serves (not those that moved to another store)."""
        return sorted(p for p in self._platforms if not self._gone(p))

    def _platform(self, platform_id: str) -> _Platform:
        platform = self._platforms.get(platform_id)
        if platform is None or self._gone(platform_id):
            self._refuse_if_placed_elsewhere(platform_id)
            raise PlatformNotFound(platform_id)
        return platform

    # -- placement across databases (ledger/placement.py) -----------------------------------------

    def _gone(self, platform_id: str) -> bool:
        move = self._moves.get(platform_id)
        return move is not None and move.state in GONE

    def _refuse_if_placed_elsewhere(self, platform_id: str) -> None:
        """Raise WriterElsewhere, naming a server of the right store, for a platform this
        store does not serve: one that moved out (or is moving), or one the placement file
        puts in another store. Return for a platform that would be this store's."""
        retry_ms = self.config.lease_poll_ms
        move = self._moves.get(platform_id)
        placement = self.config.placement
        if move is not None and move.state in GONE:
            if move.state != OUT_DONE or placement is None or move.peer not in placement.stores:
                # still moving (or gone to a store this server's file does not know): wait
                raise WriterElsewhere(platform_id, retry_after_ms=retry_ms)
            store = move.peer
        elif placement is not None and placement.home(platform_id) != self.config.store_name:
            store = placement.home(platform_id)
        else:
            return
        assert placement is not None
        raise PlacedElsewhere(platform_id, store, placement.address(store, platform_id), retry_ms)

    def _refresh_moves(self) -> None:
        """Read this store's latest move rows (PostgreSQL; SQLite stores never move)."""
        if not self.store.is_postgres:
            return
        schema = self.config.postgres.get("POSTGRES_SCHEMA") or "public"
        with self.store.datastore.get_connection() as conn, conn.cursor() as curs:
            moves = latest_moves(curs, schema)
        self._moves = moves

    # -- writes ---------------------------------------------------------------------------------

    def execute(
        self, platform_id: str, commands: Sequence[c.Command], actor: str, linked: bool = False
    ) -> list[Outcome]:
        """Run the caller's own batch as one transaction (plus anything it shares it with)."""
        if self._closed:
            raise ServiceClosed()
        _check_request(commands, actor)
        platform = self._platform(platform_id)
        if platform.role != WRITER:
            raise platform.not_written_here()
        try:
            with platform.cond:
                platform.wait_drained()
                [answer] = platform.writer.execute([Request(commands, actor, linked)])
        except CommitFailed as exc:
            if isinstance(exc.__cause__, WriterSuperseded):  # as on a lost lease
                self._demote(platform)
                raise platform.not_written_here() from exc
            raise
        return answer

    def submit(
        self, platform_id: str, commands: Sequence[c.Command], actor: str, linked: bool = False
    ) -> Future[list[Outcome]]:
        """Queue a request for the platform's group committer; the future resolves after commit."""
        if self._closed:
            raise ServiceClosed()
        _check_request(commands, actor)
        platform = self._platform(platform_id)
        if platform.role != WRITER:
            raise platform.not_written_here()
        if platform.committer is None:
            with self._create_lock:
                if platform.committer is None:
                    platform.committer = GroupCommitter(platform, self.config, self._demote)
                    platform.committer.start()
        assert platform.committer is not None
        return platform.committer.enqueue(Request(commands, actor, linked))

    # -- reads ----------------------------------------------------------------------------------

    @contextmanager
    def reading(self, platform_id: str) -> Iterator[PlatformState]:
        """The platform's committed state, held still while the caller reads it.

        On a follower, the state is first brought up to the end of the stored log, so a read
        that follows an acknowledged write (on any server) sees it."""
        platform = self._platform(platform_id)
        with platform.cond:
            if platform.role == FOLLOWER:
                self._follow_locked(platform)
            else:
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
                raise platform.not_written_here()
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
            metrics.checkpoint_signed(platform_id)
            cp = platform.checkpoints.last
            assert cp is not None and cp.note == note
            return cp

    def checkpoint(self, platform_id: str, size: int | None = None) -> SignedCheckpoint | None:
        """The latest signed checkpoint, or the one signed at exactly `size`."""
        checkpoints = self._platform(platform_id).checkpoints
        return checkpoints.latest() if size is None else checkpoints.at_size(size)

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
                try:
                    self._maybe_snapshot(platform)
                except Exception:  # a snapshot only speeds restarts up; the log stays the truth
                    log.exception("snapshot for %s failed", platform_id)

    def _snapshot_at_shutdown(self) -> None:
        """A planned stop leaves a snapshot at the log's end when the tail since the last one is
        long (SHUTDOWN_SNAPSHOT_MIN records), so the next start replays almost nothing; a crash
        still leaves up to CUSTODY_SNAPSHOT_EVERY records of tail."""
        if self.config.snapshot_every <= 0:
            return
        if self._checkpointer is not None and self._checkpointer.is_alive():
            # still storing a scheduled snapshot (its join timed out): never race it
            log.warning("no snapshot at shutdown: the checkpoint thread is still busy")
            return
        every = min(SHUTDOWN_SNAPSHOT_MIN, self.config.snapshot_every)
        for platform_id, platform in self._platforms.items():
            if platform.role != WRITER or platform.writer.fenced:
                continue
            try:
                self._maybe_snapshot(platform, every)
            except Exception:  # the log is complete without it; the next start replays more
                log.warning("no snapshot of %s at shutdown", platform_id, exc_info=True)

    def _maybe_snapshot(self, platform: _Platform, every: int | None = None) -> None:
        """Every CUSTODY_SNAPSHOT_EVERY (or `every`) records, capture the state under the
        platform's lock (pipeline drained) and store it outside the lock."""
        every = self.config.snapshot_every if every is None else every
        writer = platform.writer
        last = max(writer.snapshot_position, platform.snapshot_at)
        if every <= 0 or writer.fenced or writer.committed_next_seq - max(last, 0) < every:
            return
        with platform.cond:
            platform.wait_drained()
            captured = writer.capture_snapshot()
        if captured is not None:
            writer.store_snapshot(*captured)
            platform.snapshot_at = writer.committed_next_seq

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
            if platform.role == FOLLOWER:
                self._follow_locked(platform)
            else:
                platform.wait_drained()
            return platform.writer.state.next_seq, platform.writer.head

    # -- write leases (PostgreSQL) ----------------------------------------------------------------

    @property
    def server_id(self) -> str:
        return self.config.server_id

    def is_writer(self, platform_id: str) -> bool:
        """Whether this server writes the platform now (always true without leases; false for
        a platform that moved to another store)."""
        if self._gone(platform_id):
            return False
        return self._platform(platform_id).role == WRITER

    def writer_elsewhere(self, platform_id: str) -> WriterElsewhere:
        """The error for a write this server cannot do: who writes the platform, and where."""
        lease = self._lease
        retry_ms = self.config.lease_poll_ms
        if lease is None:
            return WriterElsewhere(platform_id, retry_after_ms=retry_ms)
        try:
            info = lookup_writer(
                self.store.datastore, lease.schema, lease.key(platform_id), platform_id
            )
        except Exception:  # the database is away: nobody can be named, retry later
            log.warning("cannot read the writers table", exc_info=True)
            info = None
        if info is None or not info.held or info.server_id == self.server_id:
            # nobody holds the lease (a failover in progress), or the row still names us
            return WriterElsewhere(platform_id, retry_after_ms=retry_ms)
        return WriterElsewhere(
            platform_id, info.server_id, info.address, info.since_ms, info.epoch, retry_ms
        )

    def writer_history(self, platform_id: str) -> list[WriterInfo]:
        """Every takeover of the platform's write role, oldest first (PostgreSQL only)."""
        if self._lease is None:
            return []
        return writer_history(self.store.datastore, self._lease.schema, platform_id)

    def _notify_role(self, platform_id: str, role: str, info: WriterInfo | None) -> None:
        listener = self.role_listener
        if listener is not None:
            try:
                listener(platform_id, role, info)
            except Exception:
                log.exception("role listener failed")

    def _lease_loop(self) -> None:
        assert self._lease is not None
        while not self._stop.wait(self._lease.poll_s):
            try:
                self._lease_tick()
            except Exception:  # never let the lease thread die; the next tick retries
                log.exception("lease tick failed")

    def _watchdog_loop(self) -> None:
        """Fence every writer when the lease connection has not answered for too long, even if
        the check itself hangs (a stalled network): stop writing first, ask questions later."""
        lease = self._lease
        assert lease is not None
        while not self._stop.wait(lease.poll_s / 2):
            if lease.stale() and any(p.role == WRITER for p in list(self._platforms.values())):
                log.error("lease connection silent for %.1f s: fencing", lease.timeout_s)
                self._demote_all()

    def _lease_tick(self) -> None:
        """Check the lease connection, find new platforms, take leases nobody holds, tail the
        logs this server follows, and repair a writer the primary key fenced."""
        lease = self._lease
        assert lease is not None
        if self._closed:
            return
        try:
            if not lease.connected:
                lease.connect()
            lease.check()
        except Exception as exc:
            log.error("write lease connection lost: %s", exc)
            self._demote_all()
            lease.close()
            return
        try:
            self._refresh_moves()
            with self._create_lock:
                self._discover()
        except Exception:
            log.warning("cannot read the platform directory", exc_info=True)
        share = self._lease_share()  # None: take every free lease
        for platform_id, platform in list(self._platforms.items()):
            if self._closed:
                return
            try:
                if self._gone(platform_id):
                    self._let_go(platform)
                elif platform.role == WRITER:
                    if platform_id not in lease.held:
                        self._demote(platform)
                    elif share is not None and len(lease.held) > share:
                        self._let_go(platform, "above this server's fair share")
                    elif platform.writer.fenced:
                        self._repair(platform)
                elif (share is None or len(lease.held) < share) and lease.try_acquire(platform_id):
                    self._promote(platform)
                else:
                    with platform.cond:
                        self._follow_locked(platform)
            except LeaseLost as exc:
                log.error("write lease connection lost: %s", exc)
                self._demote_all()
                return
            except TakeoverBlocked as exc:  # the old writer's commit still holds its row
                log.warning("taking over platform %s waits for the next poll: %s", platform_id, exc)
            except Exception:
                log.exception("lease upkeep for %s failed", platform_id)

    def _lease_share(self) -> int | None:
        """With CUSTODY_LEASE_BALANCE=1: announce this server and return the most leases it
        should hold (ledger/balance.py); None when not balancing or the count is unknown."""
        lease = self._lease
        if not self.config.lease_balance or lease is None:
            return None
        schema = self.config.postgres.get("POSTGRES_SCHEMA") or "public"
        try:
            balance.heartbeat(self.store.datastore, schema, self.server_id, self.config.advertise)
            live = balance.live_servers(
                self.store.datastore, schema, within_ms=int(lease.timeout_s * 1000)
            )
        except Exception:
            # keep the last share: no share at all would take every free lease for one poll
            # and hand them back at the next
            log.warning("cannot count the live servers; keeping the last share", exc_info=True)
            return self._last_share
        # a platform being created holds its lease before it is in `_platforms`: count it too
        platforms = len({p for p in self._platforms if not self._gone(p)} | set(lease.held))
        self._last_share = max(1, balance.fair_share(platforms, live))
        return self._last_share

    def _discover(self) -> None:
        """Platforms another server created since: loaded here as followers. Caller holds
        `_create_lock`."""
        for platform_id in self.store.platform_ids():
            if platform_id in self._platforms or self._gone(platform_id):
                continue
            writer = self._new_writer(platform_id)
            writer.fenced = True
            writer.load()
            platform = self._new_platform(writer)
            platform.role = FOLLOWER
            self._platforms[platform_id] = platform

    def _catch_up(self, writer: PlatformWriter) -> None:
        """Fold the records stored after the state's end (same fold and chain check as a load).
        Caller holds the platform lock and the pipeline is drained."""
        if writer.dirty:
            writer.ensure_clean()
        try:
            for seq, kind, packed in self.store.iter_rows(
                writer.stream, after=writer.state.next_seq - 1
            ):
                writer._replay_row(seq, kind, packed)
        except Exception:
            log.warning("tailing %s failed; reloading it", writer.platform_id, exc_info=True)
            writer.committed_next_seq = writer.prepared_next_seq
            writer.dirty = True
            writer.ensure_clean()  # a full load, or StoreUnavailable
        writer.committed_next_seq = writer.prepared_next_seq = writer.state.next_seq

    def _follow_locked(self, platform: _Platform) -> None:
        """Bring a follower's state to the end of the stored log. Caller holds `cond`."""
        platform.drained_or_timeout()
        self._catch_up(platform.writer)

    def _promote(self, platform: _Platform) -> None:
        """This server now holds the platform's lease: catch up with the log and start writing."""
        lease = self._lease
        assert lease is not None
        writer = platform.writer
        platform_id = writer.platform_id
        try:
            # Read the moves again now that the lease is held: a mover releases it only after
            # committing `out-done`, so this read cannot miss a move that the tick's earlier
            # read did (writing after it would put acknowledged records where nobody reads).
            self._refresh_moves()
            if self._gone(platform_id):
                lease.release(platform_id)
                return
            with platform.cond:
                platform.drained_or_timeout()
                self._catch_up(writer)
                info = lease.announce(platform_id, writer.state.next_seq)
                # A group the previous writer had checked before our row committed is stored
                # now (its commit held the row): read it too, and record where we really start.
                self._catch_up(writer)
                if writer.state.next_seq != info.from_seq:
                    lease.restate_start(platform_id, info.epoch, writer.state.next_seq)
                    info = msgspec.structs.replace(info, from_seq=writer.state.next_seq)
                # never cleared: a group already past the fence check still meets this one
                writer.claim = (platform_id, info.server_id, info.epoch)
                writer.fenced = False
                platform.role = WRITER
                platform.cond.notify_all()
        except LeaseLost:
            raise
        except Exception:
            lease.release(platform_id)  # let a server that can read the log take it
            raise
        log.info(
            "writing platform %s from position %d (epoch %d)",
            platform_id,
            info.from_seq,
            info.epoch,
        )
        self._notify_role(platform_id, WRITER, info)

    def _demote(self, platform: _Platform) -> None:
        """Stop writing the platform at once: later requests are told where the writer is."""
        platform.role = FOLLOWER
        platform.writer.fenced = True  # no new group is decided from now on
        with platform.cond:
            platform.cond.notify_all()
        log.warning("no longer writing platform %s", platform.writer.platform_id)
        self._notify_role(platform.writer.platform_id, FOLLOWER, None)

    def _let_go(self, platform: _Platform, why: str = "it moves to another store") -> None:
        """Stop writing the platform and release its lease once no group is in flight: it
        moves (or moved) to another store and the mover takes the lease to copy the log, or
        this server holds more than its fair share and another takes it over."""
        lease = self._lease
        assert lease is not None
        platform_id = platform.writer.platform_id
        if platform.role == WRITER:
            self._demote(platform)
        if platform_id in lease.held:
            with platform.cond:
                platform.drained_or_timeout()
            lease.release(platform_id)
            log.warning("platform %s: write lease released: %s", platform_id, why)

    def _demote_all(self) -> None:
        for platform in list(self._platforms.values()):
            if platform.role == WRITER:
                self._demote(platform)

    def _repair(self, platform: _Platform) -> None:
        """The primary key fenced this writer although it holds the lease: a writer that had
        lost its lease committed after this one caught up. Its records are in the log now;
        catch up with them and go on writing."""
        writer = platform.writer
        with platform.cond:
            platform.drained_or_timeout()
            self._catch_up(writer)
            writer.fenced = False
            platform.cond.notify_all()
        log.warning(
            "platform %s: another writer appended while this server held the lease; "
            "caught up at position %d",
            writer.platform_id,
            writer.state.next_seq,
        )


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


def tune_gc() -> None:
    """Live state is millions of long-lived objects; the hot path allocates many short ones.

    Freezing what was loaded keeps every later full collection from walking it again, and a
    larger first generation threshold turns thousands of tiny collections per second into a few
    (measured ~2 us per transfer in bench/stages.py). Reference counting still frees almost
    everything at once; only cycles wait for a collection.
    """
    gc.freeze()  # no full collection first: at 10M records it alone took seconds
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

    def __init__(
        self,
        platform: _Platform,
        config: Config,
        demote: Callable[[_Platform], None] | None = None,
    ) -> None:
        self._platform = platform
        self._demote = demote  # on WriterSuperseded: fence as on a lost lease
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
                    if isinstance(exc, WriterFenced) and not isinstance(exc, WriterElsewhere):
                        exc = platform.not_written_here()
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
                if prepared.rows and writer.fenced:
                    # the lease was lost after this group was decided: never store it
                    raise CommitFailed(f"platform {writer.platform_id}: write lease lost")
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
                failure: BaseException = (
                    exc if isinstance(exc, CommitFailed) else CommitFailed(repr(exc))
                )
                if isinstance(exc.__cause__, WriterSuperseded) and self._demote is not None:
                    self._demote(platform)  # another server took over: as on a lost lease
                if writer.fenced and platform.role == FOLLOWER:
                    failure = platform.not_written_here()  # nothing stored: go to the writer
                for f in futures:
                    f.set_exception(failure)
                with platform.cond:
                    if prepared.epoch == writer.epoch:  # the first failure of this epoch
                        writer.recover(exc.__cause__ or exc)
                    platform.cond.notify_all()
                continue
            for f, answer in zip(futures, prepared.answers, strict=True):
                f.set_result(answer)
