"""Development PKI for mutual TLS: a CA, a server certificate, one client certificate per role.

Layout of the output folder (private keys are created with mode 0600):

    ca.pem  ca.key                      the development CA (keep ca.key away from servers)
    server.pem  server.key              the server (SAN: the given host names / addresses)
    <role>-<name>.pem  <role>-<name>.key  clients; the identity is the SAN URI
                                        custody://<role>/<name> (also subject OU=<role>,
                                        CN=<name>); for platforms <name> is the platform id

Production certificates come from the custodian's own CA; the server only needs `ca.pem`,
`server.pem` and `server.key` in its TLS folder, and each client certificate must carry
exactly one `custody://` SAN URI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ledger.api.auth import Role, make_identity, san_uri

CA_CERT: Final = "ca.pem"
CA_KEY: Final = "ca.key"
SERVER_CERT: Final = "server.pem"
SERVER_KEY: Final = "server.key"
DEFAULT_HOSTS: Final = ("localhost", "127.0.0.1", "::1")
DEFAULT_DAYS: Final = 825


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def _load_ca(out_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((out_dir / CA_CERT).read_bytes())
    key = serialization.load_pem_private_key((out_dir / CA_KEY).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def create_ca(
    out_dir: Path, common_name: str = "Custody Ledger Dev CA", days: int = 3650
) -> Issued:
    out_dir.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Custody Ledger (development)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(out_dir / CA_KEY, key)
    _write_cert(out_dir / CA_CERT, cert)
    return Issued(out_dir / CA_CERT, out_dir / CA_KEY)


def _issue(
    out_dir: Path,
    stem: str,
    subject: x509.Name,
    san: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
) -> Issued:
    ca_cert, ca_key = _load_ca(out_dir)
    key = _new_key()
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = Issued(out_dir / f"{stem}.pem", out_dir / f"{stem}.key")
    _write_key(paths.key, key)
    _write_cert(paths.cert, cert)
    return paths


def issue_server(
    out_dir: Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = DEFAULT_DAYS
) -> Issued:
    san: list[x509.GeneralName] = []
    for host in hosts:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            san.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    issued = _issue(out_dir, "server", subject, san, ExtendedKeyUsageOID.SERVER_AUTH, days)
    assert issued.cert.name == SERVER_CERT
    return issued


def client_stem(role: str, name: str) -> str:
    return f"{role}-{name}"


def issue_client(out_dir: Path, role: str, name: str, days: int = DEFAULT_DAYS) -> Issued:
    identity = make_identity(role, name)  # refuses unknown roles and malformed names
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role.value),
            x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
        ]
    )
    san: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(san_uri(identity.role.value, identity.name))
    ]
    return _issue(
        out_dir,
        client_stem(identity.role.value, identity.name),
        subject,
        san,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        days,
    )


def create_dev_pki(
    out_dir: Path,
    platforms: Sequence[str] = ("demo",),
    hosts: Sequence[str] = DEFAULT_HOSTS,
    staff_name: str = "dev",
) -> dict[str, Issued]:
    """The CA (kept if the folder has one), the server certificate (kept if present) and one
    client per staff role plus one per platform id (re-issued)."""
    out_dir = Path(out_dir)
    if (out_dir / CA_CERT).exists() and (out_dir / CA_KEY).exists():
        ca = Issued(out_dir / CA_CERT, out_dir / CA_KEY)
    else:
        ca = create_ca(out_dir)
    if (out_dir / SERVER_CERT).exists() and (out_dir / SERVER_KEY).exists():
        server = Issued(out_dir / SERVER_CERT, out_dir / SERVER_KEY)
    else:
        server = issue_server(out_dir, hosts)
    issued = {"ca": ca, "server": server}
    for platform_id in platforms:
        issued[client_stem("platform", platform_id)] = issue_client(
            out_dir, "platform", platform_id
        )
    for role in Role:
        if role is not Role.PLATFORM:
            issued[client_stem(role.value, staff_name)] = issue_client(out_dir, role, staff_name)
    return issued


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="custody certs",
        description="Create a development CA and mTLS certificates (an existing CA in the "
        "folder is reused, so more platforms can be added later).",
    )
    parser.add_argument("--out", default="custody-data/tls", help="output folder")
    parser.add_argument(
        "--platform", action="append", default=[], help="platform id (repeatable; default demo)"
    )
    parser.add_argument(
        "--host", action="append", default=[], help="server host name or address (repeatable)"
    )
    parser.add_argument("--name", default="dev", help="name in the staff role certificates")
    args = parser.parse_args(argv)
    out = Path(args.out)
    issued = create_dev_pki(
        out, args.platform or ["demo"], args.host or list(DEFAULT_HOSTS), args.name
    )
    for label, paths in issued.items():
        print(f"{label:24} {paths.cert}  {paths.key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
