"""TLS material for the ext_proc port: given files, or a self-signed certificate made at start-up."""

from __future__ import annotations

import datetime as dt
import ipaddress

from epp.config import TLSConfig


def self_signed(common_name: str = "epp") -> tuple[bytes, bytes]:
    """(key PEM, cert PEM): EC P-256, valid one year, SANs localhost and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def load_key_and_cert(tls: TLSConfig) -> tuple[bytes, bytes]:
    if tls.cert_file is not None and tls.key_file is not None:
        return tls.key_file.read_bytes(), tls.cert_file.read_bytes()
    return self_signed()
