"""A throwaway certificate authority and one certificate it signs, for tests, benchmarks and trying TLS on a
laptop (needs the ``cryptography`` package: ``pip install -e '.[dev]'``). Not for production: use your PKI or
cert-manager (docs/DEPLOY.md).

    python -m lookalike.devcerts DIR     # DIR/ca.pem, DIR/node.pem, DIR/node.key (mode 600)

It sits in the base package, beside lookalike.security, because tests and benchmarks use it as well as people.
May use: lookalike.security (and the cryptography package, loaded only when certificates are written).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
import sys

from lookalike.security import TLSConfig

# The names the certificate holds: loopback for a laptop, and the name the router checks the shards' certificate
# for (serve --tls-server-name lookalike-internal; the k8s manifests use it).
NAMES = ("localhost", "lookalike-internal")
ADDRESSES = ("127.0.0.1", "::1")


def write_pki(directory, prefix: str = "", days: int = 30) -> TLSConfig:
    """Writes ``{prefix}ca.pem``, ``{prefix}node.pem`` and ``{prefix}node.key`` into ``directory``: a new CA and a
    certificate it signs for :data:`NAMES` and :data:`ADDRESSES`, usable by servers and clients (mutual TLS).
    Returns the TLSConfig of those files (cert, key, ca)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, key, issuer, issuer_key, ca: bool, sans=()):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                       ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert(f"{prefix}lookalike dev CA", ca_key, name(f"{prefix}lookalike dev CA"), ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [*(x509.DNSName(n) for n in NAMES), *(x509.IPAddress(ipaddress.ip_address(a)) for a in ADDRESSES)]
    node = cert(f"{prefix}lookalike node", key, ca.subject, ca_key, ca=False, sans=sans)
    pem = serialization.Encoding.PEM
    (d / f"{prefix}ca.pem").write_bytes(ca.public_bytes(pem))
    (d / f"{prefix}node.pem").write_bytes(node.public_bytes(pem))
    key_path = d / f"{prefix}node.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return TLSConfig(str(d / f"{prefix}node.pem"), str(key_path), str(d / f"{prefix}ca.pem"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        sys.exit(2)
    tls = write_pki(sys.argv[1])
    print(f"lookalike serve --tls-cert {tls.cert} --tls-key {tls.key} --tls-ca {tls.ca}")
