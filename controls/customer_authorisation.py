"""Customer authorisation (C04, 依令行事): the platform cannot move a customer's money on its
own word. Every debit of a customer account that a platform relays carries the customer's
Ed25519 signature over the instruction's authorisation payload, bound to amount, currency,
payee, nonce and expiry; or names a standing authorisation (auto-bid, auto-repay) the customer
signed, used within its cap and validity. Registering a new key, binding a payout account and
granting a standing authorisation are signed the same way by the customer's current key.

Too many bad signatures in a window lock the account's authorisations for a while; the writer
records each bad signature (`auth_failed` on the refusal record) so the lock is in the log.
"""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict
from typing import Any, Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from controls.base import Control, LedgerView, Policy, Proposal, Refusal
from controls.codes import Code
from controls.policy import SIGNED_OPS

NAME = "customer_authorisation"
PAYLOAD_PREFIX: Final = b"custody-authorisation/v1\n"
# Operations a customer signs even without a debit: they change who may move the money.
KEY_SIGNED_OPS: Final = frozenset({"register_key", "bind_payee", "grant_standing"})
_ENCODER: Final = msgspec.json.Encoder(order="sorted")


def payload(platform_id: str, cmd_builtins: dict[str, Any]) -> bytes:
    """The bytes a customer signs: the platform, then the instruction's canonical JSON without
    its client id and signature (the platform picks client ids; the nonce makes it unique)."""
    body = {k: v for k, v in cmd_builtins.items() if k != "client_id"}
    auth = body.get("auth")
    if isinstance(auth, dict):
        body["auth"] = {k: v for k, v in auth.items() if k != "signature"}
    return PAYLOAD_PREFIX + platform_id.encode() + b"\n" + _ENCODER.encode(body)


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_VERIFIED_MAX: Final = 65_536
_verified: OrderedDict[tuple[str, bytes, str], bool] = OrderedDict()


def signature_valid(public_key_b64: str, message: bytes, signature_b64: str) -> bool:
    """Ed25519 verification, memoised: a retried or re-decided instruction costs one lookup."""
    key = (public_key_b64, message, signature_b64)
    known = _verified.get(key)
    if known is not None:
        return known
    try:
        Ed25519PublicKey.from_public_bytes(b64url_decode(public_key_b64)).verify(
            b64url_decode(signature_b64), message
        )
        valid = True
    except (InvalidSignature, ValueError, binascii.Error):
        valid = False
    _verified[key] = valid
    if len(_verified) > _VERIFIED_MAX:
        _verified.popitem(last=False)
    return valid


def _refuse(code: Code, message: str) -> Refusal:
    return Refusal(code, NAME, message)


BAD_SIGNATURE: Final = Refusal(
    Code.AUTHORISATION_INVALID, NAME, "the customer's signature does not verify"
)


def signer_account(proposal: Proposal) -> str | None:
    """The customer account whose key must have signed this proposal, if any."""
    if proposal.op in KEY_SIGNED_OPS:
        return str(proposal.cmd.account_id)
    if proposal.op in SIGNED_OPS:
        return proposal.debit_account()
    return None


def check(state: LedgerView, proposal: Proposal, policy: Policy) -> Refusal | None:
    if proposal.executing or proposal.role != "platform" or not policy.require_customer_signature:
        return None
    account_id = signer_account(proposal)
    account = state.accounts.get(account_id or "")
    if account is None or account.kind != "customer":
        return None  # not a customer debit; integrity reports unknown accounts
    if proposal.op == "register_key" and not account.public_key:
        return _first_key_refusal(account)
    if _locked(state, account.id, proposal.ts, policy):
        return _refuse(Code.AUTHORISATION_LOCKED, f"authorisations for {account.id!r} are locked")
    auth = proposal.cmd.auth
    if auth is None:
        return _refuse(Code.AUTHORISATION_REQUIRED, f"a debit of {account.id!r} needs its consent")
    if auth.standing_id:
        return _standing_refusal(state, proposal, account.id, auth.standing_id)
    return _signature_refusal(state, proposal, policy, account, auth)


def _first_key_refusal(account: Any) -> Refusal | None:
    """The first key comes from the platform at onboarding (trust on first use), but only
    while the account has never held money: otherwise a platform could give a funded,
    keyless account its own key and sign for it. Later, a first key needs `reset_key`
    (an operator and a checker)."""
    if account.credits_posted_minor == 0 and account.credits_pending_minor == 0:
        return None
    return _refuse(
        Code.AUTHORISATION_REQUIRED,
        f"account {account.id!r} has held money: its first key needs reset_key (maker-checker)",
    )


def _locked(state: LedgerView, account_id: str, now_ms: int, policy: Policy) -> bool:
    """Locked for `auth_lock_ms` after the failure that made `auth_max_failures` bad
    signatures within `auth_failure_window_ms`."""
    if account_id not in state.auth_failures:
        return False  # the common case: no bad signature on record
    failures = state.recent_failures(account_id, now_ms - policy.auth_lock_ms)
    if len(failures) < policy.auth_max_failures:
        return False
    last = failures[-1]
    in_window = [t for t in failures if t > last - policy.auth_failure_window_ms]
    return len(in_window) >= policy.auth_max_failures and now_ms < last + policy.auth_lock_ms


def _signature_refusal(
    state: LedgerView, proposal: Proposal, policy: Policy, account: Any, auth: Any
) -> Refusal | None:
    if not account.public_key:
        return _refuse(Code.KEY_NOT_REGISTERED, f"account {account.id!r} has no customer key")
    if auth.expires_at_ms < proposal.ts:
        return _refuse(Code.AUTHORISATION_EXPIRED, "the customer's authorisation has expired")
    if auth.expires_at_ms > proposal.ts + policy.auth_ttl_ms:
        return _refuse(Code.AUTHORISATION_INVALID, "the authorisation's expiry is too far ahead")
    if state.nonces.get((account.id, auth.nonce), -1) >= proposal.ts:
        return _refuse(Code.REPLAYED, "this authorisation nonce was already used")
    assert proposal.auth_payload is not None, "the writer computes the signed payload"
    if not signature_valid(account.public_key, proposal.auth_payload, auth.signature):
        return BAD_SIGNATURE
    return None


def _standing_refusal(
    state: LedgerView, proposal: Proposal, account_id: str, standing_id: str
) -> Refusal | None:
    standing = state.standing.get(standing_id)
    cmd = proposal.cmd
    if standing is None or standing.account != account_id or standing.revoked:
        return _refuse(Code.STANDING_NOT_FOUND, f"no standing authorisation {standing_id!r}")
    if proposal.op != "transfer" and proposal.op != "place_hold":
        return _refuse(Code.AUTHORISATION_INVALID, "standing authorisations cover transfers")
    if standing.valid_until < proposal.ts:
        return _refuse(Code.AUTHORISATION_EXPIRED, "the standing authorisation has expired")
    purpose = getattr(cmd, "purpose", "bid")
    payee = cmd.to_account_id
    if purpose != standing.purpose or (standing.payee and standing.payee != payee):
        return _refuse(Code.AUTHORISATION_INVALID, "outside the standing authorisation's terms")
    if cmd.amount_minor > standing.per_txn_max_minor:
        return _refuse(Code.AUTHORISATION_INVALID, "above the standing authorisation's cap")
    return None


def is_signature_failure(refusal: Refusal) -> bool:
    """Refusals that count towards the lock: a signature that does not verify, nothing else
    (a standing authorisation used outside its terms is the platform's fault, not a guess)."""
    return refusal is BAD_SIGNATURE


CONTROL = Control(name=NAME, priority=40, ops=None, check=check)
