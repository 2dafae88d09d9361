"""Bundle format: manifest validation, sha256 verification, version choice, UID."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from cad_node.models import device_uid_from_sha256, list_versions, load_bundle
from cad_node.models.network import DEFAULT_ARCHITECTURE, build_network
from cad_node.results.findings import ModelIdentity
from trainer.export import write_bundle

INPUT = {
    "spacing_mm": [1.25, 1.25, 1.25],
    "patch_size": [32, 32, 32],
    "hu_window": [-1000.0, 400.0],
    "batch_size": 16,
}
ARCH = {**DEFAULT_ARCHITECTURE, "channels": [4, 8], "strides": [2, 2]}


def _write(models_dir: Path, version: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = build_network(ARCH)
    return write_bundle(
        models_dir,
        name="toy-scorer",
        version=version,
        state_dict=net.state_dict(),
        task="ct-nodule-candidate-scoring",
        architecture=ARCH,
        input_spec=INPUT,
        training_data={"description": "random initialisation (test)"},
    )


def test_device_uid_is_valid_and_derived_from_hash() -> None:
    sha = hashlib.sha256(b"weights").hexdigest()
    uid = device_uid_from_sha256(sha)
    # Expected value computed independently of the code under test.
    assert uid == "2.25." + str(int(sha[:30], 16))
    assert len(uid) <= 64
    assert re.fullmatch(r"2\.25\.[1-9][0-9]*", uid)
    assert device_uid_from_sha256(hashlib.sha256(b"other").hexdigest()) != uid
    with pytest.raises(ValueError):
        device_uid_from_sha256("XYZ")


def test_write_load_identity_and_highest_version(tmp_path: Path) -> None:
    _write(tmp_path, "0.9.0", seed=1)
    path = _write(tmp_path, "0.10.0", seed=2)
    assert list_versions("toy-scorer", tmp_path) == ["0.9.0", "0.10.0"]
    bundle = load_bundle("toy-scorer", models_dir=tmp_path)
    assert bundle.version == "0.10.0"  # semantic, not lexicographic order
    assert bundle.path == path
    sha = hashlib.sha256((path / "weights.pt").read_bytes()).hexdigest()
    ident = bundle.identity
    assert isinstance(ident, ModelIdentity)
    assert ident.weights_sha256 == sha
    assert ident.device_uid == "2.25." + str(int(sha[:30], 16))
    assert ident.name == "toy-scorer" and ident.version == "0.10.0"
    assert "not for diagnostic use" in bundle.manifest.intended_use.lower()
    old = load_bundle("toy-scorer", models_dir=tmp_path, version="0.9.0")
    assert old.identity.device_uid != ident.device_uid
    net = bundle.build_network()
    assert not net.training


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "1.0.0")
    weights = path / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-20] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"weights\.pt.*sha256"):
        load_bundle("toy-scorer", models_dir=tmp_path)


def test_malformed_manifests_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "1.0.0")
    manifest = path / "manifest.json"
    good = json.loads(manifest.read_text())

    manifest.write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json.*not valid JSON"):
        load_bundle("toy-scorer", models_dir=tmp_path)

    bad = dict(good)
    del bad["weights_sha256"]
    manifest.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"manifest\.json.*weights_sha256"):
        load_bundle("toy-scorer", models_dir=tmp_path)

    bad = dict(good, device_uid="2.25.1")
    manifest.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="device_uid"):
        load_bundle("toy-scorer", models_dir=tmp_path)

    bad = dict(good, version="1.0.1")
    manifest.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"lives in toy-scorer/1\.0\.0"):
        load_bundle("toy-scorer", models_dir=tmp_path)

    bad = dict(good, intended_use="Diagnose everything")
    manifest.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="Not for diagnostic use"):
        load_bundle("toy-scorer", models_dir=tmp_path)


def test_names_are_never_paths_and_missing_bundles_are_clear(tmp_path: Path) -> None:
    for name in ("../etc", "a/b", "", "UPPER"):
        with pytest.raises(ValueError, match="invalid bundle name"):
            load_bundle(name, models_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no bundle named"):
        load_bundle("absent", models_dir=tmp_path)
    _write(tmp_path, "1.0.0")
    with pytest.raises(FileNotFoundError, match=r"2\.0\.0"):
        load_bundle("toy-scorer", models_dir=tmp_path, version="2.0.0")
    with pytest.raises(ValueError, match="semantic version"):
        load_bundle("toy-scorer", models_dir=tmp_path, version="latest")


def test_existing_version_is_not_overwritten(tmp_path: Path) -> None:
    _write(tmp_path, "1.0.0")
    with pytest.raises(FileExistsError):
        _write(tmp_path, "1.0.0", seed=3)


def test_default_models_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cad_node.models import default_models_dir

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.delenv("CAD_NODE_MODELS__DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no models/ here: falls back to the checkout's models/
    if (repo / "models").is_dir():
        assert default_models_dir() == repo / "models"
    (tmp_path / "models").mkdir()
    assert default_models_dir() == tmp_path / "models"  # the working directory wins
    _write(tmp_path / "elsewhere", "1.0.0")
    monkeypatch.setenv("CAD_NODE_MODELS__DIR", str(tmp_path / "elsewhere"))
    assert default_models_dir() == tmp_path / "elsewhere"
    assert load_bundle("toy-scorer").version == "1.0.0"


def test_device_uid_changes_with_the_operating_threshold() -> None:
    from cad_node.models.bundle import device_uid_for, device_uid_from_sha256

    sha = "ab" * 32
    # no operating threshold: the weights alone, as before
    assert device_uid_for(sha) == device_uid_from_sha256(sha)
    a, b = device_uid_for(sha, 0.79), device_uid_for(sha, 0.8)
    assert len({a, b, device_uid_for(sha)}) == 3
    assert a == device_uid_for(sha, 0.79) and a.startswith("2.25.")
