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
import pickle
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from cad_node.models.bundle import (
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    BundleManifest,
    SemVer,
    device_uid_for,
    load_bundle,
    sha256_file,
)

if TYPE_CHECKING:  # pragma: no cover - torch is imported lazily (fast CLI start-up)
    import torch

__all__ = [
    "DEFAULT_INTENDED_USE",
    "DEFAULT_LICENSE",
    "export_checkpoint",
    "register",
    "render_model_card",
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


def _fmt(v: Any, nd: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return "n/a" if v is None else str(v)


def _extra_sections(metrics: Mapping[str, Any], training_data: Mapping[str, Any]) -> str:
    """Size bands, real negative scans and the operating point (when measured)."""
    out: list[str] = []
    bands = metrics.get("froc_by_size_band") or {}
    gen = (metrics.get("generator_sensitivity") or {}).get("size_band") or {}
    if bands:
        out += ["* Held-out FROC by nodule size band (nodules of the other bands count as",
                "  irrelevant findings; generator = found by the candidate generator):", "",
                "| size band | nodules | generator | sensitivity at 1/8 .. 8 FPs/scan | CPM |",
                "|---|---|---|---|---|"]
        for name, b in bands.items():
            sens = ", ".join(_fmt(v, 2) for v in b.get("sensitivity_at") or [])
            cpm = b.get("cpm_note") or _fmt(b.get("cpm"))
            out.append(f"| {name} | {b.get('n_nodules')} | {gen.get(name, 'n/a')} | {sens} "
                       f"| {cpm} |")
        out.append("")
    small = metrics.get("generator_sensitivity_small_set")
    if small and "found" in small:
        out.append(f"* Candidate generator on a separate small-nodule held-out set "
                   f"({small['scans']} volumes, diameters {tuple(small['diameter_range_mm'])} "
                   f"mm): found {small['found']}.")
    real = training_data.get("real_negative_scans") or []
    for r in real:
        slab = (f" in z = {tuple(r['z_mm'])} mm only (the rest of the scan unseen)"
                if r.get("z_mm") else "")
        out.append(f"* Real negatives in training: `{r['ct']}`, {r['negatives']} of its "
                   f"{r['candidates']} generator candidates{slab} ({r['patches']} patches), "
                   f"{r['reader_marks_excluded']} reader marks kept out.")
        ins = r.get("insertion")
        if ins:
            where = f" in z = {tuple(r['z_mm'])} mm" if r.get("z_mm") else ""
            out.append(f"  It was also an insertion background: {ins['rounds']} rounds, "
                       f"{ins['inserted_nodules']} synthetic nodules{where} "
                       f"({ins['positive_patches']} positive, {ins['negative_patches']} "
                       f"negative patches of its vessels and candidates).")
    ctx = metrics.get("context_fusion")
    if ctx:
        rec = ctx.get("record") or {}
        cal = ctx.get("calibration") or {}
        out += ["", "### Context features (late fusion)", "",
                f"The CNN logit is fused with the context features {ctx.get('features')} "
                f"(`cad_node/pipelines/ct_chest/features.py`) by a logistic regression, "
                f"weights {rec.get('weights')} (logit first), intercept {rec.get('intercept')}, "
                f"fitted on {cal.get('rounds')} fresh insertion rounds of the training slab "
                f"and the training part of the real negative scans ({cal.get('positives')} "
                f"positive, {cal.get('negatives')} negative candidates).  The CNN had seen the "
                f"backgrounds' structures as negatives."]
    byf = metrics.get("froc_by_fusion") or {}
    abl = (metrics.get("operating_point") or {}).get("ablation") or {}
    if byf:
        out += ["", "Ablation (one fusion per feature, fitted and measured the same way; "
                "each variant gets its own threshold by the rule):", "",
                "| fusion | held-out CPM | threshold | held-out TP/FP at it | "
                "background: reference / others | test scans: FPs (unseen part) |",
                "|---|---|---|---|---|---|"]
        for name, f in byf.items():
            a = abl.get(name) or {}
            h = a.get("heldout_synthetic") or {}
            b = a.get("background_scan") or {}
            t = "; ".join(f"{x['scan']} {x['false_positives']} ({x['false_positives_unseen']})"
                          for x in a.get("test_scans") or []) or "n/a"
            out.append(f"| {name} | {_fmt(f.get('cpm'))} | {a.get('threshold', 'n/a')} | "
                       f"{h.get('true_positives', 'n/a')}/{h.get('false_positives', 'n/a')} | "
                       f"{b.get('reference_found', 'n/a')} / {b.get('others_above', 'n/a')} | "
                       f"{t} |")
    op = metrics.get("operating_point")
    if op:
        h = op.get("heldout_synthetic") or {}
        out += ["", "### Operating point", "",
                f"Threshold **{op.get('threshold')}** on the `ct-chest` pipeline's final "
                f"probability, chosen by `cad-train` with this rule: {op.get('rule')}.", "",
                f"* Held-out synthetic set at that threshold: {h.get('true_positives')}/"
                f"{h.get('nodules')} nodules found (sensitivity {_fmt(h.get('sensitivity'))}), "
                f"{h.get('false_positives')} false positives in {h.get('scans')} scans "
                f"({_fmt(h.get('fp_per_scan'), 2)} per scan)."]
        b = op.get("background_scan")
        if b:
            where = "; ".join(f"p {f['probability']} at {tuple(f['center_mm'])} mm ({f['label']})"
                              for f in b.get("findings_above") or []) or "none"
            out.append(f"* Real scan `{b['scan']}` (the background CT; its reference nodule was "
                       f"kept out of training): reference nodule found "
                       f"{b['reference_found']}/{b['reference_nodules']}, "
                       f"{b['others_above']} other finding(s) at or above the threshold: "
                       f"{where}.")
        for r in op.get("real_negative_scans") or []:
            if b and r["scan"] == b["scan"]:  # the background, capped by the rule (above)
                continue
            where = "; ".join(f"p {f['probability']} at {tuple(f['center_mm'])} mm ({f['label']})"
                              for f in r.get("findings_above") or []) or "none"
            out.append(f"* Real negative scan `{r['scan']}`: **{r['false_positives']} false "
                       f"positive(s)** at the threshold; findings at or above it: {where}. "
                       + ("This scan also set the threshold (the rule) and gave training "
                          "negatives: this is not an independent test."
                          if any(t.get("ct") == r["scan"] for t in real) else
                          "This scan set the threshold (the rule; it gave no training "
                          "data): this is not an independent test."))
        for r in op.get("test_scans") or []:
            where = "; ".join(
                f"p {f['probability']} at {tuple(f['center_mm'])} mm ({f['label']}"
                + (", in the slab that gave training negatives" if f.get("in_training_slab")
                   else "") + ")"
                for f in r.get("findings_above") or []) or "none"
            slab = r.get("training_negatives_z_mm")
            out.append(
                f"* Test scan `{r['scan']}` (the rule never saw it): **{r['false_positives']} "
                f"false positive(s)** at the threshold, {r['false_positives_unseen']} of them "
                f"where it gave no training data "
                + (f"(training negatives came from z = {tuple(slab)} mm)" if
                   isinstance(slab, list) else "(it gave none)" if slab is None else
                   "(the whole scan gave training negatives)")
                + f"; {r['irrelevant_findings_above']} on its irrelevant finding; findings at "
                f"or above it: {where}; highest below: {r.get('highest_below')}.")
        out.append("")
    return "\n".join(out) + ("\n" if out else "")


def render_model_card(
    cfg: Any,
    training_data: Mapping[str, Any],
    metrics: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> str:
    """Render ``MODEL_CARD.md`` from the training config, data counts and metrics.

    Parameters
    ----------
    cfg : trainer.train.TrainConfig
        The training configuration.
    training_data : mapping
        Data description and counts (``training_data`` of the checkpoint).
    metrics : mapping
        Measured metrics (held-out evaluation).
    provenance : mapping
        Trainer provenance (parameters, wall time, device).
    """
    froc = metrics.get("froc") or {}
    rates = froc.get("fp_rates") or []
    sens = froc.get("sensitivity_at") or []
    lo = froc.get("ci_lower") or []
    hi = froc.get("ci_upper") or []
    froc_rows = "\n".join(
        f"| {r:g} | {_fmt(s)} | "
        + (f"{lo[i]:.3f}-{hi[i]:.3f}" if i < len(lo) and i < len(hi) else "n/a")
        + " |"
        for i, (r, s) in enumerate(zip(rates, sens, strict=False))
    )
    cpm_ci = froc.get("cpm_ci")
    kinds = training_data.get("kinds", {})
    places = training_data.get("placements", {})
    excl = training_data.get("excluded_regions", [])
    excl_txt = "; ".join(
        f"centre {tuple(e['center_mm'])} mm, radius {e['radius_mm']} mm"
        + (f" ({e['note']})" if e.get("note") else "")
        for e in excl
    ) or "none"
    real = metrics.get("real_nodule_probability")
    lidc = training_data.get("lidc") or {}
    lidc_txt = (
        f"* Real annotated scans (`cad-train prepare lidc` output `{lidc.get('folder')}`): "
        f"{lidc.get('cases')} scans, {lidc.get('nodules')} LUNA16 consensus nodules, "
        f"{lidc.get('positive_patches')} positive and {lidc.get('negative_patches')} "
        "negative patches.\n"
        if lidc
        else "* No real annotated nodules were used.\n"
    )
    gen_sens = metrics.get("generator_sensitivity") or {}
    fpr = metrics.get("froc_fp_reduction") or {}
    fpr_rows = ", ".join(
        f"{s:.2f} @ {r:g}"
        for r, s in zip(fpr.get("fp_rates") or [], fpr.get("sensitivity_at") or [], strict=False)
    ) or "n/a"
    return f"""# Model card: {cfg.bundle.name} {cfg.bundle.version}

**Not for diagnostic use.** Research and engineering model; outputs must not be
used for clinical decisions.

## What it does
Scores lung-nodule *candidates* on chest CT (false-positive reduction in the
`ct-chest` pipeline): given a candidate centre it returns the probability that a
nodule is there. Input: a {tuple(cfg.input.patch_size)} voxel patch at
{tuple(cfg.input.spacing_mm)} mm, HU window {tuple(cfg.input.hu_window)}.
Network: small 3-D residual CNN from MONAI blocks
({provenance.get("parameters", "n/a")} parameters), architecture
`{dict(cfg.architecture)}`.

## Training data
This is a **small model trained on very little real data**:

* Background: **{len(training_data.get("background_ct", []))} real chest CT**
  (`{", ".join(training_data.get("background_ct", []))}`), slab
  z = {tuple(training_data.get("train_z_mm", []))} mm, with lungs from the node's own
  segmentation.
* Positives: **{training_data.get("inserted_nodules", "n/a")} synthetic nodules** inserted
  over {training_data.get("rounds", "n/a")} rounds (`trainer/insertion.py`), diameter
  {tuple(training_data.get("diameter_range_mm", []))} mm log-uniform; types {kinds};
  placements {places}; {training_data.get("positive_patches", "n/a")} positive patches.
* Negatives: {training_data.get("negative_patches", "n/a")} patches of real structures of
  the same volumes (sources: {training_data.get("negative_sources", {})}; candidate
  generator: `{training_data.get("candidate_generator", "n/a")}`).
{lidc_txt}* **Excluded** from positives and negatives: {excl_txt}. This is the real
  LIDC-IDRI-0001 nodule, so the CT pipeline finding it is generalisation from
  synthetic nodules, not memorisation.

## Evaluation (measured, held-out synthetic-insertion set)
Held-out set: {metrics.get("heldout_scans", "n/a")} volumes with different random seeds and
a separate slab z = {tuple(training_data.get("heldout_z_mm", []))} mm of the same CT
({metrics.get("heldout_nodules", "n/a")} inserted nodules). Candidates come from
`{metrics.get("candidate_source", "n/a")}` and are scored by this model (end to end).

* Patch-level ROC AUC (inserted-nodule centres vs. real negative candidates,
  {metrics.get("heldout_negative_patches", "n/a")} negatives):
  **{_fmt(metrics.get("patch_auc"))}**; against
  {metrics.get("heldout_vessel_patches", "n/a")} vessel/dense-structure points of the slab:
  **{_fmt(metrics.get("patch_auc_vs_vessels"))}**
* LUNA16 FROC (`trainer/froc.py`; hit = centre within the radius, strict; at most
  100 candidates per scan; 95 % bootstrap CI over scans, 1000 resamples):

| FPs/scan | sensitivity | 95 % CI |
|---|---|---|
{froc_rows or "| n/a | n/a | n/a |"}

  **CPM {_fmt(froc.get("cpm"))}** (CI {cpm_ci if cpm_ci else "n/a"}); the candidate
  generator alone reaches sensitivity {_fmt(froc.get("max_sensitivity"))} (all its
  candidates kept), an upper bound for any scorer.
* The FROC above is limited by the candidate generator, which found
  {_fmt(froc.get("max_sensitivity"))} of the held-out nodules (by placement:
  {gen_sens.get("placement", "n/a")}; by type: {gen_sens.get("kind", "n/a")}).
  To measure the scorer itself, the LUNA16 false-positive-reduction-track style
  evaluation adds one candidate (within 2 mm of the centre) for every nodule the
  generator missed: sensitivity at {fpr_rows} FPs/scan,
  **CPM {_fmt(fpr.get("cpm"))}** (CI {fpr.get("cpm_ci", "n/a")}).
* Score at the (excluded) real LIDC-IDRI-0001 nodule centre: {real if real else "n/a"}.
* Final training loss {_fmt(metrics.get("final_training_loss"))}; training throughput
  during this run {_fmt(metrics.get("training_patches_per_s"), 1)} patches/s on
  {provenance.get("device")} (a shared, loaded 2-core machine; see
  `docs/benchmarks.md` for a benchmark).

{_extra_sections(metrics, training_data)}
These numbers are measured on synthetic insertions into the **same patient's**
CT; they say the model separates inserted nodules from that scan's vessels and
other structures. They are **not** an estimate of performance on real nodules
in other patients, scanners or protocols.

## Limitations
* One real background CT: no variation of scanner, reconstruction kernel, slice
  thickness, patient anatomy or disease (emphysema, fibrosis, effusions).
* Synthetic nodules are idealised (lobulated ellipsoids with texture); real
  spiculated, cavitating or calcified nodules are not modelled.
* Juxtapleural and juxtavascular placements are approximations.
* The probability is not calibrated to real-world nodule prevalence.
* The reported FROC depends on the candidate generator of the node version
  it was measured with; it missed juxtapleural held-out nodules most often.
* **A retrain on the full LIDC-IDRI** (1,018 CTs with 4-reader annotations,
  prepared by `cad-train prepare lidc`) **is the path to clinical-grade
  accuracy**: `data.lidc_prepared` in a training config mixes the prepared scans
  in (consensus nodules as positives, the node's candidates and vessels of the
  same scans as negatives, irrelevant findings as neither). The full set cannot
  be downloaded here, so this bundle only makes the pipeline work end to end out
  of the box.

## Intended use
{DEFAULT_INTENDED_USE}

## Provenance
Trained by `cad-train train {cfg.model}` (seed {provenance.get("seed")}, device
{provenance.get("device")}, world size {provenance.get("world_size")}, wall time
{provenance.get("wall_time_s")} s, torch {provenance.get("torch")}).
LIDC-IDRI data: Armato SG III et al., TCIA 2015, https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX
(CC BY 3.0). "The authors acknowledge the National Cancer Institute and the
Foundation for the National Institutes of Health, and their critical role in the
creation of the free publicly available LIDC/IDRI Database."
"""


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
    import torch

    SemVer.parse(version)
    target = models_dir / name / version
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; bump the version or pass --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is readable by the node's user
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
                "device_uid": device_uid_for(sha, (output_spec or {}).get("operating_threshold"),
                                             (output_spec or {}).get("context_fusion"),
                                             input_spec.get("harmonise_slice_thickness_mm"),
                                             input_spec.get("tta_flips")),
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
    import torch

    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{checkpoint}: not a readable checkpoint: {first}") from None
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
