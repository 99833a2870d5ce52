"""Personal data at rest: AES-256-GCM with one data key per customer account.

Records carry only ciphertext (`{"kid": ..., "ct": base64(nonce || ciphertext+tag)}`) so the
chain covers the ciphertext. Data keys are wrapped with the master key and kept outside the
log, in `custody_pii_keys`; destroying a customer's key erases the person without touching a
single record or chain link. Associated data binds each ciphertext to its platform and account.
"""

from __future__ import annotations

import base64
import hmac
import os
import unicodedata
from hashlib import sha256
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ledger.config import Config

KEY_LEN: Final = 32
NONCE_LEN: Final = 12
_TABLE: Final = "custody_pii_keys"


class PiiError(RuntimeError):
    """A key is missing, destroyed, or a ciphertext does not authenticate."""


def load_master_key(config: Config) -> bytes:
    """The master key from CUSTODY_MASTER_KEY, else a 0600 key file in the data folder."""
    if config.master_key_b64:
        key = base64.b64decode(config.master_key_b64, validate=True)
        if len(key) != KEY_LEN:
            raise PiiError("CUSTODY_MASTER_KEY must be base64 of 32 bytes")
        return key
    path = Path(config.data_dir) / "master.key"
    if path.exists():
        key = base64.b64decode(path.read_bytes().strip(), validate=True)
        assert len(key) == KEY_LEN
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = AESGCM.generate_key(bit_length=256)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64encode(key) + b"\n")
    return key


class PiiVault:
    def __init__(self, datastore: Any, is_postgres: bool, master_key: bytes) -> None:
        assert len(master_key) == KEY_LEN
        self._datastore = datastore
        self._ph = "%s" if is_postgres else "?"
        self._blob = "BYTEA" if is_postgres else "BLOB"
        self._master = AESGCM(master_key)
        # One ledger-wide key for screening tokens, so a blocklist entry matches any account.
        self._screen_key = hmac.new(master_key, b"custody-screening/v1", sha256).digest()
        schema = getattr(datastore, "schema", "") if is_postgres else ""
        self._table = f'"{schema}".{_TABLE}' if schema else _TABLE
        self._cache: dict[tuple[str, str], tuple[AESGCM, bytes]] = {}
        with datastore.transaction(commit=True) as cur:
            if is_postgres:  # concurrent CREATE ... IF NOT EXISTS can collide in pg_type
                cur.execute("SELECT pg_advisory_xact_lock(hashtext('custody-pii-ddl'))")
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {self._table} (platform TEXT NOT NULL, "
                f"subject TEXT NOT NULL, wrapped {self._blob}, "
                "PRIMARY KEY (platform, subject))"
            )

    def _aad(self, platform_id: str, subject: str) -> bytes:
        return f"custody-pii/v1\n{platform_id}\n{subject}".encode()

    def _key(self, platform_id: str, subject: str, create: bool) -> AESGCM:
        return self._keys(platform_id, subject, create)[0]

    def _keys(self, platform_id: str, subject: str, create: bool) -> tuple[AESGCM, bytes]:
        """The subject's AEAD and its blinding key, both derived from its one data key."""
        cached = self._cache.get((platform_id, subject))
        if cached is not None:
            return cached
        ph = self._ph
        with self._datastore.transaction(commit=True) as cur:
            cur.execute(
                f"SELECT wrapped FROM {self._table} WHERE platform={ph} AND subject={ph}",
                (platform_id, subject),
            )
            row = cur.fetchone()
            wrapped = None if row is None else (row["wrapped"] if isinstance(row, dict) else row[0])
            if row is not None and wrapped is None:
                raise PiiError("the data key was destroyed")
            if wrapped is None:
                if not create:
                    raise PiiError("no data key")
                data_key = AESGCM.generate_key(bit_length=256)
                nonce = os.urandom(NONCE_LEN)
                wrapped = nonce + self._master.encrypt(
                    nonce, data_key, self._aad(platform_id, subject)
                )
                insert = f"INSERT INTO {self._table} (platform, subject, wrapped)"
                cur.execute(f"{insert} VALUES ({ph},{ph},{ph})", (platform_id, subject, wrapped))
        wrapped = bytes(wrapped)
        data_key = self._master.decrypt(
            wrapped[:NONCE_LEN], wrapped[NONCE_LEN:], self._aad(platform_id, subject)
        )
        keys = (AESGCM(data_key), hmac.new(data_key, b"custody-pii-blind/v1", sha256).digest())
        self._cache[(platform_id, subject)] = keys
        return keys

    def seal(self, platform_id: str, subject: str, plaintext: str) -> dict[str, str]:
        aead = self._key(platform_id, subject, create=True)
        nonce = os.urandom(NONCE_LEN)
        ct = aead.encrypt(nonce, plaintext.encode(), self._aad(platform_id, subject))
        return {"kid": subject, "ct": base64.b64encode(nonce + ct).decode()}

    def open(self, platform_id: str, sealed: dict[str, str]) -> str:
        subject = sealed["kid"]
        aead = self._key(platform_id, subject, create=False)
        blob = base64.b64decode(sealed["ct"])
        try:
            plain = aead.decrypt(
                blob[:NONCE_LEN], blob[NONCE_LEN:], self._aad(platform_id, subject)
            )
        except Exception as exc:  # InvalidTag: never echo key material or ciphertext
            raise PiiError("ciphertext does not authenticate") from exc
        return plain.decode()

    def blind(self, platform_id: str, subject: str, value: str) -> str:
        """Deterministic stand-in for a personal value inside the recorded instruction.

        Keyed by the subject's own data key: identical retries compare equal, nobody without
        that key can test guesses, and destroying the key erases the blind with the ciphertext.
        """
        blind_key = self._keys(platform_id, subject, create=True)[1]
        digest = hmac.new(blind_key, value.encode(), sha256).hexdigest()
        return "blind:" + digest[:32]

    def screening_token(self, value: str) -> str:
        """Keyed hash of a normalised name or bank account, for blocklists (C14).

        Ledger-wide rather than per subject so that one list entry matches every account of a
        blocked party; the key never leaves the vault, so the list reveals nobody.
        """
        normal = " ".join(unicodedata.normalize("NFKC", value).casefold().split())
        digest = hmac.new(self._screen_key, normal.encode(), sha256).hexdigest()
        return "scr:" + digest[:32]

    def destroy(self, platform_id: str, subject: str) -> None:
        """Crypto-shred: the wrapped key is replaced by NULL; every ciphertext becomes noise."""
        self._cache.pop((platform_id, subject), None)
        ph = self._ph
        with self._datastore.transaction(commit=True) as cur:
            cur.execute(
                f"UPDATE {self._table} SET wrapped=NULL WHERE platform={ph} AND subject={ph}",
                (platform_id, subject),
            )
