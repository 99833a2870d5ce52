"""Structured logs: JSON lines with request ids, and nothing secret or personal in them.

The leak test runs a real server and client end to end (a signed transfer, a refused one, an
account opened with a holder name, a payee bound with a bank account number) with every
logger at DEBUG, then scans everything logged for the holder names, the bank account number,
the customers' signatures and private keys, the master key and the checkpoint signing key."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from obs_helpers import CCY, served

from ledger import logs
from ledger.api.client import CustodyError, customer_public_key, sign_instruction
from ledger.api.pb import platform_pb

HOLDERS = ("Zhang Xiuying", "Ouyang Mingyue")
BANK_ACCOUNT = "6222020200112233445"
MASTER_KEY = bytes(range(1, 33))
GENERATED = r"[0-9a-f]{8}(?:-[0-9a-f]{8}){3}"  # a request id the server made


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure_logging(True, level=logging.DEBUG, stream=out)
    try:
        yield out
    finally:
        logs.unconfigure_logging()  # writes out what is queued


def lines_of(out: io.StringIO) -> list[dict[str, object]]:
    logs.unconfigure_logging()
    parsed = []
    for line in out.getvalue().splitlines():
        record = json.loads(line)  # every line is one JSON object
        assert isinstance(record, dict)
        assert {"ts", "level", "logger", "message"} <= set(record), record
        parsed.append(record)
    return parsed


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _forms(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).rstrip(b"=").decode(),
    ]


def test_end_to_end_logs_carry_no_secret_or_personal_data(
    captured: io.StringIO, tmp_path: Path
) -> None:
    env = {
        "CUSTODY_STORE": "sqlite",
        "CUSTODY_DATA_DIR": str(tmp_path),
        "CUSTODY_MASTER_KEY": base64.b64encode(MASTER_KEY).decode(),
    }
    keys = {"alice": Ed25519PrivateKey.generate(), "bob": Ed25519PrivateKey.generate()}
    signatures: list[str] = []
    with served(env) as s:
        operator = s.client("operator", "dev")
        operator.create_platform("p1", "Strict platform")  # the strict default policy
        p1 = s.client("platform", "p1")
        for cid, account, kind in [
            ("o-omni", "omni", "omnibus"),
            ("o-pbank", "pbank", "platform_bank"),
            ("o-own", "own", "own_funds"),
            ("o-fee", "fee", "fee_income"),
            ("o-susp", "susp", "suspense"),
        ]:
            p1.open_account(cid, account, kind=kind, currency=CCY)
        for (name, key), holder in zip(keys.items(), HOLDERS, strict=True):
            p1.open_account(
                f"o-{name}",
                name,
                kind="customer",
                currency=CCY,
                role="lender",
                holder_name=holder,
                public_key=customer_public_key(key),
            )
        p1.deposit("d-1", "omni", "alice", 100_000, CCY, bank_ref="seed")

        original = sign_instruction

        def spy(platform_id: str, message: object, key: Ed25519PrivateKey, **kw: object) -> object:
            signed = original(platform_id, message, key, **kw)  # type: ignore[arg-type]
            signatures.append(signed.authorisation.signature)  # type: ignore[attr-defined]
            return signed

        import ledger.api.client as client_module

        client_module.sign_instruction = spy  # type: ignore[assignment]
        try:
            ok = p1.transfer(
                "t-1", "alice", "bob", 1_000, CCY, sign_with=keys["alice"], platform_id="p1"
            )
            assert ok.status == "accepted"
            with pytest.raises(CustodyError) as err:  # unsigned: refused
                p1.transfer("t-2", "alice", "bob", 1_000, CCY)
            assert err.value.reason == "AUTHORISATION_REQUIRED"
            with pytest.raises(CustodyError) as err:  # signed by the wrong customer: refused
                p1.transfer(
                    "t-3", "alice", "bob", 1_000, CCY, sign_with=keys["bob"], platform_id="p1"
                )
            assert err.value.reason == "AUTHORISATION_INVALID"
            bound = p1.bind_payee(
                "bp-1",
                "alice",
                "main",
                BANK_ACCOUNT,
                HOLDERS[0],
                sign_with=keys["alice"],
                platform_id="p1",
            )
            assert bound.kind == "payee_bound"
        finally:
            client_module.sign_instruction = original
        assert len(signatures) == 3
        checkpoint_key = (tmp_path / "keys" / "checkpoint.key").read_text()
        s.service.sign_checkpoint("p1")
        logging.getLogger("ledger.test").info("workload done")
    records = lines_of(captured)
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in records)

    # the log did record the calls, each with its request id
    access = [r for r in records if r["logger"] == "ledger.api.access"]
    assert len(access) >= 13
    ours = [r for r in access if r.get("platform") == "p1"]
    assert len(ours) >= 13
    bad = [r for r in ours if not re.fullmatch(GENERATED, str(r.get("request_id")))]
    assert not bad, json.dumps(bad)
    assert len({r["request_id"] for r in ours}) == len(ours)
    assert {r["status"] for r in access} >= {"OK", "PERMISSION_DENIED"}
    assert any(r.get("reason") == "AUTHORISATION_INVALID" for r in access)

    forbidden = [*HOLDERS, BANK_ACCOUNT, *signatures, *_forms(MASTER_KEY)]
    for key in keys.values():
        forbidden += _forms(_raw(key))
    body = "".join(
        line for line in checkpoint_key.splitlines() if line and not line.startswith("-----")
    )
    forbidden += [body, body[:40]]
    for secret in forbidden:
        assert secret not in text, f"logged: {secret[:12]}..."
    for name in HOLDERS:
        for part in name.split():
            assert part not in text


def test_request_id_round_trip(captured: io.StringIO, tmp_path: Path) -> None:
    env = {"CUSTODY_STORE": "sqlite", "CUSTODY_DATA_DIR": str(tmp_path)}
    with served(env) as s:
        operator = s.client("operator", "dev")
        stub = operator.platforms

        def call(pid: str, *extra: tuple[str, str]) -> tuple[str, grpc.StatusCode]:
            request = platform_pb.CreatePlatformRequest(platform_id=pid, name="P")
            metadata = (*operator.metadata, *extra)
            try:
                _, answer = stub.CreatePlatform.with_call(request, timeout=10, metadata=metadata)
                trailing, code = answer.trailing_metadata(), grpc.StatusCode.OK
            except grpc.RpcError as exc:
                trailing, code = exc.trailing_metadata(), exc.code()  # type: ignore[attr-defined]
            [rid] = [v for k, v in trailing or () if k == "x-request-id"]
            return rid, code

        assert call("p1", ("x-request-id", "order-4711.retry:2")) == (
            "order-4711.retry:2",
            grpc.StatusCode.OK,
        )
        # an error answer carries it too (aborting replaces the trailing metadata)
        assert call("BAD ID", ("x-request-id", "order-4712-abc")) == (
            "order-4712-abc",
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        generated = []
        for bad in ("short", "has space-12345", "x" * 65, "card-6222020200112233"):
            rid, _ = call("p2", ("x-request-id", bad))
            assert rid != bad and re.fullmatch(GENERATED, rid)
            generated.append(rid)
        rid, _ = call("p3")  # none given
        generated.append(rid)
        rid, _ = call("p4", ("x-request-id", "first-id-1"), ("x-request-id", "second-id-2"))
        assert rid not in ("first-id-1", "second-id-2")
        generated.append(rid)
        assert len(set(generated)) == len(generated)
    records = lines_of(captured)
    by_id = {r.get("request_id"): r for r in records if r["logger"] == "ledger.api.access"}
    assert by_id["order-4711.retry:2"]["status"] == "OK"
    assert by_id["order-4711.retry:2"]["method"] == "PlatformService/CreatePlatform"
    assert by_id["order-4711.retry:2"]["role"] == "operator"
    assert by_id["order-4712-abc"]["status"] == "INVALID_ARGUMENT"
    assert by_id["order-4712-abc"]["reason"] == "INVALID_ARGUMENT"
    assert isinstance(by_id["order-4712-abc"]["duration_ms"], float)
    missing = [rid for rid in generated if rid not in by_id]
    assert not missing, (
        missing,
        json.dumps([r for r in records if r["logger"] == "ledger.api.access"]),
    )


def test_scrub_masks_key_signature_and_account_material() -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    signature = base64.urlsafe_b64encode(key.sign(b"x")).rstrip(b"=").decode()
    text = f"key {pem} sig {signature} acct {BANK_ACCOUNT} hash {'ab' * 32} at 1700000000000"
    cleaned = logs.scrub(text)
    assert "PRIVATE KEY" not in cleaned and signature not in cleaned
    assert BANK_ACCOUNT not in cleaned and "ab" * 32 not in cleaned
    assert "1700000000000" in cleaned  # a time in ms is not an account number
    assert len(logs.scrub("y " * 10_000)) < logs.MESSAGE_MAX + 20


def test_json_lines_keep_only_their_fields() -> None:
    out = io.StringIO()
    logs.configure_logging(True, stream=out)
    try:
        log = logging.getLogger("ledger.test")
        log.info(
            "opened %s", "acc-1", extra={"holder_name": HOLDERS[0], "status": "OK", "role": "x"}
        )
        try:
            raise ValueError(f"bank account {BANK_ACCOUNT}")
        except ValueError:
            log.exception("failed")
    finally:
        logs.unconfigure_logging()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "opened acc-1" and first["status"] == "OK"
    assert "holder_name" not in first and HOLDERS[0] not in out.getvalue()
    assert second["level"] == "ERROR" and "ValueError" in second["exc"]
    assert BANK_ACCOUNT not in out.getvalue()


def test_text_format_and_format_choice() -> None:
    out = io.StringIO()
    logs.configure_logging(False, stream=out)
    try:
        call, token = logs.begin_call("Svc/M", [("x-request-id", "req-abcdef12")])
        logging.getLogger("ledger.test").warning("slow")
        logs.end_call(token)
    finally:
        logs.unconfigure_logging()
    line = out.getvalue().strip()
    assert line.endswith("WARNING ledger.test [req-abcdef12] slow method=Svc/M"), line
    assert call.request_id == "req-abcdef12"

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logs.json_wanted("auto", Tty()) is False
    assert logs.json_wanted("auto", io.StringIO()) is True
    assert logs.json_wanted("json", Tty()) is True
    assert logs.json_wanted("text", io.StringIO()) is False
