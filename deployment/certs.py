"""TLS certificates for the SuperLink and authentication keys for the SuperNodes.

    python -m deployment.certs --out deployment/secrets --domains garden,kitchen,outdoor \
        [--hosts 127.0.0.1,localhost,superlink] [--days 365] [--force]

Writes into OUT:
  ca.crt / ca.key             a private certificate authority (EC P-384, self-signed)
  server.pem / server.key     the SuperLink's TLS certificate, signed by the CA; subject alternative names
                              from --hosts (IP addresses become IP SANs, everything else DNS SANs)
  <domain>.key / <domain>.pub one SuperNode authentication key pair per domain: EC P-384 (NIST curve, what
                              `flwr supernode register` and `flower-supernode --auth-supernode-private-key`
                              accept), private key in OpenSSH format, public key as one OpenSSH line

--keys-only writes only <domain>.key / <domain>.pub (on a silo's own host, so that its private key never
leaves it; `ssh-keygen -t ecdsa -b 384 -N "" -f <domain>.key` makes the same format). Private keys are chmod 600. Running it again keeps every file that exists (so adding a domain only creates
that domain's key pair; a kept private key that group or others could read is chmod 600 with a warning); --force regenerates everything (rotation: re-register the new node keys and
restart SuperLink and SuperNodes, see docs/deployment.md). A server certificate whose names differ from
--hosts, or one the CA did not sign, is an error without --force.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.core.files import atomic_write

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "superlink")
CURVE = ec.SECP384R1
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CertError(RuntimeError):
    """Existing material is inconsistent with what was asked for (fix with --force)."""


@dataclass
class Material:
    """Paths of everything `make_certs` manages, and which of them it (re)wrote this time."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, tuple[Path, Path]]  # domain -> (private, public)
    written: list[Path] = field(default_factory=list)
    fixed: list[Path] = field(default_factory=list)  # kept private keys that others could read: now chmod 600


def paths(out: Path, domains: list[str]) -> Material:
    out = Path(out)
    return Material(out=out, ca_cert=out / "ca.crt", ca_key=out / "ca.key", server_cert=out / "server.pem",
                    server_key=out / "server.key",
                    node_keys={d: (out / f"{d}.key", out / f"{d}.pub") for d in domains})


