"""SMTP as deployed: STARTTLS and implicit TLS with a certificate checked against a CA, AUTH only
over TLS; a row that never gets through ends failed, visible in the API and the log."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import RunningServer, start_server
from tests.test_appointments import _api_instant, booking_body
from tests.test_availability import make_provider, next_monday
from tests.test_notifications import (
    FROM_ADDRESS,
    Collector,
    client,
    free_port,
    fresh_address,
    imip_parts,
    messages_to,
    wait_for,
)

USER, PASSWORD = "mailer", "s3cret-pass"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key): a test CA that signed a certificate for
    127.0.0.1."""
    folder = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bookdav test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class Authenticator:
    def __init__(self) -> None:
        self.logins: list[tuple[bytes, bytes]] = []

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        if isinstance(data, LoginPassword):
            self.logins.append((data.login, data.password))
            ok = data.login == USER.encode() and data.password == PASSWORD.encode()
            return AuthResult(success=ok)
        return AuthResult(success=False)


def server_context(certificates: tuple[Path, Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certificates[1]), str(certificates[2]))
    return context


def mail_settings(port: int, tls: str, ca: Path | None, verify: bool = True) -> str:
    lines = [
        "smtp_host = 127.0.0.1",
        f"smtp_port = {port}",
        f"smtp_tls = {tls}",
        f"smtp_username = {USER}",
        f"smtp_password = {PASSWORD}",
        f"smtp_verify = {'true' if verify else 'false'}",
        f"from_address = {FROM_ADDRESS}",
    ]
    if ca is not None:
        lines.append(f"smtp_ca_file = {ca}")
    return "\n".join(lines)


def book_one(server: RunningServer, hour: int) -> tuple[str, str]:
    provider = make_provider(server)
    address = fresh_address()
    booked = requests.post(
        f"{server.base_url}/api/v1/appointments",
        json=booking_body(provider, _api_instant(next_monday(3), hour), client=client(address)),
    )
    assert booked.status_code == 201, booked.text
    return address, booked.json()["appointmentId"]


@pytest.fixture
def starttls_smtp(
    certificates: tuple[Path, Path, Path],
) -> Iterator[tuple[int, Collector, Authenticator]]:
    port, collector, authenticator = free_port(), Collector(), Authenticator()
    controller = Controller(
        collector,
        hostname="127.0.0.1",
        port=port,
        tls_context=server_context(certificates),
        require_starttls=True,
        authenticator=authenticator,
        auth_require_tls=True,
        auth_required=True,
    )
    controller.start()
    yield port, collector, authenticator
    controller.stop()


def test_starttls_with_auth_delivers_when_the_certificate_checks_out(
    tmp_path: Path,
    certificates: tuple[Path, Path, Path],
    starttls_smtp: tuple[int, Collector, Authenticator],
) -> None:
    port, collector, authenticator = starttls_smtp
    running = start_server(tmp_path, mail=mail_settings(port, "starttls", certificates[0]))
    try:
        address, _ = book_one(running, 10)
        [(envelope, message)] = wait_for(lambda: messages_to(collector, address), "the mail")
        imip_parts(message)
        assert envelope.mail_from == FROM_ADDRESS
        assert authenticator.logins[0] == (USER.encode(), PASSWORD.encode())
    finally:
        running.stop()


def test_an_untrusted_certificate_is_refused_unless_verification_is_off(
    tmp_path: Path,
    certificates: tuple[Path, Path, Path],
    starttls_smtp: tuple[int, Collector, Authenticator],
) -> None:
    port, collector, authenticator = starttls_smtp
    strict = start_server(tmp_path / "strict", mail=mail_settings(port, "starttls", None))
    try:
        address, _ = book_one(strict, 11)
        wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in strict.log_text(), "the refusal")
        assert messages_to(collector, address) == []
        assert authenticator.logins == []  # no password sent to an unverified server
    finally:
        strict.stop()
    lax = start_server(tmp_path / "lax", mail=mail_settings(port, "starttls", None, verify=False))
    try:
        address, _ = book_one(lax, 12)
        wait_for(lambda: messages_to(collector, address), "the mail without verification")
    finally:
        lax.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_implicit_tls_delivers(tmp_path: Path, certificates: tuple[Path, Path, Path]) -> None:
    port, collector, authenticator = free_port(), Collector(), Authenticator()
    controller = Controller(
        collector,
        hostname="127.0.0.1",
        port=port,
        ssl_context=server_context(certificates),
        authenticator=authenticator,
        auth_required=True,
        # aiosmtpd does not count implicit TLS as TLS for AUTH; the connection is TLS throughout.
        auth_require_tls=False,
    )
    controller.start()
    running = start_server(tmp_path, mail=mail_settings(port, "tls", certificates[0]))
    try:
        address, _ = book_one(running, 13)
        [(_, message)] = wait_for(lambda: messages_to(collector, address), "the mail over TLS")
        imip_parts(message)
        assert authenticator.logins
    finally:
        running.stop()
        controller.stop()


def test_a_row_that_never_gets_through_is_failed_with_its_error_in_the_api(
    tmp_path: Path,
) -> None:
    port = free_port()  # nobody listens, ever
    mail = mail_settings(port, "none", None) + "\nmax_attempts = 2"
    running = start_server(tmp_path, mail=mail)
    try:
        provider = make_provider(running)
        address = fresh_address()
        booked = requests.post(
            f"{running.base_url}/api/v1/appointments",
            json=booking_body(provider, _api_instant(next_monday(3), 14), client=client(address)),
        )
        assert booked.status_code == 201
        appointment_id = booked.json()["appointmentId"]
        url = f"{running.base_url}/api/v1/outbox"

        def failed() -> list[dict[str, Any]]:
            answer = requests.get(
                url,
                auth=provider.auth,
                params={"status": "failed", "appointmentId": appointment_id},
            )
            assert answer.status_code == 200, answer.text
            items: list[dict[str, Any]] = answer.json()["items"]
            return items

        rows = wait_for(lambda: len(failed()) == 2 and failed(), "two failed rows", timeout=30)
        assert {row["kind"] for row in rows} == {"client.imip", "provider.notice"}
        assert all(row["attempts"] == 2 and row["lastError"] for row in rows)
        assert all("Connect" in row["lastError"] or "refused" in row["lastError"] for row in rows)
        assert '"outbox row failed"' in running.log_text()
        other = make_provider(running)
        theirs = requests.get(url, auth=other.auth, params={"appointmentId": appointment_id})
        assert theirs.json()["items"] == []  # another provider's rows are not theirs to see
        bad = requests.get(url, auth=provider.auth, params={"status": "lost"})
        assert bad.status_code == 400
        assert requests.get(url).status_code == 401
    finally:
        running.stop()
