"""Signed checkpoints: Ed25519 keys, C2SP signed notes, tlog-checkpoint bodies, and a log of
signed checkpoints that never signs two inconsistent ones.

* Signing key: an Ed25519 private key in a file (PKCS#8 PEM written with mode 0600; PKCS#8 DER,
  a raw 32-byte seed, or Go's `PRIVATE+KEY+<name>+<id>+<base64>` string are also read).
* Key name = checkpoint origin = `<domain>/<ledger id>/<platform>`; key ID =
  SHA-256(name || 0x0A || 0x01 || public key)[:4]; vkey = `<name>+<hex id>+<base64(0x01||pub)>`.
* Checkpoint body (c2sp.org/tlog-checkpoint): `<origin>\\n<size>\\n<base64 root>\\n`.
* Note: body, a blank line, `— <name> <base64(key id || Ed25519 signature over the body)>\\n`.

`CheckpointLog` persists the last signed (size, root) BEFORE returning a note and refuses to sign
anything that is not a consistent extension of it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DEFAULT_DOMAIN: Final = "custody-ledger.example"
SIG_ED25519: Final = 0x01
EM_DASH: Final = "—"
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
_NAME_RE: Final = re.compile(r"^[^\s+]+$")


log = logging.getLogger("ledger.checkpoint")


class KeyFileError(ValueError):
    """The signing key file is missing, unreadable, too widely readable or not an Ed25519 key."""


class InconsistentCheckpoint(RuntimeError):
    """Signing this checkpoint would contradict one already signed."""


def origin_for(ledger_id: str, platform_id: str, domain: str = DEFAULT_DOMAIN) -> str:
    origin = f"{domain}/{ledger_id}/{platform_id}"
    if not _NAME_RE.match(origin):
        raise ValueError(f"origin {origin!r} must not contain whitespace or '+'")
    return origin


def key_id(name: str, public_key: bytes) -> int:
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([SIG_ED25519]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def vkey_for(name: str, public_key: bytes) -> str:
    b64 = base64.b64encode(bytes([SIG_ED25519]) + public_key).decode()
    return f"{name}+{key_id(name, public_key):08x}+{b64}"


# -- key files ----------------------------------------------------------------------------------


def generate_key(path: Path | str) -> Ed25519PrivateKey:
    """Create a new signing key file (PKCS#8 PEM, mode 0600). Never overwrites an existing file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    if len(seed) != 32:
        raise KeyFileError("an Ed25519 seed is 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(seed)


def parse_go_skey(text: str) -> tuple[str, Ed25519PrivateKey]:
    """Go x/mod `PRIVATE+KEY+<name>+<hex id>+<base64(0x01 || seed)>` -> (name, key)."""
    parts = text.strip().split("+", 4)
    if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
        raise KeyFileError("not a PRIVATE+KEY+... string")
    name, hex_id, b64 = parts[2:]
    raw = base64.b64decode(b64, validate=True)
    if len(raw) != 33 or raw[0] != SIG_ED25519:
        raise KeyFileError("not an Ed25519 key")
    key = key_from_seed(raw[1:])
    if f"{key_id(name, public_bytes(key)):08x}" != hex_id:
        raise KeyFileError("key ID does not match the key")
    return name, key


def load_key(path: Path | str, *, check_mode: bool = True) -> Ed25519PrivateKey:
    """Read a signing key: PKCS#8 PEM or DER, a raw 32-byte seed, base64/hex of a seed, or Go's
    PRIVATE+KEY format. With `check_mode`, refuse files readable by group or others."""
    path = Path(path)
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc}") from None
    if check_mode and os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"signing key {path} is readable by others; chmod 600 it")
    return parse_key(data)


def parse_key(data: bytes) -> Ed25519PrivateKey:
    if data.startswith(b"-----BEGIN"):
        key = serialization.load_pem_private_key(data, password=None)
    elif len(data) == 32:
        return key_from_seed(data)
    elif data.startswith(b"PRIVATE+KEY+"):
        return parse_go_skey(data.decode())[1]
    else:
        text = data.strip()
        try:
            if len(text) == 64:
                return key_from_seed(bytes.fromhex(text.decode()))
            if len(text) == 44:
                return key_from_seed(base64.b64decode(text, validate=True))
        except (ValueError, binascii.Error):
            pass
        try:
            key = serialization.load_der_private_key(data, password=None)
        except ValueError:
            raise KeyFileError("unrecognised signing key format") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError("the signing key is not an Ed25519 key")
    return key


# -- notes --------------------------------------------------------------------------------------


def _check_text(text: bytes) -> None:
    if not text.endswith(b"\n"):
        raise ValueError("note text must end in a newline")
    decoded = text.decode("utf-8")
    if any(ch < " " and ch != "\n" for ch in decoded):
        raise ValueError("note text must not contain control characters")


