"""A throwaway certificate authority and the keys the control plane needs.

All keys are ECDSA P-256: they take milliseconds to generate, and
kube-apiserver accepts them for serving, client certificates and signing
ServiceAccount tokens (ES256).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Long enough for a development environment left running for weeks; the
# files are regenerated at every start.
VALIDITY = datetime.timedelta(days=365)
# Backdated so that a client with a slightly slow clock accepts them.
CLOCK_SKEW = datetime.timedelta(hours=1)

# Names under which pods and clients reach the API server.
SERVING_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class KeyPair:
    """PEM files of a certificate and its private key."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class ControlPlanePki:
    """Every certificate and key file the control plane uses."""

    ca: KeyPair
    serving: KeyPair
    admin: KeyPair
    controller_manager: KeyPair
    service_account_private_key: Path
    service_account_public_key: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
    )


class CertificateAuthority:
    """A self-signed CA that issues serving and client certificates."""

    def __init__(self, common_name: str) -> None:
        self.key = _new_key()
        self.name = _name(common_name)
        self.cert = (
            _builder(self.name, self.name, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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
            .sign(self.key, hashes.SHA256())
        )

    def write(self, folder: Path, stem: str) -> KeyPair:
        pair = KeyPair(folder / f"{stem}.crt", folder / f"{stem}.key")
        _write_cert(self.cert, pair.cert_file)
        _write_key(self.key, pair.key_file)
        return pair

    def issue(
        self,
        folder: Path,
        stem: str,
        *,
        common_name: str,
        organizations: tuple[str, ...] = (),
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
        server: bool = False,
    ) -> KeyPair:
        """Issue a client certificate, or a serving one when `server` is set."""
        key = _new_key()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            _builder(_name(common_name, organizations), self.name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        alternative_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        alternative_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        if alternative_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(alternative_names), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        pair = KeyPair(folder / f"{stem}.crt", folder / f"{stem}.key")
        _write_cert(cert, pair.cert_file)
        _write_key(key, pair.key_file)
        return pair


def generate_control_plane_pki(folder: Path, service_ip: str) -> ControlPlanePki:
    """Write a fresh CA, the API server's serving certificate, client certificates
    and the ServiceAccount signing key pair into `folder`.

    `service_ip` is the cluster IP of the `kubernetes` Service, which in-cluster
    clients dial.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority("openchecker-testenv-ca")
    service_account_key = _new_key()
    private_key_file = folder / "service-account.key"
    public_key_file = folder / "service-account.pub"
    _write_key(service_account_key, private_key_file)
    public_key_file.write_bytes(
        service_account_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return ControlPlanePki(
        ca=ca.write(folder, "ca"),
        serving=ca.issue(
            folder,
            "kube-apiserver",
            common_name="kube-apiserver",
            dns_names=SERVING_DNS_NAMES,
            ip_addresses=("127.0.0.1", service_ip),
            server=True,
        ),
        # Members of system:masters pass every RBAC check.
        admin=ca.issue(folder, "admin", common_name="admin", organizations=("system:masters",)),
        # The user name that the built-in system:kube-controller-manager
        # ClusterRoleBinding grants.
        controller_manager=ca.issue(
            folder, "kube-controller-manager", common_name="system:kube-controller-manager"
        ),
        service_account_private_key=private_key_file,
        service_account_public_key=public_key_file,
    )
