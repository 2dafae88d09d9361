"""``cad-train train MODEL CONFIG``: train the models the node ships.

First model: ``ct-nodule-scorer``, the CT nodule-candidate scorer
(false-positive reduction) of the ``ct-chest`` pipeline.

Training data (no large annotated set can be downloaded here)
--------------------------------------------------------------
* **Background**: one or more real chest CTs (the config's ``data.ct``; the
  shipped bundle uses LIDC-IDRI-0001).  Lungs come from the node's own
  :func:`cad_node.pipelines.ct_chest.lungs.segment_lungs`.
* **Positives**: synthetic nodules (:mod:`trainer.insertion`) inserted into
  the training slab (``data.train_z_mm``), patches centred on them with a
  small random offset, plus the real candidate-generator detections that hit
  them (centre within the radius).
* **Negatives**: the candidates the node's own generator
  (:func:`cad_node.pipelines.ct_chest.candidates.generate_candidates`)
  returns on the same volumes — vessels, bifurcations, pleura, diaphragm —
  plus local maxima of dense in-lung structures, excluding anything near an
  inserted nodule.
* **Exclusions**: ``data.exclusions`` (the real LIDC-IDRI-0001 nodule) are
  kept out of positives and negatives, so finding it later is honest
  generalisation.
* **Held-out set**: different seeds, a separate slab (``data.heldout_z_mm``),
  evaluated end to end (candidate generator + scorer) with the LUNA16 FROC.

Training
--------
Deterministic seeds (torch, numpy, :func:`monai.utils.set_determinism`),
checkpoints every epoch (``last.pt``) and ``--resume``, mixed precision on CUDA
only, MONAI augmentations (flips, 90-degree rotations, intensity jitter) and
DDP when launched by ``torchrun`` (``WORLD_SIZE > 1``: ``gloo`` on CPU,
``nccl`` on GPU; rank 0 builds the data cache and writes checkpoints).

Usage::

    cad-train train ct-nodule-scorer trainer/configs/ct-nodule-scorer.yaml --out runs/scorer
    cad-train train ct-nodule-scorer CONFIG --out runs/scorer --resume     # after an interruption
    cad-train train ct-nodule-scorer CONFIG --out runs/scorer --evaluate-only
    torchrun --nproc-per-node=4 "$(which cad-train)" train ct-nodule-scorer CONFIG --out runs/ddp
    cad-train export runs/scorer/final.pt --models-dir models

Each DDP process sees a disjoint, equally long shard of every epoch's
permutation (``DistributedSampler(drop_last=True)`` semantics, see
:mod:`trainer.loop`), so every rank runs the same number of optimizer steps;
the per-process batch size is ``optim.batch_size`` (the effective batch is
``world_size`` times larger).  The tests exercise this path with two CPU
processes and ``gloo`` on an uneven data set.

Modules
-------
:mod:`trainer.config` (the YAML config), :mod:`trainer.data` (backgrounds,
labelling, patch cutting), :mod:`trainer.loop` (seeding, sharding, epochs),
:mod:`trainer.checkpoint` (``last.pt``/``final.pt``), :mod:`trainer.heldout`
(held-out evaluation); this module orchestrates them and holds the CLI.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cad_node.models.device import torch_device
from trainer.checkpoint import load_last, save_last, write_final
from trainer.config import (
    MODELS,
    AugmentConfig,
    InputConfig,
    TrainConfig,
    load_train_config,
    resolve_ct_dir,
)
from trainer.data import (
    DENSE_HU,
    PatchSet,
    RealNodule,
    cut_patches,
    dense_structure_points,
    label_points,
    load_background,
    load_ct,
    lung_mask_of,
    prepare_data,
    training_data_summary,
)
from trainer.heldout import MAX_CANDIDATES_PER_SCAN, evaluate_heldout_set, score_points
from trainer.loop import TrainState, distributed, run_epoch, seed_all, steps_per_epoch

__all__ = [
    "DENSE_HU",
    "MAX_CANDIDATES_PER_SCAN",
    "MODELS",
    "AugmentConfig",
    "InputConfig",
    "PatchSet",
    "RealNodule",
    "TrainConfig",
    "cut_patches",
    "dense_structure_points",
    "label_points",
    "load_ct",
    "load_train_config",
    "lung_mask_of",
    "prepare_data",
    "reevaluate",
    "register",
    "resolve_ct_dir",
    "score_points",
    "train",
]

_console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console,
        transient=False,
    )


def _load_or_prepare_cache(
    cfg: TrainConfig, out_dir: Path, config_dir: Path | None, progress: Progress,
    *, is_main: bool, world: int,
) -> tuple[Any, Any, dict[str, Any], Any]:
    """Rank 0 builds ``data.npz`` once; every rank then reads it."""
    import torch

    cache = out_dir / "data.npz"
    counts_file = out_dir / "data_counts.json"
    bg = None
    if is_main and not (cache.is_file() and counts_file.is_file()):
        bg = load_background(cfg, config_dir, progress)
        data = prepare_data(cfg, bg, progress, config_dir)
        np.savez(cache, x=data.x, y=data.y)
        counts_file.write_text(json.dumps(data.counts, indent=2), encoding="utf-8")
    if world > 1:
        torch.distributed.barrier()
    with np.load(cache) as npz:
        x_all, y_all = npz["x"], npz["y"]
    counts = json.loads(counts_file.read_text(encoding="utf-8"))
    return x_all, y_all, counts, bg


def _steps_of_all_ranks(steps: int, world: int) -> list[int]:
    """Optimizer steps of every rank (an all-gather; just ``[steps]`` alone)."""
    if world <= 1:
        return [steps]
    import torch
    import torch.distributed as dist

    mine = torch.tensor([steps], dtype=torch.int64)
    everyone = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(everyone, mine)
    return [int(t.item()) for t in everyone]


def train(
    cfg: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    device: str = "auto",
    config_dir: Path | None = None,
    evaluate_heldout: bool = True,
    stop_after_epochs: int | None = None,
) -> Path:
    """Train the CT nodule-candidate scorer; return the final checkpoint path.

    Writes ``out_dir/data.npz`` (patch cache), ``last.pt`` every epoch,
    ``final.pt``, ``metrics.json`` and ``MODEL_CARD.md`` (with the held-out
    evaluation when ``evaluate_heldout``).

    ``stop_after_epochs`` stops this invocation after that many epochs
    (a time-boxed run, or a simulated interruption) and returns ``last.pt``;
    ``resume=True`` later continues exactly where it stopped: data order,
    augmentation and dropout are seeded per epoch, and the optimiser,
    scheduler, GradScaler and torch RNG states are restored, so an
    interrupted and resumed run ends with the same weights as an
    uninterrupted one.

    Raises
    ------
    ValueError
        CUDA requested but not available, or an invalid data set.
    """
    import torch

    from cad_node.models.network import build_network, count_parameters

    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.optim.threads > 0:
        torch.set_num_threads(cfg.optim.threads)
    seed_all(cfg.seed)
    dev = torch_device(device)
    t_start = time.perf_counter()
    with distributed() as (rank, world), _progress() as progress:
        is_main = rank == 0
        if world > 1 and dev.type == "cuda":
            dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        x_all, y_all, counts, bg = _load_or_prepare_cache(
            cfg, out_dir, config_dir, progress, is_main=is_main, world=world
        )
        state = _new_state(cfg, x_all.shape[0], float(y_all.sum()), dev, world, build_network)
        last = out_dir / "last.pt"
        if resume and last.is_file():
            load_last(last, state)
            _console.print(f"resumed from {last} at epoch {state.start_epoch}")
        ep_task = progress.add_task("epochs", total=cfg.optim.epochs, completed=state.start_epoch)
        seen = 0
        t_train = time.perf_counter()
        end_epoch = cfg.optim.epochs
        if stop_after_epochs is not None:
            end_epoch = min(end_epoch, state.start_epoch + stop_after_epochs)
        for epoch in range(state.start_epoch, end_epoch):
            res = run_epoch(
                state, x_all, y_all, epoch=epoch, seed=cfg.seed,
                batch_size=cfg.optim.batch_size, augment=cfg.optim.augment,
                rank=rank, world=world, dev=dev, progress=progress,
            )
            seen += res.samples
            state.history.append({"epoch": epoch + 1, "loss": res.mean_loss})
            if is_main:
                save_last(last, state, epoch, cfg)
            progress.advance(ep_task)
        train_s = time.perf_counter() - t_train
        steps_per_rank = _steps_of_all_ranks(state.steps, world)
        if world > 1:
            torch.distributed.barrier()
        if end_epoch < cfg.optim.epochs:
            return last
        if not is_main:
            return out_dir / "final.pt"

        state.net.eval()
        metrics: dict[str, Any] = {
            "final_training_loss": state.history[-1]["loss"] if state.history else None,
            "training_patches_per_s": seen / train_s if train_s > 0 and seen else None,
        }
        if evaluate_heldout:
            if bg is None:
                bg = load_background(cfg, config_dir, progress)
            metrics.update(_evaluate(cfg, bg, state.net, dev, progress, config_dir))
        provenance = {
            "trainer": "cad-train train",
            "config": cfg.model_dump(mode="json"),
            "seed": cfg.seed,
            "parameters": count_parameters(state.net),
            "device": str(dev),
            "world_size": world,
            "optimizer_steps_per_rank": steps_per_rank,
            "wall_time_s": round(time.perf_counter() - t_start, 1),
            "torch": torch.__version__,
        }
        return write_final(
            out_dir, state, cfg,
            training_data=training_data_summary(cfg, counts, x_all.shape[0]),
            metrics=metrics, provenance=provenance,
        )


def _evaluate(
    cfg: TrainConfig, bg: Any, net: Any, dev: Any, progress: Progress, config_dir: Path | None
) -> dict[str, Any]:
    """Context fusion (when configured), held-out evaluation, then the operating-point rule.

    With ``context`` the fusion of ``context.features`` is fitted on fresh data
    (:func:`trainer.context.calibration_set`) and scores the held-out set and the
    pipeline runs; with ``context.ablation`` every variant of
    :func:`trainer.context.variant_names` is fitted and measured too.
    """
    volumes: list[tuple[Any, Any]] = []
    keep = None if cfg.operating_point is None else (lambda hu, t: volumes.append((hu, t)))
    fusions = None
    primary = None
    context: dict[str, Any] = {}
    if cfg.context is not None:
        from cad_node.pipelines.ct_chest.features import ContextFusion
        from trainer.context import calibration_set, fit_variants

        cal = calibration_set(cfg, bg, net, dev, config_dir, progress)
        feats = tuple(cfg.context.features)
        primary = f"+{'+'.join(feats)}" if feats else "cnn only"
        fusions = fit_variants(cal, feats, cfg.context.l2) if cfg.context.ablation else {}
        fusions = {k: v for k, v in fusions.items() if tuple(v.features) != feats}
        if cfg.context.ablation:  # the CNN's own sigmoid, as a bundle without fusion
            fusions["cnn (no fusion)"] = ContextFusion((), (1.0,), 0.0)
        fusions[primary] = ContextFusion.fit(cal.logits, cal.features, cal.labels, feats,
                                             l2=cfg.context.l2)
        context = {"features": list(feats), "name": primary,
                   "record": fusions[primary].to_mapping(), "calibration": cal.counts,
                   "variants": {k: v.to_mapping() for k, v in fusions.items()}}
    metrics = evaluate_heldout_set(cfg, bg, net, dev, progress, on_volume=keep,
                                   fusions=fusions, primary=primary)
    if context:
        metrics["context_fusion"] = context
    if cfg.operating_point is not None:
        from trainer.operating_point import measure_operating_point

        task = progress.add_task("operating point (pipeline runs)", total=1)
        metrics["operating_point"] = measure_operating_point(
            cfg, net, bg, volumes, config_dir, fusions=fusions, primary=primary)
        progress.advance(task)
    return metrics


def _new_state(
    cfg: TrainConfig, n: int, n_pos: float, dev: Any, world: int, build_network: Any
) -> TrainState:
    """Network, optimiser, one-cycle schedule, GradScaler and weighted BCE of a run."""
    import torch

    net = build_network(cfg.architecture)
    if cfg.optim.init_weights is not None:
        path = Path(cfg.optim.init_weights)
        if not path.is_absolute():
            path = Path(__file__).resolve().parent.parent / path
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net = net.to(dev)
    model: torch.nn.Module = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr,
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.optim.lr,
        total_steps=cfg.optim.epochs * steps_per_epoch(n, world, cfg.optim.batch_size),
    )
    use_amp = cfg.optim.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    pos_weight = torch.tensor((n - n_pos) / max(n_pos, 1.0), device=dev)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    return TrainState(net=net, model=model, optimizer=opt, scheduler=sched, scaler=scaler,
                      loss_fn=loss_fn, use_amp=use_amp)


def reevaluate(
    cfg: TrainConfig, out_dir: Path, *, device: str = "auto", config_dir: Path | None = None
) -> Path:
    """Re-run the held-out evaluation of a finished run (``final.pt``).

    The held-out set is regenerated from the config's seed (identical to the
    one of the run), the metrics in ``final.pt``, ``metrics.json`` and
    ``MODEL_CARD.md`` are replaced; the weights are not touched.
    """
    import torch

    from cad_node.models.network import build_network
    from trainer.checkpoint import bundle_meta, plain
    from trainer.export import render_model_card

    final = out_dir / "final.pt"
    if not final.is_file():
        raise FileNotFoundError(f"{final}: no finished run to evaluate")
    ck = torch.load(final, map_location="cpu", weights_only=True)
    if cfg.optim.threads > 0:
        torch.set_num_threads(cfg.optim.threads)
    dev = torch_device(device)
    net = build_network(ck["bundle"]["architecture"])
    net.load_state_dict(ck["model"])
    net.to(dev).eval()
    with _progress() as progress:
        bg = load_background(cfg, config_dir, progress)
        heldout = _evaluate(cfg, bg, net, dev, progress, config_dir)
    metrics = {k: v for k, v in ck["metrics"].items() if k in {
        "final_training_loss", "training_patches_per_s"}}
    metrics.update(heldout)
    ck["metrics"] = plain(metrics)
    # the input spec the evaluation ran with (e.g. its slice-profile harmonisation)
    ck["bundle"]["input"] = plain(bundle_meta(cfg)["input"])
    if "operating_point" in ck["metrics"] or "context_fusion" in ck["metrics"]:
        ck["bundle"]["output"] = plain(bundle_meta(
            cfg, ck["metrics"].get("operating_point"),
            (ck["metrics"].get("context_fusion") or {}).get("record"))["output"])
    torch.save(ck, out_dir / "final.tmp")
    (out_dir / "final.tmp").replace(final)
    (out_dir / "metrics.json").write_text(json.dumps(ck["metrics"], indent=2), encoding="utf-8")
    (out_dir / "MODEL_CARD.md").write_text(
        render_model_card(cfg, ck["training_data"], ck["metrics"], ck["provenance"]),
        encoding="utf-8",
    )
    return final


# --------------------------------------------------------------------------- CLI


def register(app: typer.Typer) -> None:
    """Add ``cad-train train`` to ``app``."""

    @app.command("train")
    def train_cmd(
        model: Annotated[
            str, typer.Argument(
                help=f"Model to train: {', '.join(MODELS)}, cxr-lungs, cxr-abnormal, cxr-tb, "
                     "ct-lesion.")
        ],
        config: Annotated[Path, typer.Argument(help="YAML training config.")],
        out: Annotated[
            Path | None, typer.Option(help="Run directory (default runs/<model>).")
        ] = None,
        resume: Annotated[bool, typer.Option(help="Resume from out/last.pt.")] = False,
        device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
        evaluate: Annotated[
            bool, typer.Option(help="Evaluate on the held-out insertion set.")
        ] = True,
        evaluate_only: Annotated[
            bool,
            typer.Option(help="Only re-run the held-out evaluation of out/final.pt."),
        ] = False,
    ) -> None:
        """Train MODEL with CONFIG; writes checkpoints, metrics and a model card."""
        if model == "ct-lesion":  # the lesion detector has its own trainer
            from trainer import ct_lesion

            try:
                lcfg = ct_lesion.load_config(config)
                final = ct_lesion.train_ct_lesion(lcfg, out or Path("runs") / model,
                                                  config_dir=config.parent)
            except (ValueError, FileNotFoundError) as exc:
                _console.print(f"[red]error:[/red] {exc}")
                raise typer.Exit(2) from None
            _console.print(f"final checkpoint: {final}")
            return
        if model == "cxr-tb":  # the chest X-ray TB head: trainer.cxr_tb
            from trainer.cxr_tb import train_command as tb_train

            try:
                bundle_dir = tb_train(config, out, None)
            except (ValueError, FileNotFoundError) as exc:
                _console.print(f"[red]error:[/red] {exc}")
                raise typer.Exit(2) from None
            _console.print(f"bundle: {bundle_dir}")
            return
        if model == "cxr-abnormal":  # chest radiographs, issue #12: trainer.cxr_abnormal_train
            from trainer.cxr_abnormal_train import train_command as abnormal_train

            try:
                bundle_dir = abnormal_train(config, out, None, cross_validation=evaluate)
            except (ValueError, FileNotFoundError, FileExistsError) as exc:
                _console.print(f"[red]error:[/red] {exc}")
                raise typer.Exit(2) from None
            _console.print(f"bundle: {bundle_dir}")
            return
        if model in ("cxr-lungs",):  # chest radiographs: trainer.cxr_lungs
            from trainer.cxr_lungs import train_command as cxr_train

            try:
                bundle_dir = cxr_train(model, config, out, None, force=False)
            except (ValueError, FileNotFoundError) as exc:
                _console.print(f"[red]error:[/red] {exc}")
                raise typer.Exit(2) from None
            _console.print(f"bundle: {bundle_dir}")
            return
        try:
            cfg = load_train_config(config)
            if cfg.model != model:
                raise ValueError(f"{config}: config is for {cfg.model!r}, not {model!r}")
            run_dir = out or Path("runs") / model
            if evaluate_only:
                final = reevaluate(cfg, run_dir, device=device, config_dir=config.parent)
                _console.print(f"re-evaluated: {final}")
                return
            final = train(
                cfg,
                run_dir,
                resume=resume,
                device=device,
                config_dir=config.parent,
                evaluate_heldout=evaluate,
            )
        except (ValueError, FileNotFoundError) as exc:
            _console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        _console.print(f"final checkpoint: {final}")
