"""``cad-train export``: turn a training checkpoint into a versioned bundle.

The bundle layout and the checks the node applies are described in
:mod:`cad_node.models.bundle`.  Export writes ``weights.pt`` (the model's
``state_dict`` only, loadable with ``weights_only=True``), ``manifest.json``
with the weights' sha256 and the Device UID derived from it, and
``MODEL_CARD.md``.  It refuses to overwrite an existing bundle version unless
``--force`` is given, because a version must identify one set of weights.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console

from cad_node.models.bundle import (
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    BundleManifest,
    SemVer,
    device_uid_from_sha256,
    load_bundle,
    sha256_file,
)

__all__ = [
    "DEFAULT_INTENDED_USE",
    "DEFAULT_LICENSE",
    "export_checkpoint",
    "register",
    "write_bundle",
]

#: Intended-use statement of every bundle the trainer writes.
DEFAULT_INTENDED_USE = (
    "Research and engineering use only. Not for diagnostic use. Scores lung-nodule "
    "candidates on chest CT to rank them for review; it does not replace a radiologist."
)
#: License of the weights the trainer writes (same as the code).
DEFAULT_LICENSE = "Apache-2.0 (weights and code); training data: see training_data"

_console = Console(stderr=True)


def write_bundle(
    models_dir: Path,
    *,
    name: str,
    version: str,
    state_dict: Mapping[str, torch.Tensor],
    task: str,
    architecture: Mapping[str, Any],
    input_spec: Mapping[str, Any],
    training_data: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    output_spec: Mapping[str, Any] | None = None,
    model_card: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    license_text: str = DEFAULT_LICENSE,
    intended_use: str = DEFAULT_INTENDED_USE,
    force: bool = False,
) -> Path:
    """Write a bundle ``models_dir/name/version`` atomically and verify it loads.

    Returns
    -------
    Path
        The bundle directory.

    Raises
    ------
    FileExistsError
        The version exists and ``force`` is false.
    ValueError
        Invalid name, version or manifest content.
    """
    SemVer.parse(version)
    target = models_dir / name / version
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; bump the version or pass --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    try:
        weights = tmp / "weights.pt"
        cpu_state = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        torch.save(cpu_state, weights)
        sha = sha256_file(weights)
        manifest = BundleManifest.model_validate(
            {
                "name": name,
                "version": version,
                "task": task,
                "input": dict(input_spec),
                "output": dict(output_spec or {}),
                "architecture": dict(architecture),
                "training_data": dict(training_data),
                "metrics": dict(metrics or {}),
                "weights_file": weights.name,
                "weights_sha256": sha,
                "device_uid": device_uid_from_sha256(sha),
                "license": license_text,
                "intended_use": intended_use,
                "provenance": dict(provenance or {}),
            }
        )
        (tmp / MANIFEST_FILE).write_text(
            json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n",
            encoding="utf-8",
        )
        if model_card is not None:
            (tmp / MODEL_CARD_FILE).write_text(model_card, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    load_bundle(name, models_dir=models_dir, version=version)
    return target


def export_checkpoint(
    checkpoint: Path,
    models_dir: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    metrics_file: Path | None = None,
    model_card: Path | None = None,
    force: bool = False,
) -> Path:
    """Export a :mod:`trainer.train` checkpoint as a bundle.

    Parameters
    ----------
    checkpoint : Path
        A checkpoint written by ``cad-train train`` (``final.pt``/``last.pt``).
    models_dir : Path
        Destination models directory.
    name, version : str, optional
        Override the name/version recorded in the checkpoint's config.
    metrics_file : Path, optional
        JSON metrics (e.g. from the held-out evaluation) to put in the
        manifest; defaults to ``metrics.json`` beside the checkpoint if present.
    model_card : Path, optional
        Markdown model card; defaults to ``MODEL_CARD.md`` beside the
        checkpoint if present.
    force : bool
        Overwrite an existing version.

    Raises
    ------
    ValueError
        The checkpoint is not a trainer checkpoint (the message names it).
    """
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ValueError(f"{checkpoint}: not a readable checkpoint: {exc}") from None
    required = {"model", "bundle", "training_data"}
    if not isinstance(ckpt, dict) or not required <= set(ckpt):
        raise ValueError(
            f"{checkpoint}: not a cad-train checkpoint (needs keys {sorted(required)})"
        )
    meta = ckpt["bundle"]
    metrics: dict[str, Any] = dict(ckpt.get("metrics") or {})
    mfile = metrics_file or checkpoint.parent / "metrics.json"
    if mfile.is_file():
        try:
            metrics.update(json.loads(mfile.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{mfile}: metrics are not valid JSON: {exc}") from None
    card_path = model_card or checkpoint.parent / MODEL_CARD_FILE
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else None
    return write_bundle(
        models_dir,
        name=name or meta["name"],
        version=version or meta["version"],
        state_dict=ckpt["model"],
        task=meta["task"],
        architecture=meta["architecture"],
        input_spec=meta["input"],
        output_spec=meta.get("output"),
        training_data=ckpt["training_data"],
        metrics=metrics,
        model_card=card,
        provenance=ckpt.get("provenance"),
        force=force,
    )


def register(app: typer.Typer) -> None:
    """Add ``cad-train export`` to ``app``."""

    @app.command("export")
    def export_cmd(
        checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from cad-train train.")],
        models_dir: Annotated[
            Path, typer.Option("--models-dir", help="Destination models directory.")
        ] = Path("models"),
        name: Annotated[str | None, typer.Option(help="Bundle name override.")] = None,
        version: Annotated[str | None, typer.Option(help="Bundle version override.")] = None,
        metrics: Annotated[
            Path | None, typer.Option(help="Metrics JSON to record in the manifest.")
        ] = None,
        model_card: Annotated[Path | None, typer.Option(help="MODEL_CARD.md to include.")] = None,
        force: Annotated[bool, typer.Option(help="Overwrite an existing version.")] = False,
    ) -> None:
        """Write a versioned model bundle the node loads by name."""
        try:
            path = export_checkpoint(
                checkpoint,
                models_dir,
                name=name,
                version=version,
                metrics_file=metrics,
                model_card=model_card,
                force=force,
            )
        except (ValueError, FileExistsError, FileNotFoundError) as exc:
            _console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        bundle = load_bundle(path.parent.name, models_dir=path.parent.parent, version=path.name)
        _console.print(
            f"wrote {path} (sha256 {bundle.manifest.weights_sha256[:16]}…, "
            f"device UID {bundle.identity.device_uid})"
        )
