"""DICOM TLS contexts: the BCP 195 profile of PS3.15 B.9 for the SCP and the SCU.

PS3.15 Annex B.9 ("BCP 195 RFC-Compliant TLS Profile") requires TLS 1.2 or
later and, for TLS 1.2, the cipher suites recommended by BCP 195 (RFC 9325
4.2; formerly RFC 7525 4.2): AES-GCM with ephemeral (EC)DH key exchange.
TLS 1.3 suites are OpenSSL's defaults, all of them AEAD.  Certificates are
always verified against the configured CA bundle.
"""

from __future__ import annotations

import ssl

from cad_node.config import ScpTLSConfig, ScuTLSConfig

__all__ = ["BCP195_CIPHERS", "client_context", "server_context"]

#: TLS 1.2 cipher suites of BCP 195 (RFC 9325 4.2), OpenSSL names.
BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",  # TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    "ECDHE-RSA-AES128-GCM-SHA256",  # TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    "ECDHE-ECDSA-AES256-GCM-SHA384",  # TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
    "ECDHE-RSA-AES256-GCM-SHA384",  # TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
    "DHE-RSA-AES128-GCM-SHA256",  # TLS_DHE_RSA_WITH_AES_128_GCM_SHA256
    "DHE-RSA-AES256-GCM-SHA384",  # TLS_DHE_RSA_WITH_AES_256_GCM_SHA384
))


def _bcp195(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(config: ScpTLSConfig) -> ssl.SSLContext:
    """The SCP's TLS context (BCP 195).

    Parameters
    ----------
    config : ScpTLSConfig
        ``node.tls``: the node's certificate and key; with
        ``require_client_certificate`` a client must present a certificate
        that chains to ``ca_bundle`` (``CERT_REQUIRED``), else one is
        verified when offered (``CERT_OPTIONAL``).

    Raises
    ------
    ssl.SSLError, OSError
        Unreadable or mismatched certificate / key / CA files.
    """
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(config.certificate, config.private_key)
    if config.ca_bundle is not None:
        context.load_verify_locations(cafile=config.ca_bundle)
        context.verify_mode = (
            ssl.CERT_REQUIRED if config.require_client_certificate else ssl.CERT_OPTIONAL
        )
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(config: ScuTLSConfig) -> ssl.SSLContext:
    """The SCU's TLS context towards one destination (BCP 195).

    The destination's certificate must chain to ``ca_bundle`` (and name the
    destination's host when ``check_hostname``); a client certificate is
    presented when configured.

    Raises
    ------
    ssl.SSLError, OSError
        Unreadable or mismatched certificate / key / CA files.
    """
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.load_verify_locations(cafile=config.ca_bundle)
    context.check_hostname = config.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if config.certificate is not None and config.private_key is not None:
        context.load_cert_chain(config.certificate, config.private_key)
    return context
