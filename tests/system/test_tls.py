"""DICOM TLS (BCP 195) on the SCP and the outbound SCU, against real peers.

A CA, the node's certificate, a trusted client certificate and an untrusted
one (from another CA) are generated with ``cryptography``.  dcmtk
``echoscu``/``storescu +tls`` talk to the node's TLS port; the node's SCU
sends to an Orthanc with ``DicomTlsEnabled``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pydicom import dcmread

from cad_node.config import (
    DestinationConfig,
    NodeConfig,
    PeerConfig,
    ScpTLSConfig,
    ScuTLSConfig,
    Settings,
    StudyConfig,
)
from cad_node.export.sender import OutboundObject, echo, send_objects
from cad_node.scp import NodeServer
from tests.conftest import ECHOSCU, STORESCU, free_port, require_program
from tests.system.conftest import OrthancServer


@dataclass(frozen=True)
class Pki:
    ca: Path
    node_cert: Path
    node_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    return path


def _cert(subject: str, key: rsa.RSAPrivateKey, issuer: x509.Certificate | None,
          issuer_key: rsa.RSAPrivateKey, *, ca: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("cad-node test CA", ca_key, None, ca_key, ca=True)
    rogue_ca = _cert("someone else's CA", rogue_ca_key, None, rogue_ca_key, ca=True)
    node_key, client_key, rogue_key = _key(), _key(), _key()
    return Pki(
        ca=_write_cert(ca, d / "ca.crt"),
        node_cert=_write_cert(_cert("cad-node", node_key, ca, ca_key), d / "node.crt"),
        node_key=_write_key(node_key, d / "node.key"),
        client_cert=_write_cert(_cert("modality", client_key, ca, ca_key), d / "client.crt"),
        client_key=_write_key(client_key, d / "client.key"),
        rogue_cert=_write_cert(_cert("rogue", rogue_key, rogue_ca, rogue_ca_key),
                               d / "rogue.crt"),
        rogue_key=_write_key(rogue_key, d / "rogue.key"),
    )


@pytest.fixture
def tls_node(tmp_path: Path, pki: Pki) -> Iterator[NodeServer]:
    settings = Settings(
        node=NodeConfig(
            host="127.0.0.1", port=free_port(), storage_dir=str(tmp_path / "node"),
            min_free_bytes=0,
            tls=ScpTLSConfig(port=free_port(), certificate=str(pki.node_cert),
                             private_key=str(pki.node_key), ca_bundle=str(pki.ca)),
        ),
        peers=[PeerConfig(ae_title="ECHOSCU", host="127.0.0.1"),
               PeerConfig(ae_title="STORESCU", host="127.0.0.1")],
        study=StudyConfig(series_quiet_s=30, study_quiet_s=60, force_complete_s=120),
    )
    node = NodeServer(settings)
    node.start()
    yield node
    node.stop()


def _tls_args(pki: Pki, cert: Path, key: Path) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(pki.ca)]


def _echo(port: int, tls: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_program(ECHOSCU), "-aet", "ECHOSCU", "-aec", "CADNODE",
                           *tls, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def test_echoscu_and_storescu_over_tls_land_the_real_ct(
    tls_node: NodeServer, pki: Pki, lidc_dir: Path
) -> None:
    tls = _tls_args(pki, pki.client_cert, pki.client_key)
    ok = _echo(tls_node.tls_port, tls)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    files = sorted(lidc_dir.glob("*.dcm"))
    proc = subprocess.run([require_program(STORESCU), "-aet", "STORESCU", "-aec", "CADNODE",
                           *tls, "127.0.0.1", str(tls_node.tls_port), *map(str, files)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert tls_node.spool is not None
    assert tls_node.spool.index.counts()["instance"] == len(files) == 133
    # the plain port keeps listening beside the TLS one
    assert _echo(tls_node.port, []).returncode == 0


@pytest.mark.parametrize("client", ["untrusted certificate", "no certificate"])
def test_client_without_a_trusted_certificate_is_refused(
    tls_node: NodeServer, pki: Pki, client: str
) -> None:
    tls = (_tls_args(pki, pki.rogue_cert, pki.rogue_key) if client == "untrusted certificate"
           else ["+tla", "+cf", str(pki.ca)])
    refused = _echo(tls_node.tls_port, tls)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    deadline = time.monotonic() + 2
    while tls_node.admission.in_use and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tls_node.admission.in_use == 0
    ok = _echo(tls_node.tls_port, _tls_args(pki, pki.client_cert, pki.client_key))
    assert ok.returncode == 0, ok.stdout + ok.stderr


class TlsOrthanc(OrthancServer):
    """Orthanc whose DICOM port speaks TLS only and requires our client certificate."""

    def __init__(self, workdir: Path, pki: Pki) -> None:
        super().__init__(workdir)
        config = json.loads(self.config_path.read_text())
        config.update({
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.node_cert),
            "DicomTlsPrivateKey": str(pki.node_key),
            "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
        })
        self.config_path.write_text(json.dumps(config))


def test_scu_delivers_to_orthanc_over_tls(
    tmp_path: Path, pki: Pki, lidc_dir: Path
) -> None:
    orthanc = TlsOrthanc(tmp_path / "orthanc", pki)
    orthanc.start()
    try:
        dest = DestinationConfig(
            name="pacs", ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.dicom_port,
            tls=ScuTLSConfig(ca_bundle=str(pki.ca), certificate=str(pki.client_cert),
                             private_key=str(pki.client_key)),
        )
        assert echo(dest, calling_ae="CADNODE").ok
        files = sorted(lidc_dir.glob("*.dcm"))[:3]
        report = send_objects(dest, [OutboundObject.from_file(f, "sc") for f in files],
                              calling_ae="CADNODE")
        assert len(report.stored) == 3, report
        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert len(orthanc.study_instances(study)) == 3
        # without TLS the same destination cannot be reached
        plain = dest.model_copy(update={"tls": None})
        assert not echo(plain, calling_ae="CADNODE").ok
    finally:
        orthanc.stop()
