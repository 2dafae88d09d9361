"""Live reload of peers, destinations and routing (SIGHUP, ``POST /api/reload``).

Contract of :meth:`LiveConfig.reload`
-------------------------------------
* The file is loaded and validated exactly as at start-up.  A file that does
  not load is rejected: the error is logged and audited and the running
  configuration stays as it was.
* Only ``peers``, ``destinations`` and ``routing`` are taken from the new
  file; a change anywhere else (ports, storage, timers...) is reported as
  needing a restart and not applied.
* The SCP takes the new peers through one call,
  ``NodeServer.admission.reconfigure(settings)``
  (:meth:`cad_node.scp.admission.Admission.reconfigure`): the next TCP
  accept and A-ASSOCIATE-RQ are decided with them, while associations in
  flight keep their slots and are not checked again, so nothing is dropped.
* Workers (separate processes) pick the new destinations and routing up at
  their next task: the reload writes ``<storage_dir>/config-generation``
  (atomically) and :func:`worker_settings` compares it before every task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cad_node.audit import AuditEvent, AuditLog, Outcome
from cad_node.config import ConfigError, Settings, load_config

__all__ = [
    "GENERATION_FILENAME",
    "PID_FILENAME",
    "LiveConfig",
    "ReloadResult",
    "merge_reloadable",
    "read_generation",
    "worker_baseline",
    "worker_settings",
]

LOG = logging.getLogger(__name__)

#: File below ``storage_dir`` that tells workers a reload happened.
GENERATION_FILENAME = "config-generation.json"
#: File below ``storage_dir`` holding the pid of the running ``cad-node serve``.
PID_FILENAME = "serve.pid"
#: Sections a reload applies.
RELOADABLE = ("peers", "destinations", "routing")


@dataclass
class ReloadResult:
    """What a reload did."""

    ok: bool
    error: str | None = None
    changes: list[str] = field(default_factory=list)
    #: Sections that changed in the file but need a restart.
    not_applied: list[str] = field(default_factory=list)
    generation: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON form (REST API)."""
        return {"ok": self.ok, "error": self.error, "changes": self.changes,
                "not_applied": self.not_applied, "generation": self.generation}


def merge_reloadable(current: Settings, new: Settings) -> Settings:
    """``current`` with the reloadable sections of ``new``."""
    return current.model_copy(update={k: getattr(new, k) for k in RELOADABLE})


def _describe(old: Settings, new: Settings) -> list[str]:
    changes: list[str] = []
    old_peers = {(p.ae_title, p.host) for p in old.peers}
    new_peers = {(p.ae_title, p.host) for p in new.peers}
    changes += [f"peer added {a}@{h}" for a, h in sorted(new_peers - old_peers)]
    changes += [f"peer removed {a}@{h}" for a, h in sorted(old_peers - new_peers)]
    old_d = {d.name: d for d in old.destinations}
    new_d = {d.name: d for d in new.destinations}
    changes += [f"destination added {n}" for n in sorted(set(new_d) - set(old_d))]
    changes += [f"destination removed {n}" for n in sorted(set(old_d) - set(new_d))]
    changes += [f"destination changed {n}" for n in sorted(set(old_d) & set(new_d))
                if old_d[n] != new_d[n]]
    if old.routing != new.routing:
        changes.append("routing rules: " + ", ".join(r.name for r in new.routing.rules)
                       if new.routing.rules else "routing rules: none (analyse nothing)")
    return changes


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_generation(storage_dir: str | os.PathLike[str]) -> int:
    """The reload generation recorded below ``storage_dir`` (0 before any reload)."""
    try:
        data = json.loads((Path(storage_dir) / GENERATION_FILENAME).read_text())
        return int(data.get("generation", 0))
    except (OSError, ValueError, AttributeError):
        return 0


