"""Model bundles and the networks the pipelines run.

* :func:`load_bundle` finds a versioned bundle under ``settings.models.dir``,
  validates its manifest and verifies the weights' sha256 (never downloads).
* :class:`ModelBundle` exposes the manifest and the IHE AIR identity
  (:class:`~cad_node.results.findings.ModelIdentity`).
* :class:`cad_node.models.scorer.CandidateScorer` scores CT nodule candidates
  (imported lazily: it needs torch).
"""

from __future__ import annotations

from cad_node.models.bundle import (
    BundleManifest,
    InputSpec,
    ModelBundle,
    OutputSpec,
    default_models_dir,
    device_uid_from_sha256,
    list_versions,
    load_bundle,
    read_manifest,
    sha256_file,
)

__all__ = [
    "BundleManifest",
    "InputSpec",
    "ModelBundle",
    "OutputSpec",
    "default_models_dir",
    "device_uid_from_sha256",
    "list_versions",
    "load_bundle",
    "read_manifest",
    "sha256_file",
]
