"""Versioned model bundles: manifest, weights, integrity check and identity.

A bundle is a directory ``<models_dir>/<name>/<version>/`` holding

``manifest.json``
    The :class:`BundleManifest` (name, version, task, input/output spec,
    network architecture, training data description, evaluation metrics,
    weights sha256, Device UID, license, intended use).
``weights.pt`` (the manifest's ``weights_file``)
    A PyTorch ``state_dict`` saved with :func:`torch.save`, loaded with
    ``weights_only=True`` (no pickled code is ever executed).
``MODEL_CARD.md``
    Human-readable model card (training data, measured metrics, limitations).

Contract
--------
* :func:`load_bundle` never downloads anything; it only reads the directory.
* It refuses (``ValueError`` naming the file) a malformed manifest, a manifest
  whose name/version disagree with its directory, a missing weights file, and
  weights whose sha256 differs from the manifest.
* The Device UID is derived from the weights' sha256
  (:func:`device_uid_from_sha256`), so it changes whenever the weights change;
  result builders write it into the Contributing Equipment Sequence
  (0018,A001) of the SOP Common Module (PS3.3 C.12.1, IHE AIR) via
  :attr:`ModelBundle.identity`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import total_ordering
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:  # pragma: no cover - imported lazily (cheap CLI start-up)
    import torch

    from cad_node.results.findings import ModelIdentity

__all__ = [
    "BUNDLE_NAME_PATTERN",
    "MANIFEST_FILE",
    "MODEL_CARD_FILE",
    "UUID_DERIVED_UID_ROOT",
    "BundleManifest",
    "InputSpec",
    "ModelBundle",
    "OutputSpec",
    "RadiographInputSpec",
    "SemVer",
    "default_models_dir",
    "device_uid_for",
    "device_uid_from_sha256",
    "list_versions",
    "load_bundle",
    "read_manifest",
    "sha256_file",
]

#: File name of the manifest inside a bundle directory.
MANIFEST_FILE = "manifest.json"
#: File name of the model card inside a bundle directory.
MODEL_CARD_FILE = "MODEL_CARD.md"
#: Bundle names: lower-case words joined by ``-``, ``_`` or ``.`` (never a path).
BUNDLE_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
#: UID root for UIDs derived from a 128-bit integer (PS3.5 B.2, ISO/IEC 9834-8).
UUID_DERIVED_UID_ROOT = "2.25."
#: Maximum length of a UID (PS3.5 9.1).
UID_MAX_LENGTH = 64
#: Number of hex digits of the sha256 used for the Device UID (120 bits < 2**128).
_UID_HEX_DIGITS = 30

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


@total_ordering
@dataclass(frozen=True)
class SemVer:
    """A ``MAJOR.MINOR.PATCH`` semantic version (no pre-release tags)."""

    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str) -> SemVer:
        """Parse ``text``; raise ``ValueError`` unless it is ``MAJOR.MINOR.PATCH``."""
        m = _SEMVER.match(text)
        if m is None:
            raise ValueError(f"{text!r} is not a semantic version MAJOR.MINOR.PATCH")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)))

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, SemVer):
            return NotImplemented
        return (self.major, self.minor, self.patch) < (other.major, other.minor, other.patch)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def device_uid_for(sha256: str, operating_threshold: float | None = None,
                   context_fusion: Mapping[str, Any] | None = None,
                   harmonise_slice_thickness_mm: float | None = None,
                   tta_flips: int | None = None) -> str:
    """The Device UID of a bundle: its weights and, when it has them, its operating point,
    its context fusion, its slice-profile harmonisation and its test-time flips.

    Without an operating threshold this is :func:`device_uid_from_sha256` of
    the weights (bundles written before operating thresholds existed keep
    their UID).  With one, the hash of ``"<weights sha256>|operating_threshold=<t>"``
    is used: the same weights at another operating point are another device.
    A context fusion appends ``"|context_fusion=<its JSON, sorted keys>"``, an input
    spec's ``harmonise_slice_thickness_mm`` ``"|harmonise_slice_thickness_mm=<t>"``
    (the same weights fed a differently smoothed volume are another device), an input
    spec's ``tta_flips`` ``"|tta_flips=<n>"`` (the same weights averaged over flips are
    another device).
    """
    if (operating_threshold is None and context_fusion is None
            and harmonise_slice_thickness_mm is None and tta_flips is None):
        return device_uid_from_sha256(sha256)
    key = sha256
    if operating_threshold is not None:
        key += f"|operating_threshold={float(operating_threshold)!r}"
    if context_fusion is not None:
        key += "|context_fusion=" + json.dumps(dict(context_fusion), sort_keys=True)
    if harmonise_slice_thickness_mm is not None:
        key += f"|harmonise_slice_thickness_mm={float(harmonise_slice_thickness_mm)!r}"
    if tta_flips is not None:
        key += f"|tta_flips={int(tta_flips)}"
    return device_uid_from_sha256(hashlib.sha256(key.encode()).hexdigest())


def device_uid_from_sha256(sha256: str) -> str:
    """Derive a DICOM Device UID from a weights sha256.

    The first 30 hex digits (120 bits) of the hash, read as an integer, are
    put under the UUID-derived root ``2.25`` (PS3.5 B.2).  The result has at
    most 42 characters (a UID may have 64, PS3.5 9.1) and no leading zeros in
    its last component.

    Parameters
    ----------
    sha256 : str
        64 lower-case hex digits.

    Returns
    -------
    str
        The Device UID.

    Raises
    ------
    ValueError
        ``sha256`` is not 64 lower-case hex digits.
    """
    if not _SHA256.match(sha256):
        raise ValueError(f"not a lower-case hex sha256: {sha256!r}")
    value = int(sha256[:_UID_HEX_DIGITS], 16)
    uid = f"{UUID_DERIVED_UID_ROOT}{value}"
    assert len(uid) <= UID_MAX_LENGTH
    return uid


def sha256_file(path: Path) -> str:
    """Return the lower-case hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class InputSpec(_Strict):
    """What the network expects: an isotropic patch resampled around a centre.

    Patches are sampled on a grid aligned with the patient LPS axes, array
    order ``(z, y, x)``; HU values are clipped to ``hu_window`` and scaled to
    ``[0, 1]``.
    """

    #: Voxel spacing of the patch, mm, ``(x, y, z)``.
    spacing_mm: tuple[float, float, float]
    #: Patch size in voxels, ``(z, y, x)``.
    patch_size: tuple[int, int, int]
    #: HU window ``(low, high)`` clipped to and scaled to ``[0, 1]``.
    hu_window: tuple[float, float]
    #: HU assigned to patch voxels outside the scanned volume (air).
    outside_hu: float = -1024.0
    #: Candidates per inference batch.
    batch_size: int = Field(64, ge=1, le=4096)
    #: Slice thickness (mm) of the scorer's training scans.  When set, the ct-chest
    #: pipeline smooths thinner-slice scans along z to this slice profile before
    #: candidates and scoring (:mod:`cad_node.pipelines.ct_chest.harmonise`); None
    #: (bundles up to ct-nodule-scorer 1.0.2): every scan is used as it is.
    harmonise_slice_thickness_mm: float | None = Field(None, gt=0, le=20)
    #: Test-time augmentation of the CNN scorer: ``8`` scores every patch in its 8 axis
    #: flips (z, y, x each flipped or not) and averages the 8 logits
    #: (:func:`cad_node.models.scorer.flip_averaged_logits`); None (bundles up to
    #: ct-nodule-scorer 1.0.2): one pass on the patch as it is.
    tta_flips: Literal[8] | None = None

    @field_validator("spacing_mm")
    @classmethod
    def _spacing(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError("spacing_mm must be positive")
        return v

    @field_validator("patch_size")
    @classmethod
    def _size(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        # z may be a few slices (the 2.5-D ct-lesion input stacks 3)
        if v[0] < 3 or v[0] > 256 or any(s < 4 or s > 256 for s in v[1:]):
            raise ValueError("patch_size must be (z in [3, 256], y and x in [4, 256])")
        return v

    @field_validator("hu_window")
    @classmethod
    def _window(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[1] > v[0]:
            raise ValueError("hu_window must be (low, high) with high > low")
        return v


class RadiographInputSpec(_Strict):
    """What a 2-D radiograph network expects (``cxr-*`` bundles).

    The image is letter-boxed to a square, resampled to ``size`` pixels and
    normalised as ``normalisation`` names (see
    :func:`cad_node.pipelines.cxr.lungs.network_input`).
    """

    #: Discriminates this spec from the CT patch :class:`InputSpec`.
    kind: Literal["radiograph"] = "radiograph"
    #: Side of the square network input, pixels.
    size: int = Field(ge=32, le=2048)
    #: Grey-level normalisation (``histeq``: histogram equalisation to [-1, 1]).
    normalisation: Literal["histeq"] = "histeq"
    #: Output channels, in order (e.g. ``["right_lung", "left_lung", "heart"]``).
    labels: list[str] = Field(default_factory=list)


class OutputSpec(_Strict):
    """What the network returns."""

    #: ``logit``: one logit per patch; probability = sigmoid(logit).
    kind: Literal["logit"] = "logit"
    #: Meaning of a high probability.
    positive_class: str = "nodule"
    #: Suggested operating threshold on the probability.
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    #: Operating threshold of the *pipeline's* final probability, chosen by
    #: ``cad-train`` from a stated rule (``operating_rule``); findings at or
    #: above it are reported.  ``None``: the pipeline derives its own.
    operating_threshold: float | None = Field(None, ge=0.0, le=1.0)
    #: The rule that chose ``operating_threshold`` (one sentence, for the card).
    operating_rule: str | None = None
    #: Late fusion of the logit with candidate context features
    #: (:class:`cad_node.pipelines.ct_chest.features.ContextFusion` record:
    #: ``features``, ``weights``, ``intercept``); ``None``: sigmoid(logit) alone.
    context_fusion: dict[str, Any] | None = None


class BundleManifest(_Strict):
    """The manifest of a model bundle (``manifest.json``)."""

    #: Manifest format version.
    format_version: Literal[1] = 1
    name: str = Field(pattern=BUNDLE_NAME_PATTERN)
    version: str
    task: str = Field(min_length=1)
    input: InputSpec | RadiographInputSpec
    output: OutputSpec = OutputSpec()
    #: Network builder name and keyword arguments (see ``cad_node.models.network``).
    architecture: dict[str, Any]
    #: Description of the training data (free text plus counts).
    training_data: dict[str, Any]
    #: Measured evaluation metrics (name -> value or nested description).
    metrics: dict[str, Any] = Field(default_factory=dict)
    weights_file: str = Field("weights.pt", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    device_uid: str = Field(max_length=UID_MAX_LENGTH, pattern=r"^[0-9]+(\.[0-9]+)+$")
    manufacturer: str = Field("cad-node", min_length=1, max_length=64)
    license: str = Field(min_length=1)
    intended_use: str = Field(min_length=1)
    #: Free-form provenance (trainer version, config, seed, date).
    provenance: dict[str, Any] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        SemVer.parse(v)
        return v

    @model_validator(mode="after")
    def _uid(self) -> BundleManifest:
        expected = device_uid_for(self.weights_sha256, self.output.operating_threshold,
                                  self.output.context_fusion,
                                  getattr(self.input, "harmonise_slice_thickness_mm", None),
                                  getattr(self.input, "tta_flips", None))
        if self.device_uid != expected:
            raise ValueError(
                f"device_uid {self.device_uid} is not derived from weights_sha256 "
                "and output.operating_threshold "
                f"(expected {expected})"
            )
        if "not for diagnostic use" not in self.intended_use.lower():
            raise ValueError("intended_use must state 'Not for diagnostic use'")
        return self

    @property
    def identity(self) -> ModelIdentity:
        """The IHE AIR model identity of this bundle."""
        from cad_node.results.findings import ModelIdentity

        return ModelIdentity(
            name=self.name,
            version=self.version,
            device_uid=self.device_uid,
            manufacturer=self.manufacturer,
            weights_sha256=self.weights_sha256,
        )


@dataclass(frozen=True)
class ModelBundle:
    """A verified bundle on disk.

    Obtain one with :func:`load_bundle`; the weights' sha256 has been checked
    against the manifest when it is returned.
    """

    path: Path
    manifest: BundleManifest

    @property
    def name(self) -> str:
        """Bundle name."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """Bundle version."""
        return self.manifest.version

    @property
    def identity(self) -> ModelIdentity:
        """Identity written into results (Contributing Equipment, IHE AIR)."""
        return self.manifest.identity

    @property
    def weights_path(self) -> Path:
        """Path of the weights file."""
        return self.path / self.manifest.weights_file

    @property
    def model_card_path(self) -> Path:
        """Path of ``MODEL_CARD.md`` (may be absent in test bundles)."""
        return self.path / MODEL_CARD_FILE

    def build_network(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """Build the network and load the verified weights, in eval mode.

        The weights are re-hashed before loading, so a file swapped after
        :func:`load_bundle` is refused too.

        Parameters
        ----------
        device : str or torch.device
            Target device (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

        Raises
        ------
        ValueError
            The weights no longer match the manifest, or do not fit the
            architecture.
        """
        import torch

        from cad_node.models.network import build_network

        _verify_weights(self.weights_path, self.manifest.weights_sha256)
        net = build_network(self.manifest.architecture)
        try:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, TypeError, EOFError) as exc:
            raise ValueError(
                f"{self.weights_path}: weights do not fit architecture "
                f"{self.manifest.architecture}: {exc}"
            ) from None
        net.to(device)
        net.eval()
        return net


def _repo_root() -> Path | None:
    root = Path(__file__).resolve().parent.parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def default_models_dir() -> Path:
    """Resolve ``settings.models.dir`` to a directory.

    ``CAD_NODE_MODELS__DIR`` overrides the configured value (as for every
    setting).  A relative directory is looked up in the current working
    directory first and then at the root of a development checkout, so the
    repository's ``models/`` is found from anywhere inside it.
    """
    from cad_node.config import ModelsConfig

    configured = os.environ.get("CAD_NODE_MODELS__DIR") or ModelsConfig().dir
    path = Path(configured)
    if path.is_absolute():
        return path
    if (Path.cwd() / path).is_dir():
        return (Path.cwd() / path).resolve()
    root = _repo_root()
    if root is not None and (root / path).is_dir():
        return root / path
    return (Path.cwd() / path).resolve()


def list_versions(name: str, models_dir: Path | None = None) -> list[str]:
    """Versions of bundle ``name`` present on disk, lowest first.

    Directories whose name is not a semantic version are ignored.
    """
    _check_name(name)
    base = (models_dir if models_dir is not None else default_models_dir()) / name
    if not base.is_dir():
        return []
    found: list[SemVer] = []
    for child in base.iterdir():
        if child.is_dir():
            try:
                found.append(SemVer.parse(child.name))
            except ValueError:
                continue
    return [str(v) for v in sorted(found)]


def _check_name(name: str) -> None:
    if not re.match(BUNDLE_NAME_PATTERN, name):
        raise ValueError(f"invalid bundle name {name!r} (expected {BUNDLE_NAME_PATTERN})")


def _verify_weights(path: Path, expected: str) -> None:
    if not path.is_file():
        raise ValueError(f"{path}: weights file is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"{path}: sha256 {actual} does not match the manifest ({expected}); "
            "refusing a modified or corrupt bundle"
        )


def read_manifest(path: Path) -> BundleManifest:
    """Read and validate a ``manifest.json``.

    Raises
    ------
    ValueError
        The file is missing, not JSON, or not a valid manifest; the message
        names the file and the offending keys.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read manifest: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: manifest is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: manifest must be a JSON object")
    try:
        return BundleManifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"{path}: malformed manifest: {problems}") from None


def load_bundle(
    name: str, models_dir: Path | None = None, version: str | None = None
) -> ModelBundle:
    """Find, validate and verify a model bundle.

    Parameters
    ----------
    name : str
        Bundle name (e.g. ``"ct-nodule-scorer"``); never interpreted as a path.
    models_dir : Path, optional
        Directory holding ``<name>/<version>/``; :func:`default_models_dir`
        when omitted.
    version : str, optional
        Exact ``MAJOR.MINOR.PATCH``; the highest present version when omitted.

    Returns
    -------
    ModelBundle
        The bundle, with its weights' sha256 verified against the manifest.

    Raises
    ------
    FileNotFoundError
        No such bundle or version.
    ValueError
        Invalid name or version, malformed manifest, name/version mismatch
        with the directory, missing weights, or sha256 mismatch; the message
        names the file.
    """
    _check_name(name)
    base = models_dir if models_dir is not None else default_models_dir()
    if version is None:
        versions = list_versions(name, base)
        if not versions:
            raise FileNotFoundError(f"no bundle named {name!r} under {base}")
        version = versions[-1]
    else:
        SemVer.parse(version)
    bundle_dir = base / name / version
    manifest_path = bundle_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: bundle {name} {version} not found")
    manifest = read_manifest(manifest_path)
    if manifest.name != name or manifest.version != version:
        raise ValueError(
            f"{manifest_path}: manifest names {manifest.name} {manifest.version} "
            f"but lives in {name}/{version}"
        )
    _verify_weights(bundle_dir / manifest.weights_file, manifest.weights_sha256)
    return ModelBundle(path=bundle_dir, manifest=manifest)