class LiveConfig:
    """The running configuration of ``cad-node serve`` and its reload.

    Parameters
    ----------
    path : Path
        The configuration file.
    settings : Settings
        The configuration the node started with.
    server : object, optional
        The running :class:`cad_node.scp.NodeServer` (its ``admission`` is replaced).
    on_change : list of callable, optional
        Called with the new settings after a successful reload.
    """

    def __init__(self, path: Path, settings: Settings, server: Any = None,
                 on_change: list[Any] | None = None) -> None:
        self.path = Path(path)
        self._settings = settings
        self.server = server
        self.on_change = list(on_change or [])
        self._lock = threading.Lock()
        self.audit = AuditLog.for_settings(settings)
        self.generation = read_generation(settings.node.storage_dir)

    @property
    def settings(self) -> Settings:
        """The configuration in force."""
        return self._settings

    def write_pid(self) -> Path:
        """Record this process as the node to signal (``--reload`` of the admin commands)."""
        path = Path(self._settings.node.storage_dir) / PID_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, f"{os.getpid()}\n".encode())
        return path

    def reload(self, actor: str = "SIGHUP") -> ReloadResult:
        """Reload peers, destinations and routing from the file (see the module contract)."""
        with self._lock:
            old = self._settings
            try:
                fresh = load_config(self.path)
            except ConfigError as exc:
                LOG.error("reload rejected, configuration unchanged: %s", exc)
                self.audit.record(AuditEvent.CONFIG_CHANGED, outcome=Outcome.SERIOUS_FAILURE,
                                  actor=actor, file=str(self.path), change="reload rejected",
                                  error=str(exc))
                return ReloadResult(False, error=str(exc), generation=self.generation)
            not_applied = [k for k in type(old).model_fields
                           if k not in RELOADABLE and getattr(old, k) != getattr(fresh, k)]
            merged = merge_reloadable(old, fresh)
            changes = _describe(old, merged)
            if self.server is not None:
                # The one call into the SCP: its admission policy takes the new peers for
                # the next decision; associations in flight are not touched.
                self.server.admission.reconfigure(merged)
            self._settings = merged
            self.generation += 1
            digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
            _atomic_write(Path(merged.node.storage_dir) / GENERATION_FILENAME, json.dumps(
                {"generation": self.generation, "sha256": digest}).encode())
            for callback in self.on_change:
                try:
                    callback(merged)
                except Exception:
                    LOG.exception("reload callback failed")
            for warning in merged.warnings():
                LOG.warning("after reload: %s", warning)
            if not_applied:
                LOG.warning("reload: %s changed but need a restart (not applied)",
                            ", ".join(not_applied))
            LOG.info("configuration reloaded (generation %d): %s", self.generation,
                     "; ".join(changes) or "no change")
            self.audit.record(AuditEvent.CONFIG_CHANGED, actor=actor, file=str(self.path),
                              change="reload", generation=self.generation, changes=changes,
                              not_applied=not_applied)
            return ReloadResult(True, changes=changes, not_applied=not_applied,
                                generation=self.generation)


_worker_state: dict[str, Any] = {}


def worker_baseline(settings: Settings) -> None:
    """In a worker at start: the configuration just loaded is the current generation."""
    _worker_state["generation"] = read_generation(settings.node.storage_dir)


def worker_settings(current: Settings, config_path: str | None) -> Settings | None:
    """In a worker: the reloaded settings if ``serve`` reloaded since, else None.

    Parameters
    ----------
    current : Settings
        The settings the worker runs with.
    config_path : str, optional
        The configuration file the worker was started with.

    Returns
    -------
    Settings or None
        ``current`` with the new reloadable sections; None when nothing
        changed or the file does not load (the old configuration is kept
        and the error logged).
    """
    generation = read_generation(current.node.storage_dir)
    seen = _worker_state.setdefault("generation", generation)
    if generation == seen or config_path is None:
        return None
    _worker_state["generation"] = generation
    try:
        fresh = load_config(config_path)
    except ConfigError as exc:
        LOG.error("worker: reload rejected, configuration unchanged: %s", exc)
        return None
    LOG.info("worker: configuration reloaded (generation %d)", generation)
    return merge_reloadable(current, fresh)