class NoteSigner:
    """Signs C2SP notes with one Ed25519 key under one key name."""

    def __init__(self, key: Ed25519PrivateKey, name: str) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"key name {name!r} must not contain whitespace or '+'")
        self.key = key
        self.name = name
        self.public_key = public_bytes(key)
        self.key_id = key_id(name, self.public_key)

    @property
    def vkey(self) -> str:
        return vkey_for(self.name, self.public_key)

    def signature_line(self, text: bytes) -> bytes:
        _check_text(text)
        sig = self.key.sign(text)
        b64 = base64.b64encode(self.key_id.to_bytes(4, "big") + sig).decode()
        return f"{EM_DASH} {self.name} {b64}\n".encode()

    def sign(self, text: bytes) -> bytes:
        """The signed note: text, a blank line, one signature line."""
        return text + b"\n" + self.signature_line(text)

    def cosign(self, note: bytes) -> bytes:
        """Add this key's signature line to an already signed note."""
        split = note.rfind(b"\n\n")
        if split < 0:
            raise ValueError("not a signed note")
        return note + self.signature_line(note[: split + 1])


@dataclass(frozen=True)
class SignedCheckpoint:
    size: int
    root: bytes
    note: bytes


def checkpoint_body(origin: str, size: int, root: bytes) -> bytes:
    if len(root) != 32 or size < 0:
        raise ValueError("a checkpoint needs a size >= 0 and a 32-byte root")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n".encode()


def parse_checkpoint_note(note: bytes) -> tuple[str, int, bytes]:
    """(origin, size, root) of a signed checkpoint note, WITHOUT verifying its signature."""
    split = note.rfind(b"\n\n")
    if split < 0:
        raise ValueError("not a signed note")
    lines = note[: split + 1].decode().split("\n")
    if len(lines) < 4:
        raise ValueError("not a checkpoint")
    return lines[0], int(lines[1]), base64.b64decode(lines[2], validate=True)


def sign_checkpoint(signer: NoteSigner, size: int, root: bytes) -> bytes:
    """Sign a checkpoint with origin = key name. Prefer `CheckpointLog.sign`, which refuses to
    sign anything inconsistent with what was signed before."""
    return signer.sign(checkpoint_body(signer.name, size, root))


ConsistencyCheck = Callable[[int, bytes, int, bytes], bool]


class SharedNotes(Protocol):
    """Where the servers of one store share a platform's signed notes."""

    def append(self, cp: SignedCheckpoint) -> None: ...
    def latest(self) -> SignedCheckpoint | None: ...
    def at_size(self, size: int) -> SignedCheckpoint | None: ...
    def history(self, page: int = 10_000) -> list[SignedCheckpoint]: ...


def tree_consistency(tree: object) -> ConsistencyCheck:
    """A consistency check backed by the writer's MerkleLog: the new root must be the tree's root
    at the new size, and the tree's consistency proof must link the old root to it."""
    from ledger.merkle import MerkleLog, verify_consistency

    assert isinstance(tree, MerkleLog)

    def check(old_size: int, old_root: bytes, new_size: int, new_root: bytes) -> bool:
        if new_size > tree.size or tree.root(new_size) != new_root:
            return False
        if old_size == 0:
            return True
        proof = tree.consistency_proof(old_size, new_size)
        return verify_consistency(old_size, new_size, old_root, new_root, proof)

    return check


