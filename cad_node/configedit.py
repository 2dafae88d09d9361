"""Edit the configuration file in place: atomically, validated, comments and order kept.

Used by ``cad-node peers add|remove`` and ``cad-node destinations add|remove``.

Contract of :func:`edit_config`
-------------------------------
* The file is read with ruamel.yaml's round-trip loader, so comments, key
  order and flow/block styles of untouched entries survive.
* The edited text is validated with :func:`cad_node.config.load_config`
  (the same checks as start-up, ``CAD_NODE_*`` overrides included) *before*
  it replaces the file; an invalid result raises :class:`ConfigError` and the
  file is untouched.
* The new file is written next to the old one, fsynced, renamed over it and
  the directory fsynced: a crash leaves either the old or the new file.
* A ``config-changed`` audit event names the actor and the change.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from cad_node.config import ConfigError, Settings, load_config

__all__ = [
    "add_destination",
    "add_peer",
    "edit_config",
    "remove_destination",
    "remove_peer",
]


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    y.representer.add_representer(type(None), _represent_null)
    return y


def _represent_null(representer: Any, _data: None) -> Any:
    """Write ``null`` (as the shipped file does), not an empty value."""
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def edit_config(path: str | os.PathLike[str], change: Callable[[CommentedMap], str], *,
                actor: str) -> tuple[Settings, str]:
    """Apply ``change`` to the YAML document at ``path`` and replace the file atomically.

    Parameters
    ----------
    path : path-like
        The configuration file.
    change : callable
        Mutates the round-trip document in place and returns a one-line
        description of the change (for the audit trail); raises
        :class:`ConfigError` when the change is not possible.
    actor : str
        Who asked (audit trail).

    Returns
    -------
    (Settings, str)
        The validated new configuration and the change description.

    Raises
    ------
    ConfigError
        The file is unreadable, the change impossible, or the result invalid
        (the message names the key); the file is then unchanged.
    """
    cfg = Path(path)
    y = _yaml()
    try:
        doc = y.load(cfg.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {cfg}: {exc.strerror}") from None
    except Exception as exc:  # ruamel's YAMLError hierarchy
        raise ConfigError(f"{cfg}: not valid YAML: {exc}") from None
    if doc is None:
        doc = CommentedMap()
    if not isinstance(doc, CommentedMap):
        raise ConfigError(f"{cfg}: top level must be a mapping of sections")
    description = change(doc)
    buf = io.StringIO()
    y.dump(doc, buf)
    text = buf.getvalue()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{cfg.name}.", suffix=".tmp", dir=cfg.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            settings = load_config(tmp)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(tmp), str(cfg))) from None
        try:
            os.chmod(tmp, cfg.stat().st_mode & 0o7777)
        except OSError:
            pass
        os.replace(tmp, cfg)
        _fsync_dir(cfg.parent)
    finally:
        tmp.unlink(missing_ok=True)
    from cad_node.audit import AuditEvent, AuditLog

    AuditLog.for_settings(settings).record(AuditEvent.CONFIG_CHANGED, actor=actor,
                                           file=str(cfg.resolve()), change=description)
    return settings, description


def _section(doc: CommentedMap, key: str) -> CommentedSeq:
    seq = doc.get(key)
    if seq is None:
        seq = CommentedSeq()
        doc[key] = seq
    if not isinstance(seq, list):
        raise ConfigError(f"{key}: must be a list")
    return seq  # type: ignore[return-value]


def _flow(entry: dict[str, Any]) -> CommentedMap:
    item = CommentedMap(entry)
    item.fa.set_flow_style()
    return item


def add_peer(path: str | os.PathLike[str], ae_title: str, host: str, *,
             actor: str) -> tuple[Settings, str]:
    """Append ``{ae_title, host}`` to ``peers`` (an exact duplicate is refused)."""
    def change(doc: CommentedMap) -> str:
        peers = _section(doc, "peers")
        for p in peers:
            if isinstance(p, dict) and p.get("ae_title") == ae_title and p.get("host") == host:
                raise ConfigError(f"peers: {ae_title}@{host} is already a peer")
        peers.append(_flow({"ae_title": ae_title, "host": host}))
        return f"peers: added {ae_title}@{host}"

    return edit_config(path, change, actor=actor)


def remove_peer(path: str | os.PathLike[str], ae_title: str, host: str | None = None, *,
                actor: str) -> tuple[Settings, str]:
    """Remove the peers with AE title ``ae_title`` (and ``host``, when given)."""
    def change(doc: CommentedMap) -> str:
        peers = _section(doc, "peers")
        keep = [p for p in peers if not (isinstance(p, dict) and p.get("ae_title") == ae_title
                                         and (host is None or p.get("host") == host))]
        removed = len(peers) - len(keep)
        if not removed:
            where = f"@{host}" if host else ""
            raise ConfigError(f"peers: no peer {ae_title}{where}")
        for i in range(len(peers) - 1, -1, -1):
            if peers[i] not in keep:
                del peers[i]
        return f"peers: removed {removed} entr{'y' if removed == 1 else 'ies'} {ae_title}" + (
            f"@{host}" if host else "")

    return edit_config(path, change, actor=actor)


def add_destination(path: str | os.PathLike[str], name: str, ae_title: str, host: str,
                    port: int, objects: list[str] | None = None, *,
                    actor: str) -> tuple[Settings, str]:
    """Append a destination (its name must be new)."""
    def change(doc: CommentedMap) -> str:
        dests = _section(doc, "destinations")
        if any(isinstance(d, dict) and d.get("name") == name for d in dests):
            raise ConfigError(f"destinations: {name!r} already exists")
        entry: dict[str, Any] = {"name": name, "ae_title": ae_title, "host": host, "port": port}
        if objects:
            seq = CommentedSeq(objects)
            seq.fa.set_flow_style()
            entry["objects"] = seq
        dests.append(_flow(entry))
        return f"destinations: added {name} ({ae_title}@{host}:{port})"

    return edit_config(path, change, actor=actor)


def remove_destination(path: str | os.PathLike[str], name: str, *,
                       actor: str) -> tuple[Settings, str]:
    """Remove the destination called ``name``."""
    def change(doc: CommentedMap) -> str:
        dests = _section(doc, "destinations")
        for i, d in enumerate(dests):
            if isinstance(d, dict) and d.get("name") == name:
                del dests[i]
                return f"destinations: removed {name}"
        raise ConfigError(f"destinations: no destination named {name!r}")

    return edit_config(path, change, actor=actor)
