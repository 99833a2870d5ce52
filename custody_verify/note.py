"""C2SP signed notes (Ed25519) and tlog-checkpoint bodies, verify side only.

A note is UTF-8 text ending in a newline, one blank line, then signature lines
`— <key name> <base64(4-byte key ID || signature)>`. The signed message is the text including its
final newline. Signatures from unknown (name, key ID) pairs are ignored; a signature from a known
key that fails rejects the whole note; at least one known key must verify.

A verifier key (vkey) is `<name>+<8 hex key ID>+<base64(0x01 || 32-byte Ed25519 public key)>`,
key ID = SHA-256(name || 0x0A || 0x01 || public key)[:4].
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import unicodedata
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SIG_ED25519 = 0x01
SIG_PREFIX = "— ".encode()  # U+2014 EM DASH, then a space
MAX_SIGNATURES = 100


class NoteError(ValueError):
    """The note is malformed, unsigned by any trusted key, or carries a bad trusted signature."""


class VkeyError(ValueError):
    """A verifier key string is malformed or inconsistent."""


def b64decode_strict(text: str | bytes) -> bytes:
    """Standard base64 with padding, canonical only (re-encoding gives back the same text)."""
    raw = text.encode("ascii") if isinstance(text, str) else bytes(text)
    try:
        data = binascii.a2b_base64(raw, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"bad base64: {exc}") from None
    if binascii.b2a_base64(data, newline=False) != raw:
        raise ValueError("non-canonical base64")
    return data


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def is_valid_name(name: str) -> bool:
    """Key names are non-empty, contain no Unicode whitespace and no '+'."""
    if not name or "+" in name:
        return False
    return not any(ch.isspace() or unicodedata.category(ch) == "Zs" for ch in name)


def key_id(name: str, pubkey: bytes, sig_type: int = SIG_ED25519) -> int:
    """SHA-256(name || 0x0A || type || public key)[:4] as a big-endian uint32."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + pubkey).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True)
class Verifier:
    name: str
    key_id: int
    public_key: bytes

    def verify(self, message: bytes, signature: bytes) -> bool:
        if len(signature) != 64:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return True

    @property
    def vkey(self) -> str:
        return f"{self.name}+{self.key_id:08x}+{b64encode(bytes([SIG_ED25519]) + self.public_key)}"


def parse_vkey(vkey: str) -> Verifier:
    """Parse `<name>+<hex id>+<base64 key>`; split on '+' at most twice (base64 may contain '+')."""
    vkey = vkey.strip()
    parts = vkey.split("+", 2)
    if len(parts) != 3:
        raise VkeyError("a vkey has the form <name>+<8 hex digits>+<base64 key>")
    name, hex_id, b64 = parts
    if not is_valid_name(name):
        raise VkeyError(f"invalid key name {name!r}")
    if len(hex_id) != 8 or any(ch not in "0123456789abcdef" for ch in hex_id):
        raise VkeyError("the key ID must be 8 lowercase hex digits")
    try:
        raw = b64decode_strict(b64)
    except ValueError as exc:
        raise VkeyError(f"key: {exc}") from None
    if len(raw) != 33 or raw[0] != SIG_ED25519:
        raise VkeyError("only Ed25519 keys (type 0x01, 32 bytes) are supported")
    pub = raw[1:]
    kid = key_id(name, pub)
    if kid != int(hex_id, 16):
        raise VkeyError(f"key ID {hex_id} does not match the key (expected {kid:08x})")
    return Verifier(name, kid, pub)


@dataclass(frozen=True)
class Signature:
    name: str
    key_id: int
    signature: bytes

    @property
    def key_id_hex(self) -> str:
        return f"{self.key_id:08x}"


@dataclass
class Note:
    text: bytes
    verified: list[Signature] = field(default_factory=list)
    unverified: list[Signature] = field(default_factory=list)


