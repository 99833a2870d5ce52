"""The ledger service: one writer per platform, a group-commit queue in front of each.

Callers either hand over their own batch (`execute`, used by the CLI, batch RPCs and the
benchmarks) or submit single requests that a per-platform committer thread folds into one
database transaction with whatever else is waiting (`submit`, used by concurrent RPCs).
Reads take the platform's lock so they only ever see committed state.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Final

from controls.codes import Code
from ledger import commands as c
from ledger.config import Config
from ledger.domain import PlatformState
from ledger.pii import PiiVault, blind_key, load_master_key
from ledger.store import LedgerStore
from ledger.validate import is_platform_id
from ledger.writer import Outcome, PlatformWriter, Request

_STOP: Final = object()


class PlatformNotFound(LookupError):
    pass


class Overloaded(RuntimeError):
    """The platform's queue is full; the caller should back off and retry with the same ids."""


class ServiceClosed(RuntimeError):
    pass


class _Platform:
    __slots__ = ("committer", "lock", "writer")

    def __init__(self, writer: PlatformWriter) -> None:
        self.writer = writer
        self.lock = threading.Lock()
        self.committer: GroupCommitter | None = None


class LedgerService:
    def __init__(self, config: Config, clock_ms: Callable[[], int] | None = None) -> None:
        self.config = config
        self.store = LedgerStore(config)
        master = load_master_key(config)
        self.vault = PiiVault(self.store.recorder.datastore, self.store.is_postgres, master)
        self._blind_key = blind_key(master)
        self._clock_ms = clock_ms
        self._platforms: dict[str, _Platform] = {}
        self._create_lock = threading.Lock()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, progress: Callable[[str, int], None] | None = None) -> None:
        """Load every platform's live state from its log (verifying the chain as it goes)."""
        for platform_id in self.store.platform_ids():
            writer = self._new_writer(platform_id)
            writer.load(None if progress is None else (lambda n, p=platform_id: progress(p, n)))
            self._platforms[platform_id] = _Platform(writer)

    def close(self) -> None:
        self._closed = True
        for platform in self._platforms.values():
            if platform.committer is not None:
                platform.committer.stop()
        self.store.close()

    def _new_writer(self, platform_id: str) -> PlatformWriter:
        vault = self.vault
        return PlatformWriter(
            self.store,
            platform_id,
            sealer=lambda subject, text: vault.seal(platform_id, subject, text),
            blind_key=self._blind_key,
            clock_ms=self._clock_ms,
        )

    # -- platforms ------------------------------------------------------------------------------

    def create_platform(self, platform_id: str, name: str, actor: str) -> Outcome:
        if not is_platform_id(platform_id):
            return Outcome(
                "",
                "invalid",
                code=Code.INVALID_ARGUMENT,
                field="platform_id",
                message="platform id must match [a-z0-9][a-z0-9-]{0,62}",
            )
        with self._create_lock:
            if platform_id in self._platforms:
                return Outcome(
                    f"create:{platform_id}",
                    "refused",
                    code=Code.PLATFORM_EXISTS,
                    message=f"platform {platform_id!r} exists",
                )
            writer = self._new_writer(platform_id)
            cmd = c.CreatePlatform(client_id=f"create:{platform_id}", name=name)
            [[outcome]] = writer.execute([Request([cmd], actor)])
            if outcome.status == "accepted":
                self._platforms[platform_id] = _Platform(writer)
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
        if len(commands) > c.MAX_BATCH_COMMANDS:
            raise ValueError(f"at most {c.MAX_BATCH_COMMANDS} instructions per batch")
        platform = self._platform(platform_id)
        with platform.lock:
            [answer] = platform.writer.execute([Request(commands, actor, linked)])
        return answer

    def submit(
        self, platform_id: str, commands: Sequence[c.Command], actor: str, linked: bool = False
    ) -> Future[list[Outcome]]:
        """Queue a request for the platform's group committer; the future resolves after commit."""
        if self._closed:
            raise ServiceClosed()
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
        with platform.lock:
            yield platform.writer.state

    def head(self, platform_id: str) -> tuple[int, bytes]:
        platform = self._platform(platform_id)
        with platform.lock:
            return platform.writer.state.next_seq, platform.writer.head


class GroupCommitter:
    """Drains a bounded queue and commits everything waiting in one transaction."""

    def __init__(self, platform: _Platform, config: Config) -> None:
        self._platform = platform
        self._queue: queue.Queue[object] = queue.Queue(maxsize=config.queue_max)
        self._group_max = config.group_max
        self._thread = threading.Thread(
            target=self._run, name=f"committer-{platform.writer.platform_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=10)

    def enqueue(self, request: Request) -> Future[list[Outcome]]:
        future: Future[list[Outcome]] = Future()
        try:
            self._queue.put_nowait((request, future))
        except queue.Full:
            raise Overloaded("the platform's queue is full") from None
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            size = len(item[0].commands)  # type: ignore[index]
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
            self._commit(batch)  # type: ignore[arg-type]
            if stop:
                return

    def _commit(self, batch: list[tuple[Request, Future[list[Outcome]]]]) -> None:
        futures = [f for _, f in batch if f.set_running_or_notify_cancel()]
        live = [(r, f) for r, f in batch if f.running()]
        if not live:
            return
        try:
            with self._platform.lock:
                answers = self._platform.writer.execute([r for r, _ in live])
        except Exception as exc:  # every caller of the group learns the commit failed
            for f in futures:
                f.set_exception(exc)
            return
        for (_, future), answer in zip(live, answers, strict=True):
            future.set_result(answer)