def parse_hosts(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def _write(path: Path, data: bytes, private: bool) -> None:
    atomic_write(path, data, mode=0o600 if private else 0o644)  # the temporary file is owner-only throughout


def _owner_only(path: Path, m: Material) -> None:
    """A kept private key readable by group or others is made owner-only (chmod 600), with a warning."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        m.fixed.append(path)
        print(f"warning: private key {path} had mode {mode:o} (readable by others): changed to 600; if others "
              "may have read it, regenerate with --force", file=sys.stderr)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _make_ca(days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MergeRec federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "MergeRec federation CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384()))
    return cert, key


def _make_server(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str],
                 days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MergeRec federation"),
                         x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_agreement=True,
                                         key_cert_sign=False, crl_sign=False, content_commitment=False,
                                         data_encipherment=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(parse_hosts(hosts)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    return cert, key


def server_sans(cert: x509.Certificate) -> set[str]:
    """The certificate's subject alternative names as strings (IPs and DNS names together)."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))


def signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_ssh_private_key(Path(path).read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: not an EC private key")
    return key


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    key = serialization.load_ssh_public_key(Path(path).read_bytes())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertError(f"{path}: not an EC public key")
    return key


def _node_pair(domain: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(CURVE())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return priv, pub + f" mergerec-{domain}\n".encode()


def make_certs(out: Path, domains: list[str], hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS,
               force: bool = False, days: int = 365, keys_only: bool = False) -> Material:
    """Create (or keep) the CA, the SuperLink certificate and one node key pair per domain in `out`.
    keys_only: only the node key pairs (on a silo's own host: its private key never leaves it)."""
    hosts = [h.strip() for h in hosts if h.strip()]
    domains = [d.strip() for d in domains if d.strip()]
    if not hosts:
        raise ValueError("at least one host name or IP is needed for the server certificate")
    for d in domains:
        if not _DOMAIN_RE.match(d):
            raise ValueError(f"domain name {d!r}: use letters, digits, '.', '_' or '-'")
    if len(set(domains)) != len(domains):
        raise ValueError(f"duplicate domain in {domains}")
    m = paths(out, domains)
    m.out.mkdir(parents=True, exist_ok=True)
    os.chmod(m.out, 0o700)
    if keys_only:
        _node_keys(m, force)
        return m

    # CA
    if force or not (m.ca_cert.exists() and m.ca_key.exists()):
        ca_cert, ca_key = _make_ca(days=max(days, 3650))
        _write(m.ca_key, _pem_key(ca_key), private=True)
        _write(m.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        m.written += [m.ca_key, m.ca_cert]
        new_ca = True
    else:
        _owner_only(m.ca_key, m)
        ca_cert = x509.load_pem_x509_certificate(m.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(m.ca_key.read_bytes(), None)
        if ca_cert.public_key().public_numbers() != ca_key.public_key().public_numbers():
            raise CertError(f"{m.ca_key} does not belong to {m.ca_cert} (regenerate with --force)")
        new_ca = False

    # SuperLink server certificate
    have_server = m.server_cert.exists() and m.server_key.exists()
    if have_server and not force and not new_ca:
        _owner_only(m.server_key, m)
        cert = x509.load_pem_x509_certificate(m.server_cert.read_bytes())
        if not signed_by(cert, ca_cert):
            raise CertError(f"{m.server_cert} is not signed by {m.ca_cert} (regenerate with --force)")
        if server_sans(cert) != set(hosts):
            raise CertError(f"{m.server_cert} names {sorted(server_sans(cert))}, asked for {sorted(set(hosts))} "
                            "(regenerate with --force)")
    elif have_server and not force and new_ca:
        raise CertError(f"{m.ca_cert} was missing and has been recreated, so {m.server_cert} no longer verifies: "
                        "regenerate everything with --force")
    else:
        cert, key = _make_server(ca_cert, ca_key, hosts, days)
        _write(m.server_key, _pem_key(key), private=True)
        _write(m.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
        m.written += [m.server_key, m.server_cert]

    _node_keys(m, force)
    return m


def _node_keys(m: Material, force: bool) -> None:
    """Node authentication key pairs (independent of the CA)."""
    for domain, (priv_path, pub_path) in m.node_keys.items():
        if force or not (priv_path.exists() and pub_path.exists()):
            priv, pub = _node_pair(domain)
            _write(priv_path, priv, private=True)
            _write(pub_path, pub, private=False)
            m.written += [priv_path, pub_path]
        else:
            _owner_only(priv_path, m)
            pk = load_node_private_key(priv_path)
            if pk.public_key().public_numbers() != load_node_public_key(pub_path).public_numbers():
                raise CertError(f"{priv_path} and {pub_path} are not one key pair (regenerate with --force)")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None, prog: str = "python -m deployment.certs") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the certificates and keys")
    p.add_argument("--domains", type=_csv, required=True, help="comma list: one node key pair per domain")
    p.add_argument("--hosts", type=_csv, default=list(DEFAULT_HOSTS),
                   help="comma list of the SuperLink's names/IPs (server certificate SANs); "
                        f"default {','.join(DEFAULT_HOSTS)}")
    p.add_argument("--days", type=int, default=365, help="server certificate validity (CA: at least 10 years)")
    p.add_argument("--force", action="store_true", help="regenerate everything (rotation)")
    p.add_argument("--keys-only", action="store_true",
                   help="only the node key pairs (run on a silo's host; send only <domain>.pub to the operator)")
    a = p.parse_args(argv)
    try:
        m = make_certs(a.out, a.domains, a.hosts, force=a.force, days=a.days, keys_only=a.keys_only)
    except (CertError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    managed = set() if a.keys_only else {m.ca_cert, m.ca_key, m.server_cert, m.server_key}
    kept = sorted((managed | {p for pair in m.node_keys.values() for p in pair}) - set(m.written))
    for path in m.written:
        print(f"wrote {path}")
    for path in kept:
        print(f"kept  {path}" + ("  (mode fixed to 600)" if path in m.fixed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