class CheckpointLog:
    """The signed checkpoints of one platform's log, persisted in `directory`:

    * `last.json`  the last signed size, root and note (replaced atomically, fsynced, BEFORE the
      note is returned to anyone);
    * `notes.log`  every signed checkpoint, one `<size> <base64 note>` line each, append-only.
    """

    def __init__(
        self,
        directory: Path | str,
        signer: NoteSigner,
        consistent: ConsistencyCheck,
        shared: SharedNotes | None = None,
    ):
        """`shared` (PostgreSQL, `ledger/checkpoint_store.py`): the notes every server of the
        store signed; the next checkpoint extends the latest of them, and lookups see them all."""
        self.shared = shared
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.signer = signer
        self.consistent = consistent
        self._last_path = self.directory / "last.json"
        self._notes_path = self.directory / "notes.log"
        self._lock = threading.Lock()
        self.last: SignedCheckpoint | None = self._load()

    @property
    def origin(self) -> str:
        return self.signer.name

    def _repair_torn_tail(self) -> None:
        """Cut a torn last append so that the next note starts on a line of its own."""
        try:
            data = self._notes_path.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):
            log.warning("cutting a torn last line from %s", self._notes_path)
            with open(self._notes_path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())

    def _load(self) -> SignedCheckpoint | None:
        self._repair_torn_tail()
        last: SignedCheckpoint | None = None
        try:
            raw = json.loads(self._last_path.read_text())
        except FileNotFoundError:
            raw = None
        if raw is not None:
            if raw["origin"] != self.origin:
                raise InconsistentCheckpoint(
                    f"{self._last_path} belongs to {raw['origin']!r}, not {self.origin!r}"
                )
            last = SignedCheckpoint(
                raw["size"], base64.b64decode(raw["root"]), base64.b64decode(raw["note"])
            )
        # a crash between appending to notes.log and replacing last.json: the log wins
        for cp in self._file_history():
            if last is None or cp.size > last.size:
                last = cp
        return self._newer_shared(last)

    def _genuine(self, cp: SignedCheckpoint) -> bool:
        """A note from the shared table counts only if this ledger's key signed exactly it."""
        try:
            return sign_checkpoint(self.signer, cp.size, cp.root) == cp.note
        except ValueError:
            return False

    def _newer_shared(self, last: SignedCheckpoint | None) -> SignedCheckpoint | None:
        """The shared table's latest note if it is genuine and beyond `last` (another server
        signed it), else `last`."""
        if self.shared is None:
            return last
        latest = self.shared.latest()
        if latest is None or (last is not None and latest.size <= last.size):
            return last
        if not self._genuine(latest):
            log.error("ignoring a checkpoint row this ledger's key did not sign: %s", self.origin)
            return last
        return latest if self._ours(latest) else last

    def _ours(self, cp: SignedCheckpoint) -> bool:
        """Genuine, and of this log: only a root this server's tree has at that size counts (a
        note from a forked history would make every later signature fail); a note beyond the
        tree waits until the tree has caught up with it."""
        return self._genuine(cp) and self.consistent(cp.size, cp.root, cp.size, cp.root)

    def latest(self) -> SignedCheckpoint | None:
        """The last checkpoint signed by any server of the store (see `shared`)."""
        with self._lock:
            self.last = self._newer_shared(self.last)
            return self.last

    def sign(self, size: int, root: bytes) -> bytes:
        """Sign (size, root) if it is a consistent extension of the last signed checkpoint.

        The first checkpoint is checked against the empty tree (the callback confirms the root);
        re-signing the last checkpoint returns its note unchanged; a smaller size, a different
        root at the same size, or a failed consistency check raises InconsistentCheckpoint.
        Thread-safe; the note is durable (fsynced) before it is returned.
        """
        with self._lock:
            last = self.last = self._newer_shared(self.last)
            if last is None:
                if not self.consistent(0, EMPTY_ROOT, size, root):
                    raise InconsistentCheckpoint(f"root at size {size} is not the log's")
            else:
                if size < last.size:
                    raise InconsistentCheckpoint(
                        f"size {size} is below the signed size {last.size}"
                    )
                if size == last.size:
                    if root != last.root:
                        raise InconsistentCheckpoint(f"a different root was signed at size {size}")
                    return last.note
                if not self.consistent(last.size, last.root, size, root):
                    raise InconsistentCheckpoint(
                        f"size {size} is not a consistent extension of size {last.size}"
                    )
            note = sign_checkpoint(self.signer, size, root)
            self._persist(SignedCheckpoint(size, root, note))
            return note

    def _persist(self, cp: SignedCheckpoint) -> None:
        """The shared table (other servers), notes.log, then last.json; a crash in between is
        repaired by `_load`. A note is returned to nobody before all three are durable."""
        if self.shared is not None:
            self.shared.append(cp)
        note_b64 = base64.b64encode(cp.note).decode()
        with open(self._notes_path, "a") as f:
            f.write(f"{cp.size} {note_b64}\n")
            f.flush()
            os.fsync(f.fileno())
        record = {
            "origin": self.origin,
            "size": cp.size,
            "root": base64.b64encode(cp.root).decode(),
            "note": note_b64,
        }
        tmp = self._last_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._last_path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.last = cp

    def history(self) -> Iterator[SignedCheckpoint]:
        """Every checkpoint signed so far (by any server of the store), oldest first."""
        if self.shared is None:
            yield from self._file_history()
            return
        by_size = {cp.size: cp for cp in self._file_history()}
        for cp in self.shared.history():
            if cp.size not in by_size and self._ours(cp):
                by_size[cp.size] = cp
        for size in sorted(by_size):
            yield by_size[size]

    def _file_history(self) -> Iterator[SignedCheckpoint]:
        try:
            f = open(self._notes_path)  # noqa: SIM115
        except FileNotFoundError:
            return
        with f:
            for line in f:
                if not line.endswith("\n"):
                    # a crash or a full disk tore the last append: that note was never
                    # returned to anyone (last.json is written after it), so it never counted
                    log.warning("ignoring a torn last line in %s", self._notes_path)
                    return
                size_text, b64 = line.split()
                note = base64.b64decode(b64)
                _, size, root = parse_checkpoint_note(note)
                assert size == int(size_text)
                yield SignedCheckpoint(size, root, note)

    def at_size(self, size: int) -> SignedCheckpoint | None:
        for cp in self._file_history():
            if cp.size == size:
                return cp
        if self.shared is not None:
            found = self.shared.at_size(size)
            if found is not None and self._ours(found):
                return found
        return None


TLOG_PROOF_HEADER: Final = b"c2sp.org/tlog-proof@v1"


def tlog_proof(index: int, path: list[bytes], note: bytes, extra: bytes | None = None) -> bytes:
    """A c2sp.org/tlog-proof@v1 file: the record's index, its inclusion proof (leaf sibling
    first) and the signed checkpoint the proof leads to, verbatim."""
    lines = [TLOG_PROOF_HEADER]
    if extra is not None:
        lines.append(b"extra " + base64.b64encode(extra))
    lines.append(b"index %d" % index)
    lines.extend(base64.b64encode(h) for h in path)
    return b"\n".join(lines) + b"\n\n" + note
