"""A self-signed certificate for ``--https``: browsers give WebGPU and WebCrypto only to secure
pages, so a phone on the LAN can lend its GPU only over HTTPS. The certificate is made once per
machine and kept (``~/.cache/peerpipe/tls``), so a browser that accepted it keeps accepting it."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from pathlib import Path

from peerpipe.paths import cache_dir


def _names(extra: list[str]) -> list[str]:
    names = ["localhost", "127.0.0.1", socket.gethostname(), *extra]
    return [n for n in dict.fromkeys(names) if n and n not in ("0.0.0.0", "::")]


def self_signed(extra_names: list[str], folder: Path | None = None) -> ssl.SSLContext:
    """A server context with this machine's certificate, made now if there is none for these names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = folder or cache_dir() / "tls"
    names = _names(extra_names)
    tag = "-".join(sorted(names)).replace(":", "_").replace("/", "_")[:120]
    cert_file, key_file = folder / f"{tag}.crt", folder / f"{tag}.key"
    if not (cert_file.is_file() and key_file.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"peerpipe on {socket.gethostname()}")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=825)).add_extension(x509.SubjectAlternativeName(alt), False)
            .sign(key, hashes.SHA256())
        )
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_file.chmod(0o600)
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context
