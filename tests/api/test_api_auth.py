"""Authentication and roles: mTLS identities, platform isolation, read-only roles, dev mode."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from api_helpers import CCY, World
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ledger.api import auth, certs
from ledger.api.client import CustodyClient, CustodyError
from ledger.api.pb import SERVICE_MODULES, SERVICE_NAMES, account_pb
from ledger.api.server import InsecureBindRefused, ServeError, build_server, running_server, serve
from ledger.api.servicers import all_services
from ledger.config import Config
from ledger.service import LedgerService

SC = grpc.StatusCode


def test_platform_cannot_touch_another_platform(world: World) -> None:
    p2 = world.p2
    calls = [
        lambda: p2.get_account("alice", platform_id="p1"),
        lambda: p2.get_balance("alice", platform_id="p1"),
        lambda: p2.list_accounts(platform_id="p1"),
        lambda: p2.transfer("t", "alice", "bob", 1, CCY, platform_id="p1"),
        lambda: p2.open_account(
            "o", "x", kind="customer", currency=CCY, role="other", platform_id="p1"
        ),
        lambda: list(p2.subscribe_log(platform_id="p1")),
        lambda: p2.submit_batch([], platform_id="p1"),
    ]
    for call in calls:
        with pytest.raises(CustodyError) as err:
            call()
        assert err.value.code is SC.PERMISSION_DENIED
        assert err.value.reason == "PLATFORM_MISMATCH"
    # Its own view never contains p1's accounts.
    with pytest.raises(CustodyError) as err:
        p2.get_account("alice")
    assert err.value.code is SC.NOT_FOUND
    assert p2.list_accounts().items == []
    assert world.p1.get_balance("alice").posted_minor == 10_000


def test_platform_may_name_itself(world: World) -> None:
    assert world.p1.get_balance("alice", platform_id="p1").posted_minor == 10_000


@pytest.mark.parametrize("role", ["auditor", "regulator", "checker"])
def test_read_only_roles_cannot_write(world: World, role: str) -> None:
    client: CustodyClient = getattr(world, role)
    for call in (
        lambda: client.transfer("t", "alice", "bob", 1, CCY, platform_id="p1"),
        lambda: client.open_account(
            "o", "x", kind="customer", currency=CCY, role="other", platform_id="p1"
        ),
        lambda: client.submit_batch([], platform_id="p1"),
        lambda: client.expire_holds("e", platform_id="p1"),
        lambda: client.create_platform("p9", "nine"),
    ):
        with pytest.raises(CustodyError) as err:
            call()
        assert err.value.code is SC.PERMISSION_DENIED
        assert err.value.reason == "READ_ONLY_ROLE"
    assert world.p1.get_balance("bob").posted_minor == 0


def test_only_operators_create_platforms(world: World) -> None:
    with pytest.raises(CustodyError) as err:
        world.p1.create_platform("p9", "nine")
    assert err.value.code is SC.PERMISSION_DENIED


def test_staff_roles_must_name_the_platform(world: World) -> None:
    with pytest.raises(CustodyError) as err:
        world.auditor.get_account("alice")
    assert err.value.code is SC.INVALID_ARGUMENT
    assert "platform_id" in err.value.fields


def test_client_without_certificate_is_refused(world: World, pki: Path) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{world.server.port}", credentials)
    client = CustodyClient(channel, platform_id="p1", retries=0)
    with pytest.raises(CustodyError) as err:
        client.get_balance("alice")
    assert err.value.code is SC.UNAVAILABLE  # the TLS handshake fails: no call is made
    client.close()


def test_certificate_from_another_ca_is_refused(world: World, tmp_path: Path, pki: Path) -> None:
    certs.create_ca(tmp_path)
    other = certs.issue_client(tmp_path, "platform", "p1")
    client = CustodyClient.mtls(
        f"127.0.0.1:{world.server.port}", pki / "ca.pem", other.cert, other.key, retries=0
    )
    with pytest.raises(CustodyError) as err:
        client.get_balance("alice")
    assert err.value.code is SC.UNAVAILABLE
    client.close()


def _odd_client(pki: Path, out: Path, uris: list[str]) -> certs.Issued:
    """A certificate from our CA with the given SAN URIs (none, two, malformed)."""
    for name in ("ca.pem", "ca.key"):
        (out / name).write_bytes((pki / name).read_bytes())
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    san.append(x509.DNSName("client.example"))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")])
    return certs._issue(out, "odd", subject, san, ExtendedKeyUsageOID.CLIENT_AUTH, 1)


@pytest.mark.parametrize(
    "uris",
    [
        [],
        ["custody://platform/p1", "custody://operator/x"],
        ["custody://wizard/x"],
        ["custody://platform/P_1"],
        ["custody://platform"],
    ],
    ids=["none", "two", "unknown-role", "bad-platform", "no-name"],
)
def test_certificate_without_one_valid_identity_is_unauthenticated(
    world: World, pki: Path, tmp_path: Path, uris: list[str]
) -> None:
    odd = _odd_client(pki, tmp_path, uris)
    client = CustodyClient.mtls(
        f"127.0.0.1:{world.server.port}", pki / "ca.pem", odd.cert, odd.key, retries=0
    )
    with pytest.raises(CustodyError) as err:
        client.get_balance("alice", platform_id="p1")
    assert err.value.code is SC.UNAUTHENTICATED
    client.close()


def test_calls_without_deadline_are_refused(world: World) -> None:
    with pytest.raises(grpc.RpcError) as err:
        world.p1.accounts.GetAccount(
            account_pb.GetAccountRequest(account_id="alice"), metadata=world.p1.metadata
        )
    assert err.value.code() is SC.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "deadline" in err.value.details()  # type: ignore[attr-defined]


def test_every_method_has_an_access_rule() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in SERVICE_MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods == set(auth.METHOD_ACCESS)
    # every service in the protos is registered, answered by health and reflection, and
    # listed for access: computed from the generated modules, not a constant to keep in step
    declared = {
        service.full_name
        for module in SERVICE_MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    assert set(SERVICE_NAMES) == declared
    assert len(SERVICE_NAMES) == len(declared)  # no service listed twice
    served = {f"custody.v1.{name}" for _, name, _ in all_services()}
    assert served == declared
    assert {m.split("/")[1] for m in auth.METHOD_ACCESS} == declared


# -- insecure development mode ----------------------------------------------------------------


@pytest.fixture
def dev_service(tmp_path: Path) -> LedgerService:
    service = LedgerService(Config.from_env({"CUSTODY_DATA_DIR": str(tmp_path / "d")}))
    service.start()
    yield service  # type: ignore[misc]
    service.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.com", "192.168.0.1"])
def test_insecure_mode_refused_off_loopback(
    dev_service: LedgerService, host: str, tmp_path: Path
) -> None:
    with pytest.raises(InsecureBindRefused):
        build_server(dev_service, host=host, port=0, insecure_dev=True)
    data = tmp_path / "never"
    with pytest.raises(InsecureBindRefused):
        serve(Config.from_env({"CUSTODY_DATA_DIR": str(data)}), host, 0, insecure_dev=True)
    assert not data.exists()  # refused before touching any data


def test_production_mode_needs_tls(dev_service: LedgerService, tmp_path: Path) -> None:
    with pytest.raises(ServeError):
        build_server(dev_service, host="127.0.0.1", port=0)
    with pytest.raises(ServeError):
        build_server(dev_service, host="127.0.0.1", port=0, tls_dir=tmp_path / "empty")


def test_insecure_mode_on_loopback_uses_headers(dev_service: LedgerService) -> None:
    with running_server(dev_service, host="127.0.0.1", port=0, insecure_dev=True) as srv:
        target = f"127.0.0.1:{srv.port}"
        with CustodyClient.insecure_dev(target, "operator", "alice", retries=0) as op:
            op.create_platform("p1", "one")
        with CustodyClient.insecure_dev(target, "platform", "p1", retries=0) as p1:
            p1.open_account("o", "omni", kind="omnibus", currency=CCY)
            assert p1.get_account("omni").platform_id == "p1"
            with pytest.raises(CustodyError) as err:
                p1.get_account("omni", platform_id="p2")
            assert err.value.code is SC.PERMISSION_DENIED
        nobody = CustodyClient(grpc.insecure_channel(target), platform_id="p1", retries=0)
        with pytest.raises(CustodyError) as err:
            nobody.get_account("omni")
        assert err.value.code is SC.UNAUTHENTICATED
        nobody.close()
        with CustodyClient.insecure_dev(target, "platform", "P 1", retries=0) as bad:
            with pytest.raises(CustodyError) as err:
                bad.get_account("omni")
            assert err.value.code is SC.UNAUTHENTICATED
        # mTLS folder and insecure mode are mutually exclusive
        with pytest.raises(ServeError):
            build_server(dev_service, port=0, insecure_dev=True, tls_dir=Path("x"))


def test_identity_headers_are_ignored_under_mtls(world: World, pki: Path) -> None:
    spoofing = CustodyClient.mtls(
        f"127.0.0.1:{world.server.port}",
        pki / "ca.pem",
        pki / "platform-p2.pem",
        pki / "platform-p2.key",
        metadata=[("x-custody-role", "operator"), ("x-custody-platform", "p1")],
        retries=0,
    )
    with pytest.raises(CustodyError) as err:
        spoofing.create_platform("p9", "nine")
    assert err.value.code is SC.PERMISSION_DENIED
    with pytest.raises(CustodyError) as err:
        spoofing.get_account("alice", platform_id="p1")
    assert err.value.reason == "PLATFORM_MISMATCH"
    spoofing.close()
