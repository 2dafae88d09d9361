"""Typed configuration of a cad-node installation.

One YAML file (default ``config/cad-node.yaml``) is loaded into the pydantic
models below.  Environment variables named ``CAD_NODE_<SECTION>__<KEY>``
(``__`` separates nesting levels, e.g. ``CAD_NODE_NODE__PORT=11113`` or
``CAD_NODE_JOBS__RETRY__HORIZON_S=600``) override keys; their values are parsed
as YAML scalars/flow collections, so ``11113`` is an int and ``[sr, seg]`` a list.

Validation is strict: a value of the wrong type is an error, never silently
coerced (``port: "11112"`` fails).  :func:`load_config` raises
:class:`ConfigError` whose message names every offending key, before any port
is bound.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "BUILTIN_RULES",
    "CHEST_XR_RULE_NAME",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_OBJECT_KINDS",
    "ENV_PREFIX",
    "OUTPUT_PROFILES",
    "AuditConfig",
    "ConfigError",
    "DestinationConfig",
    "JobsConfig",
    "ModelsConfig",
    "NodeConfig",
    "ObjectKind",
    "PeerConfig",
    "ResultsConfig",
    "RetentionConfig",
    "RetryConfig",
    "RoutingConfig",
    "RoutingRule",
    "ScpTLSConfig",
    "ScuTLSConfig",
    "SeriesMatch",
    "Settings",
    "StudyConfig",
    "WebConfig",
    "WebToken",
    "chest_xr_rule",
    "load_config",
    "parse_object_kinds",
    "resolve_paths",
    "validate_ae_title",
]

#: Default configuration file shipped with the node (repository layout).
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "cad-node.yaml"
#: Prefix of environment overrides: ``CAD_NODE_<SECTION>__<KEY>``.
ENV_PREFIX = "CAD_NODE_"

class ObjectKind(enum.StrEnum):
    """Kind of result object the node emits (one module each under ``cad_node.results``).

    The one definition of object kinds.  Configuration spells them in lower
    case (``objects: [sr, seg, sc]``); strings become members once, when the
    configuration is validated (or, for CLI options, where the option is
    parsed).  A :class:`enum.StrEnum`, so ``str(kind)`` is the YAML spelling
    (file names ``<kind>_<nnn>.dcm``, manifests, logs).
    """

    #: Comprehensive 3D SR, TID 1500 Measurement Report (PS3.16).
    SR = "sr"
    #: Segmentation IOD (PS3.3 A.51).
    SEG = "seg"
    #: Secondary Capture: key images and the summary page (PS3.3 A.8).
    SC = "sc"
    #: Grayscale Softcopy Presentation State (PS3.3 A.33.1).
    GSPS = "gsps"
    #: Key Object Selection Document (PS3.3 A.35.4).
    KOS = "kos"
    #: Parametric Map (PS3.3 A.75): the chest X-ray attribution heatmap.
    PM = "pm"


#: Output profile of a destination that names none: SR + SEG + SC.
DEFAULT_OBJECT_KINDS: tuple[ObjectKind, ...] = (ObjectKind.SR, ObjectKind.SEG, ObjectKind.SC)


#: Named output profiles for ``destinations[].objects``: what each viewer
#: family shows (tested and described in docs/viewers.md).
OUTPUT_PROFILES: dict[str, tuple[ObjectKind, ...]] = {
    #: OHIF 3: SR measurements (panel), SEG overlays, SC key images + summary
    #: page; it flags GSPS and KOS as unsupported.
    "ohif": (ObjectKind.SR, ObjectKind.SEG, ObjectKind.SC),
    #: Image-only PACS viewers: burned-in key images/summary and GSPS outlines.
    "legacy-pacs": (ObjectKind.SC, ObjectKind.GSPS),
    #: Everything (vendor neutral archives, Weasis, 3D Slicer).
    "archive": tuple(ObjectKind),
}


def parse_object_kinds(text: str) -> list[ObjectKind]:
    """Object kinds from a comma-separated CLI option such as ``"sr,seg,sc"``.

    Raises
    ------
    ValueError
        An unknown or repeated kind, or none at all; the message lists the known ones.
    """
    names = [k.strip() for k in text.split(",") if k.strip()]
    known = ", ".join(str(k) for k in ObjectKind)
    bad = [k for k in names if k not in ObjectKind.__members__.values()]
    if bad or not names:
        raise ValueError(f"unknown kind(s) {bad}; choose from {known}")
    if len(set(names)) != len(names):
        raise ValueError("object kinds must not repeat")
    return [ObjectKind(k) for k in names]

_AE_MAX_LEN = 16  # PS3.5 6.2, VR AE: at most 16 characters
_AE_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")


class ConfigError(ValueError):
    """Invalid configuration; the message names each offending key and why."""


def validate_ae_title(value: str) -> str:
    """Validate an Application Entity title (PS3.5 6.2, VR AE).

    Parameters
    ----------
    value : str
        Candidate AE title.

    Returns
    -------
    str
        The AE title with surrounding spaces removed.

    Raises
    ------
    ValueError
        Empty, longer than 16 characters, or containing a backslash or a
        control character.
    """
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("AE title must not be empty or all spaces")
    if len(value) > _AE_MAX_LEN:
        raise ValueError(f"AE title {value!r} is longer than {_AE_MAX_LEN} characters")
    if _AE_FORBIDDEN.search(value):
        raise ValueError(f"AE title {value!r} contains a backslash or control character")
    return stripped


def _validate_host(value: str) -> str:
    if not value or len(value) > 253:
        raise ValueError("host must be a non-empty IP address or hostname")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9\-.]*[A-Za-z0-9])?", value):
            raise ValueError(f"host {value!r} is neither an IP address nor a hostname") from None
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _readable_file(value: str) -> str:
    if not Path(value).is_file():
        raise ValueError(f"file {value!r} does not exist")
    return value


class ScpTLSConfig(_Strict):
    """The SCP's DICOM TLS listener (BCP 195 profile: TLS 1.2+, its cipher list)."""

    #: TLS port; the plain ``node.port`` keeps listening beside it.
    port: int = Field(2762, ge=1, le=65535)
    #: PEM certificate chain of the node.
    certificate: str
    #: PEM private key of ``certificate``.
    private_key: str
    #: PEM CA bundle that client certificates must chain to.
    ca_bundle: str | None = None
    #: Refuse a client without a certificate trusted by ``ca_bundle``.
    require_client_certificate: bool = True

    @field_validator("certificate", "private_key", "ca_bundle")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        return None if v is None else _readable_file(v)

    @model_validator(mode="after")
    def _ca_needed(self) -> ScpTLSConfig:
        if self.require_client_certificate and self.ca_bundle is None:
            raise ValueError("ca_bundle is required when require_client_certificate is true")
        return self


