"""Configuration keys of the network edge: admission limits, request timeout, TLS."""

from __future__ import annotations

from pathlib import Path

import pytest

from cad_node.config import ConfigError, load_config


def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    return load_config(cfg, environ={})


def test_defaults(tmp_path: Path) -> None:
    s = _load(tmp_path, "{}\n")
    assert s.node.max_associations_per_peer == 8
    assert s.node.association_request_timeout_s == 5.0
    assert s.node.pdu_deadline_s == 60.0
    assert s.node.tls is None


@pytest.mark.parametrize(("text", "key"), [
    ("node: {max_associations_per_peer: 0}", "node.max_associations_per_peer"),
    ("node: {association_request_timeout_s: 0}", "node.association_request_timeout_s"),
    ("node: {association_request_timeout_s: '5'}", "node.association_request_timeout_s"),
    ("node: {pdu_deadline_s: 0}", "node.pdu_deadline_s"),
    ("node: {pdu_deadline_s: -1.5}", "node.pdu_deadline_s"),
    ("node: {pdu_deadline_s: soon}", "node.pdu_deadline_s"),
    ("node: {tls: {certificate: /nonexistent.crt, private_key: /nonexistent.key,"
     " require_client_certificate: false}}", "node.tls.certificate"),
    ("destinations: [{name: p, ae_title: P, host: 127.0.0.1, port: 104,"
     " tls: {ca_bundle: /nonexistent.pem}}]", "destinations.0.tls.ca_bundle"),
])
def test_invalid_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _load(tmp_path, text + "\n")


def test_tls_client_certificate_needs_a_ca(tmp_path: Path) -> None:
    cert = tmp_path / "x.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match=r"node\.tls"):
        _load(tmp_path, f"node: {{tls: {{certificate: {cert}, private_key: {cert}}}}}\n")
    s = _load(tmp_path, f"node: {{tls: {{port: 2762, certificate: {cert}, private_key: {cert},"
                        f" ca_bundle: {cert}}}}}\n")
    assert s.node.tls is not None and s.node.tls.require_client_certificate