def _check_chars(msg: bytes) -> None:
    try:
        decoded = msg.decode("utf-8")
    except UnicodeDecodeError:
        raise NoteError("note is not valid UTF-8") from None
    for ch in decoded:
        if ch < " " and ch != "\n":
            raise NoteError("note contains a control character")


def split_note(msg: bytes) -> tuple[bytes, list[Signature]]:
    """Split a note into its signed text and its signature lines, checking the syntax only."""
    _check_chars(msg)
    split = msg.rfind(b"\n\n")
    if split < 0:
        raise NoteError("no blank line before the signatures")
    text, sigs = msg[: split + 1], msg[split + 2 :]
    if not sigs or not sigs.endswith(b"\n"):
        raise NoteError("signature block is empty or does not end in a newline")
    out: list[Signature] = []
    for line in sigs[:-1].split(b"\n"):
        if not line.startswith(SIG_PREFIX):
            raise NoteError("a line in the signature block is not a signature")
        body = line[len(SIG_PREFIX) :].decode("utf-8")
        name, sep, b64 = body.partition(" ")
        if not sep or not is_valid_name(name) or not b64:
            raise NoteError("malformed signature line")
        try:
            sig = b64decode_strict(b64)
        except ValueError:
            raise NoteError("signature is not valid base64") from None
        if len(sig) < 5:
            raise NoteError("signature too short")
        out.append(Signature(name, int.from_bytes(sig[:4], "big"), sig[4:]))
        if len(out) > MAX_SIGNATURES:
            raise NoteError("too many signatures")
    return text, out


def open_note(msg: bytes, verifiers: list[Verifier] | tuple[Verifier, ...]) -> Note:
    """Verify a signed note against trusted keys. Raises NoteError unless at least one verifies."""
    text, sigs = split_note(msg)
    known = {(v.name, v.key_id): v for v in verifiers}
    note = Note(text)
    seen: set[tuple[str, int]] = set()
    seen_unknown: set[tuple[str, int, bytes]] = set()
    for sig in sigs:
        ident = (sig.name, sig.key_id)
        verifier = known.get(ident)
        if verifier is None:
            if (sig.name, sig.key_id, sig.signature) not in seen_unknown:
                seen_unknown.add((sig.name, sig.key_id, sig.signature))
                note.unverified.append(sig)
            continue
        if ident in seen:
            continue
        seen.add(ident)
        if not verifier.verify(text, sig.signature):
            raise NoteError(f"signature by trusted key {sig.name}+{sig.key_id_hex} is invalid")
        note.verified.append(sig)
    if not note.verified:
        raise NoteError("no signature by a trusted key")
    return note


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()


def parse_checkpoint(text: bytes) -> Checkpoint:
    """Parse a tlog-checkpoint body: origin, decimal size, base64 root, optional extensions."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise NoteError("checkpoint is not valid UTF-8") from None
    if not decoded.endswith("\n"):
        raise NoteError("checkpoint body does not end in a newline")
    lines = decoded[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError("checkpoint body needs origin, size and root lines")
    origin, size_text, root_text, *ext = lines
    if not origin:
        raise NoteError("empty origin")
    if (
        not size_text.isascii()
        or not size_text.isdigit()
        or (len(size_text) > 1 and size_text[0] == "0")
    ):
        raise NoteError("tree size must be ASCII decimal without leading zeros")
    size = int(size_text)
    if size >= 2**64:
        raise NoteError("tree size out of range")
    try:
        root = b64decode_strict(root_text)
    except ValueError:
        raise NoteError("root is not valid base64") from None
    if len(root) != 32:
        raise NoteError("root is not 32 bytes")
    if any(not e for e in ext):
        raise NoteError("empty extension line")
    return Checkpoint(origin, size, root, tuple(ext))


def open_checkpoint(msg: bytes, verifiers: list[Verifier] | tuple[Verifier, ...]) -> Checkpoint:
    """Verify a signed checkpoint note and parse its body."""
    note = open_note(msg, verifiers)
    return parse_checkpoint(note.text)