class ScuTLSConfig(_Strict):
    """DICOM TLS towards a destination (BCP 195 profile)."""

    #: PEM CA bundle the destination's certificate must chain to.
    ca_bundle: str
    #: PEM client certificate chain, when the destination requires one.
    certificate: str | None = None
    #: PEM private key of ``certificate``.
    private_key: str | None = None
    #: Check that the destination's certificate names ``host``.
    check_hostname: bool = True

    @field_validator("certificate", "private_key", "ca_bundle")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        return None if v is None else _readable_file(v)

    @model_validator(mode="after")
    def _pair(self) -> ScuTLSConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self


class NodeConfig(_Strict):
    """The receiving node: its AE, socket, spool and admission limits."""

    ae_title: str = "CADNODE"
    #: Address the SCP binds to.
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    #: Spool, index, job table and embedded broker live below this directory.
    storage_dir: str = "./var"
    #: Accept any calling AE / source address (demos only; default refuses unknown peers).
    accept_any: bool = False
    #: Largest number of simultaneous associations (all peers together).
    max_associations: int = Field(16, ge=1, le=1024)
    #: Largest number of simultaneous associations from one source address.
    max_associations_per_peer: int = Field(8, ge=1, le=1024)
    #: A connection that has not sent a complete A-ASSOCIATE-RQ (and finished
    #: its TLS handshake) this many seconds after TCP accept is closed.
    association_request_timeout_s: float = Field(5.0, gt=0, le=300)
    #: Maximum PDU length we offer (bytes); 0 means unlimited (PS3.8 9.3.1).
    max_pdu: int = Field(4_194_304, ge=0)
    #: ACSE (association request/release) timeout, seconds.
    acse_timeout_s: float = Field(30.0, gt=0, le=3600)
    #: DIMSE message timeout, seconds.
    dimse_timeout_s: float = Field(60.0, gt=0, le=3600)
    #: Network (idle socket) timeout, seconds.
    network_timeout_s: float = Field(120.0, gt=0, le=3600)
    #: After acceptance, seconds a PDU may take from its first byte to its last
    #: before the association is aborted (a 4 MiB ``max_pdu`` then needs at
    #: least ~70 KB/s); bounds a slow dribble that each read alone would allow.
    pdu_deadline_s: float = Field(60.0, gt=0, le=3600)
    #: Bytes a single association may store before further C-STOREs are refused.
    max_bytes_per_association: int = Field(8 * 1024**3, ge=1)
    #: Below this much free space on the spool filesystem C-STORE answers 0xA700.
    min_free_bytes: int = Field(2 * 1024**3, ge=0)
    #: DICOM TLS listener (PS3.15 B.9, BCP 195), beside the plain ``port``.
    tls: ScpTLSConfig | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return validate_ae_title(v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return _validate_host(v)

    @property
    def storage_path(self) -> Path:
        """The storage directory as a :class:`~pathlib.Path`."""
        return Path(self.storage_dir)


class PeerConfig(_Strict):
    """A peer allowed to send to the node: both AE title and source IP must match."""

    ae_title: str
    host: str

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return validate_ae_title(v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return _validate_host(v)


def _default_objects() -> list[ObjectKind]:
    """Default output profile: :data:`DEFAULT_OBJECT_KINDS`."""
    return list(DEFAULT_OBJECT_KINDS)


class DestinationConfig(_Strict):
    """A C-STORE SCP that receives results, with its output profile."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    #: Result object kinds this destination receives (output profile): a list
    #: of kinds, or a profile name (:data:`OUTPUT_PROFILES`: ohif, legacy-pacs,
    #: archive).  YAML strings become :class:`ObjectKind` members here (lax for this field only).
    objects: list[Annotated[ObjectKind, Strict(False)]] = Field(
        default_factory=_default_objects, min_length=1
    )
    #: Also send the candidates below the operating point (SR, labelled "below
    #: operating point", and the summary page; never SEG, key images, GSPS, KOS).
    below_operating_point: bool = False
    #: Association/DIMSE timeout towards this destination, seconds.
    timeout_s: float = Field(30.0, gt=0, le=3600)
    #: Send over DICOM TLS (``port`` is then the destination's TLS port).
    tls: ScuTLSConfig | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return validate_ae_title(v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return _validate_host(v)

    @field_validator("objects", mode="before")
    @classmethod
    def _profile(cls, v: object) -> object:
        """``objects: ohif`` names a profile (:data:`OUTPUT_PROFILES`); a list names kinds."""
        if isinstance(v, str):
            kinds = OUTPUT_PROFILES.get(v)
            if kinds is None:
                raise ValueError(
                    f"unknown output profile {v!r}; use one of {sorted(OUTPUT_PROFILES)} "
                    f"or a list of kinds from {[str(k) for k in ObjectKind]}"
                )
            return list(kinds)
        return v

    @field_validator("objects")
    @classmethod
    def _unique_objects(cls, v: list[ObjectKind]) -> list[ObjectKind]:
        if len(set(v)) != len(v):
            raise ValueError("object kinds must not repeat")
        return v


class StudyConfig(_Strict):
    """Study-completeness timers (seconds)."""

    #: A series is complete after this long without a new instance.
    series_quiet_s: float = Field(10.0, gt=0)
    #: A study is complete after this long without a new instance in any series.
    study_quiet_s: float = Field(30.0, gt=0)
    #: A study is handed on at the latest this long after its first instance.
    force_complete_s: float = Field(1800.0, gt=0)
    #: How often the completeness timers are checked.
    poll_interval_s: float = Field(1.0, gt=0, le=60)

    @model_validator(mode="after")
    def _ordered(self) -> StudyConfig:
        if self.force_complete_s < self.study_quiet_s:
            raise ValueError("force_complete_s must be >= study_quiet_s")
        return self


class RetryConfig(_Strict):
    """Exponential backoff with jitter for retryable send failures."""

    initial_s: float = Field(10.0, gt=0)
    max_interval_s: float = Field(900.0, gt=0)
    multiplier: float = Field(2.0, ge=1.0)
    #: Fraction of each interval added or removed at random.
    jitter: float = Field(0.2, ge=0.0, le=1.0)
    #: Give up (job goes to ``dead``) after retrying for this long.
    horizon_s: float = Field(6 * 3600.0, gt=0)


class JobsConfig(_Strict):
    """Celery job execution."""

    #: ``None`` means the embedded, durable SQLite broker below ``storage_dir``;
    #: ``redis://host:port/db`` for multi-host sites.
    broker_url: str | None = None
    #: Run a worker inside ``cad-node serve`` (single-machine mode).
    embedded_worker: bool = True
    #: Worker processes/threads per queue in the embedded worker.
    concurrency: int = Field(1, ge=1, le=64)
    #: A task gets SoftTimeLimitExceeded after this many seconds.
    soft_time_limit_s: float = Field(1800.0, gt=0)
    #: A task is killed after this many seconds.
    hard_time_limit_s: float = Field(2100.0, gt=0)
    #: Broker visibility timeout: must exceed the longest job.
    visibility_timeout_s: float = Field(7200.0, gt=0)
    #: A job delivered more often than this (worker crashes) goes to ``dead``.
    max_deliveries: int = Field(3, ge=1, le=100)
    #: Torch device for inference: ``auto`` picks CUDA when present, else CPU.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    retry: RetryConfig = RetryConfig()
    #: Seconds between a worker's heartbeats to the job table.
    heartbeat_s: float = Field(5.0, gt=0, le=600)
    #: A claimed job whose worker has not heart-beat for this long is re-published.
    claim_lease_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _limits(self) -> JobsConfig:
        if self.claim_lease_s < 2 * self.heartbeat_s:
            raise ValueError("claim_lease_s must be at least 2 x heartbeat_s")
        if self.hard_time_limit_s <= self.soft_time_limit_s:
            raise ValueError("hard_time_limit_s must be > soft_time_limit_s")
        if self.visibility_timeout_s <= self.hard_time_limit_s:
            raise ValueError("visibility_timeout_s must be > hard_time_limit_s")
        if self.broker_url is not None and not re.match(
            r"^(redis|rediss|sqla\+sqlite|filesystem)://", self.broker_url
        ):
            raise ValueError("broker_url must start with redis://, rediss://, sqla+sqlite://")
        return self


class SeriesMatch(_Strict):
    """DICOM attribute conditions a series must meet (all given ones must hold)."""

    modality: list[str] | None = None
    body_part: list[str] | None = None
    #: Regular expression searched (case-insensitive) in SeriesDescription.
    series_description: str | None = None
    slice_thickness_mm: list[float] | None = Field(None, min_length=2, max_length=2)
    #: Values required in ImageType (e.g. ORIGINAL, PRIMARY).
    image_type: list[str] | None = None
    orientation: Literal["axial", "coronal", "sagittal"] | None = None
    view_position: list[str] | None = None
    min_instances: int = Field(1, ge=1)
    #: Require one image size in the series (a volume); false for radiographs,
    #: analysed one image at a time (a PA and a lateral differ in size).
    same_size: bool = True

    @field_validator("series_description")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return v


class RoutingRule(_Strict):
    """Run ``pipeline`` on the series of a complete study that match ``match``."""

    name: str
    pipeline: str
    match: SeriesMatch = SeriesMatch()
    #: Which matching series to use: the best one (thinnest, most slices) or all.
    series: Literal["best", "all"] = "best"


#: Built-in rule for radiographs (pipeline ``cxr``): every CR and DX series,
#: For Presentation or For Processing, whatever its Body Part Examined or View
#: Position.  The header match does not filter radiographs: the pipeline
#: itself refuses what it cannot analyse (a lateral, DX For Processing, a
#: non-chest body part, an image under 256 pixels, ...) and the refusal
#: reaches the PACS as a failure SR and summary page stating the reason,
#: instead of the study silently getting nothing.
CHEST_XR_RULE_NAME = "chest-xr"


def chest_xr_rule() -> RoutingRule:
    """The built-in ``chest-xr`` routing rule (see :data:`CHEST_XR_RULE_NAME`)."""
    return RoutingRule(
        name=CHEST_XR_RULE_NAME,
        pipeline="cxr",
        series="all",
        match=SeriesMatch(modality=["CR", "DX"], same_size=False),
    )


#: The built-in routing rules: the one definition of each shipped rule.  They
#: apply when the configuration has no ``routing.rules`` key, and a
#: ``routing.rules`` entry that is a plain string names one of them
#: (``config/cad-node.yaml`` and ``docker/cad-node.yaml`` list
#: ``[chest-ct, chest-xr]`` this way, so no YAML file repeats a rule).
BUILTIN_RULES: list[RoutingRule] = [
    RoutingRule(
        name="chest-ct",
        pipeline="ct-chest",
        series="best",
        match=SeriesMatch(modality=["CT"], image_type=["ORIGINAL"], orientation="axial",
                          slice_thickness_mm=[0.0, 3.0], min_instances=40,
                          # chest or unstated (""): a CT labelled ABDOMEN, PELVIS, ...
                          # is not a chest CT
                          body_part=["CHEST", "THORAX", "LUNG", ""]),
    ),
    chest_xr_rule(),
]


def _builtin_rules() -> list[RoutingRule]:
    return [r.model_copy(deep=True) for r in BUILTIN_RULES]


def _builtin_rule(name: str) -> RoutingRule:
    """The built-in rule called ``name`` (a copy); ValueError naming the known ones."""
    for rule in BUILTIN_RULES:
        if rule.name == name:
            return rule.model_copy(deep=True)
    known = ", ".join(r.name for r in BUILTIN_RULES)
    raise ValueError(f"{name!r} is not a built-in routing rule (built-in: {known}); "
                     "write the rule out as a mapping (name, pipeline, match)")


class RoutingConfig(_Strict):
    """Routing rules, evaluated in order; every matching rule yields a job step.

    Without a ``rules`` key the :data:`BUILTIN_RULES` apply; ``rules: []``
    explicitly means "analyse nothing" (``config check`` and start-up warn).
    An entry may be the name of a built-in rule (``- chest-xr``) instead of a
    mapping.
    """

    rules: list[RoutingRule] = Field(default_factory=_builtin_rules)

    @field_validator("rules", mode="before")
    @classmethod
    def _named_builtins(cls, value: Any) -> Any:
        """A string entry names a built-in rule (:data:`BUILTIN_RULES`)."""
        if isinstance(value, list):
            return [_builtin_rule(v) if isinstance(v, str) else v for v in value]
        return value

    @property
    def builtin(self) -> bool:
        """True when the rules are the built-in ones (no ``rules`` key given)."""
        return "rules" not in self.model_fields_set

    @property
    def analyses_nothing(self) -> bool:
        """True when the configuration explicitly has no routing rule."""
        return not self.rules


class ModelsConfig(_Strict):
    """Where model bundles live and which ones pipelines use."""

    #: Directory holding versioned bundles (``<name>/<version>/manifest.json``).
    dir: str = "models"


class ResultsConfig(_Strict):
    """What the result objects say about their producer."""

    disclaimer: str = Field("Not for diagnostic use", min_length=1, max_length=200)
    manufacturer: str = Field("cad-node", min_length=1, max_length=64)
    institution_name: str | None = None
    #: Run dciodvfy (/usr/bin/dciodvfy) in the conformance gate; with it
    #: missing, every object fails the gate (false: objects go out unchecked).
    use_dciodvfy: bool = True


_DATABASE_URL = r"^(sqlite:///|postgresql(\+psycopg)?://|postgres://)"


class StorageConfig(_Strict):
    """Where the spool index and the job table live, and how workers get a study.

    The defaults are the embedded single-machine node: SQLite files below
    ``node.storage_dir``, workers reading the spool's files directly.
    """

    #: ``None``: SQLite files below ``node.storage_dir``.  ``postgresql://user@host:port/db``:
    #: the index and the job table in one PostgreSQL database (several hosts).
    database_url: str | None = None
    #: Receiver: serve the read-only, study-scoped WADO-RS endpoint on this address
    #: (``None``: off).  Workers on other hosts fetch their study from it.
    wado_host: str | None = None
    wado_port: int = Field(8043, ge=1, le=65535)
    #: Worker: base URL of the receiver's WADO-RS endpoint; ``None`` reads the spool's
    #: files directly (same host).  The study-scoped token comes with the job.
    fetch_url: str | None = Field(None, pattern=r"^https?://")
    #: Receiver: file holding the key that signs the study-scoped tokens (created, 0600,
    #: when missing); ``None`` means ``<storage_dir>/wado.key``.
    token_key_file: str | None = None

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(_DATABASE_URL, v):
            raise ValueError("database_url must start with sqlite:/// or postgresql://")
        return v

    @property
    def jobs_database_url(self) -> str | None:
        """URL of the job table (``None``: the SQLite file below ``storage_dir``)."""
        return self.database_url

    @property
    def index_database_url(self) -> str | None:
        """URL of the spool index (``None``: the SQLite file in the spool)."""
        return self.database_url


class MetricsConfig(_Strict):
    """Prometheus metrics endpoint."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=1, le=65535)


class WebToken(_Strict):
    """A bearer token allowed to use the write actions of the REST API."""

    #: Who holds it; recorded as the actor of audit events.
    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    token: str = Field(min_length=16, max_length=256)


class WebConfig(_Strict):
    """REST API and status page (``cad_node.web``): off by default, loopback by default."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    #: Tokens for write actions (retry, resend, replay, reload, C-ECHO).
    tokens: list[WebToken] = Field(default_factory=list)
    #: Environment variable that may hold one more token (named ``env``).
    token_env: str = Field("CAD_NODE_API_TOKEN", pattern=r"^[A-Z_][A-Z0-9_]*$")
    #: Seconds between refreshes of the status page.
    refresh_s: float = Field(2.0, ge=0.5, le=300)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return _validate_host(v)


class AuditConfig(_Strict):
    """Audit trail: JSON lines under ``storage_dir/audit/``, rotated by size."""

    enabled: bool = True
    #: Rotate the file when it grows beyond this many bytes.
    max_bytes: int = Field(10 * 1024**2, ge=1024)
    #: Rotated files kept (``audit.jsonl.1`` ... ``.N``).
    backups: int = Field(10, ge=1, le=1000)


class RetentionConfig(_Strict):
    """Deletion of spooled studies once every destination acknowledged their results."""

    #: Days after the last acknowledgement a study is deleted; ``null`` keeps studies forever.
    days: float | None = Field(None, ge=0)
    #: How often ``cad-node serve`` applies the policy (seconds).
    interval_s: float = Field(3600.0, gt=0)


class Settings(_Strict):
    """The whole configuration of one node."""

    node: NodeConfig = NodeConfig()
    peers: list[PeerConfig] = Field(default_factory=list)
    destinations: list[DestinationConfig] = Field(default_factory=list)
    study: StudyConfig = StudyConfig()
    jobs: JobsConfig = JobsConfig()
    routing: RoutingConfig = RoutingConfig()
    models: ModelsConfig = ModelsConfig()
    results: ResultsConfig = ResultsConfig()
    metrics: MetricsConfig = MetricsConfig()
    web: WebConfig = WebConfig()
    audit: AuditConfig = AuditConfig()
    retention: RetentionConfig = RetentionConfig()
    storage: StorageConfig = StorageConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _unique_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError("destinations: names must be unique")
        return self

    def destination(self, name: str) -> DestinationConfig:
        """Return the destination called ``name``.

        Raises
        ------
        KeyError
            No destination has that name.
        """
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(f"no destination named {name!r}")

    def warnings(self) -> list[str]:
        """Configuration that is valid but probably not what the operator wants."""
        out: list[str] = []
        if self.routing.analyses_nothing:
            out.append("routing.rules is empty: the node stores studies but analyses nothing")
        if not self.destinations:
            out.append("destinations is empty: results are built but sent nowhere")
        if self.web.enabled and not _is_loopback(self.web.host):
            out.append(f"web.host {self.web.host} is not loopback: anyone who can reach it reads "
                       "the status page (patient IDs, study UIDs) without a token")
        if not self.peers and not self.node.accept_any:
            out.append("peers is empty and node.accept_any is false: every association is "
                       "rejected")
        return out


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or "__" not in var[len(ENV_PREFIX):]:
            continue
        path = [p.lower() for p in var[len(ENV_PREFIX):].split("__")]
        if any(not p for p in path):
            raise ConfigError(f"{var}: empty key component")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{var}: value is not valid YAML: {exc}") from None
        node: dict[str, Any] = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{var}: {part} is not a mapping")
            node = child
        node[path[-1]] = value
    return data


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Load, override from the environment and validate a configuration file.

    Parameters
    ----------
    path : path-like, optional
        YAML file; :data:`DEFAULT_CONFIG_PATH` when omitted.
    environ : mapping, optional
        Environment to read ``CAD_NODE_*`` overrides from (``os.environ``).

    Returns
    -------
    Settings
        The validated settings.

    Raises
    ------
    ConfigError
        The file is missing or not YAML, or a key is unknown or invalid; the
        message names the file and each offending key.
    """
    cfg_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {cfg_path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{cfg_path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_path}: top level must be a mapping of sections")
    data = _apply_env(raw, os.environ if environ is None else environ)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(cfg_path))) from None
    return resolve_paths(settings, cfg_path.resolve().parent)


def resolve_paths(settings: Settings, base: Path) -> Settings:
    """Make ``node.storage_dir`` and an explicit ``models.dir`` absolute against ``base``.

    Relative paths in a configuration file mean "relative to the file's
    directory", never to the current directory of whoever starts the node.
    ``models.dir`` left at its default keeps the bundle lookup of
    :func:`cad_node.models.default_models_dir`.
    """
    node = settings.node
    update: dict[str, Any] = {}
    if not Path(node.storage_dir).is_absolute():
        update["node"] = node.model_copy(
            update={"storage_dir": str((base / node.storage_dir).resolve())})
    if "dir" in settings.models.model_fields_set and not Path(settings.models.dir).is_absolute():
        update["models"] = settings.models.model_copy(
            update={"dir": str((base / settings.models.dir).resolve())})
    return settings.model_copy(update=update) if update else settings
