"""TLS served by the server itself (``--ssl-certfile/--ssl-keyfile``, uvicorn's own): what a browser on
another host needs for the microphone. A self-signed certificate is made here for 127.0.0.1; the
client trusts exactly that certificate, so a wrong one or plain ws:// fails the test.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect

from audio_interaction_server.config import ConfigError, ServerConfig, load_config
from benchmarks.harness import LiveServer
from tests.test_deployment import healthcheck_argv

x509 = pytest.importorskip("cryptography.x509", reason="self-signed certificates are made with `cryptography`")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def write_self_signed(directory: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for 127.0.0.1 and localhost, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    return write_self_signed(tmp_path_factory.mktemp("tls"))


def test_server_started_with_a_certificate_serves_wss_and_https(tiny_checkpoint, certificate):
    """The server built as ``python -m audio_interaction_server --ssl-certfile ... --ssl-keyfile ...`` builds it (in
    this process: test_ssl_flags_reach_the_config covers the flags, and a spawn would pay the imports and the model
    load again)."""
    cert_path, key_path = certificate
    config = ServerConfig.model_validate(dict(port=0, log_level="warning", ssl_certfile=cert_path,
                                              ssl_keyfile=key_path,
                                              engine={"checkpoint": tiny_checkpoint, "device": "cpu"}))
    server = LiveServer(config).start()
    port = server.port
    trusted = ssl.create_default_context(cafile=str(cert_path))  # this certificate and nothing else
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/ready", timeout=5, context=trusted) as reply:
            assert reply.status == 200  # https: the same endpoints, over TLS
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/", timeout=5, context=trusted) as reply:
            assert "<html" in reply.read().decode()  # the page: over https, the microphone is allowed
        # The image's HEALTHCHECK (and Compose's) follows the AIS_SSL_* variables, as it follows AIS_PORT.
        health = subprocess.run([sys.executable, *healthcheck_argv()[1:]], capture_output=True, text=True, timeout=30,
                                env={"AIS_PORT": str(port), "AIS_SSL_CERTFILE": str(cert_path),
                                     "AIS_SSL_KEYFILE": str(key_path), "PATH": "/usr/bin:/bin"})
        assert health.returncode == 0, health.stderr

        with connect(f"wss://127.0.0.1:{port}/v1/stream", ssl=trusted, open_timeout=10) as websocket:
            created = json.loads(websocket.recv(timeout=10))
            assert created["type"] == "session.created"
            websocket.send(json.dumps({"type": "session.close"}))
            events = [json.loads(websocket.recv(timeout=10))]
            while events[-1]["type"] != "session.closed":
                events.append(json.loads(websocket.recv(timeout=10)))
            assert events[-1]["reason"] == "client_closed"

        # Plain ws:// to the TLS port gets no session.
        with pytest.raises(Exception):
            with connect(f"ws://127.0.0.1:{port}/v1/stream", open_timeout=5) as websocket:
                websocket.recv(timeout=5)
        # And a client that does not trust the certificate is refused by its own TLS check.
        with pytest.raises(ssl.SSLCertVerificationError):
            with connect(f"wss://127.0.0.1:{port}/v1/stream", ssl=ssl.create_default_context(), open_timeout=5):
                pass
    finally:
        server.stop()


def test_tls_settings_need_both_files_and_the_files_must_exist(certificate, tmp_path):
    cert_path, key_path = certificate
    config = load_config(None, {"AIS_SSL_CERTFILE": str(cert_path), "AIS_SSL_KEYFILE": str(key_path)})
    assert config.ssl_certfile == cert_path and config.ssl_keyfile == key_path
    assert load_config(None, {}).ssl_certfile is None  # plain http/ws by default
    with pytest.raises(ConfigError, match="ssl_keyfile"):
        load_config(None, {}, {"ssl_certfile": cert_path})
    with pytest.raises(ConfigError, match="ssl_certfile"):
        load_config(None, {}, {"ssl_keyfile": key_path})
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match="nope.pem"):
        load_config(None, {}, {"ssl_certfile": missing, "ssl_keyfile": key_path})


def test_files_that_do_not_make_a_certificate_and_its_key_are_configuration_errors(certificate, tmp_path):
    """A swapped pair, a key of another certificate, a file that is no PEM and an encrypted key (the server has
    no passphrase setting; ssl would ask for one on the terminal) were taken by the configuration and failed in
    uvicorn: a traceback and exit 1 (the model's status) after 'Uvicorn running on https://'. They are
    configuration errors now (exit 2, the files named)."""
    cert_path, key_path = certificate
    _, other_key = write_self_signed(tmp_path)
    not_pem = tmp_path / "hostname.txt"
    not_pem.write_text("example\n")
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    encrypted_key = tmp_path / "encrypted.pem"
    encrypted_key.write_bytes(load_pem_private_key(key_path.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    for certfile, keyfile in ((key_path, cert_path), (cert_path, other_key), (not_pem, not_pem),
                              (cert_path, encrypted_key)):
        with pytest.raises(ConfigError, match="ssl_certfile .* ssl_keyfile"):
            load_config(None, {}, {"ssl_certfile": certfile, "ssl_keyfile": keyfile})


def test_ssl_flags_reach_the_config():
    import argparse

    from audio_interaction_server.__main__ import add_serve_arguments, overrides_from

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"])
    assert overrides_from(args) == {"ssl_certfile": Path("c.pem"), "ssl_keyfile": Path("k.pem")}
    assert overrides_from(parser.parse_args([])) == {}


def test_a_tls_handshake_that_never_finishes_is_dropped_after_the_header_timeout(tiny_checkpoint, certificate):
    """A client that connects and never sends its TLS hello held its socket for asyncio's 60 s handshake timeout,
    out of reach of every limit of transport.py, which starts once TLS is up (probe, round five): the handshake now
    has ``transport.header_timeout_s``, as the request's head after it."""
    cert_path, key_path = certificate
    config = ServerConfig.model_validate(dict(port=0, log_level="warning", ssl_certfile=cert_path,
                                              ssl_keyfile=key_path, transport={"header_timeout_s": 1.0},
                                              engine={"checkpoint": tiny_checkpoint, "device": "cpu"}))
    server = LiveServer(config).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
            started_s = time.monotonic()
            try:
                dropped = silent.recv(1) == b""
            except ConnectionResetError:
                dropped = True
            except TimeoutError:
                dropped = False
            held_s = time.monotonic() - started_s
        assert dropped and held_s < 5, f"held {held_s:.1f} s"
        # A client that does speak TLS still gets through.
        trusted = ssl.create_default_context(cafile=str(cert_path))
        with urllib.request.urlopen(f"https://127.0.0.1:{server.port}/health", timeout=5, context=trusted) as reply:
            assert reply.status == 200
    finally:
        server.stop()
