"""Safe configuration defaults, admin edits of the YAML, live reload and the audit file."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cad_node.audit import AUDIT_FILENAME, AuditEvent, AuditLog, read_events
from cad_node.cli import app
from cad_node.config import BUILTIN_RULES, ConfigError, load_config
from cad_node.configedit import add_destination, add_peer, remove_destination, remove_peer
from cad_node.live import LiveConfig, read_generation
from cad_node.scp.admission import Admission


def _cli(*args: str) -> Result:
    """Run the ``cad-node`` command line in-process (wide terminal, stdout and stderr apart)."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})

THREE_KEYS = """\
# the operator's own comment
node:   {ae_title: CADNODE, host: 0.0.0.0, port: 11112, storage_dir: ./var}
peers:  [{ae_title: MODALITY, host: 127.0.0.1}]       # who may send to us
destinations: [{name: pacs, ae_title: PACS, host: 127.0.0.1, port: 4242, objects: [sr, seg, sc]}]
"""


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "etc").mkdir(exist_ok=True)
    path = tmp_path / "etc" / "cad-node.yaml"
    path.write_text(text)
    return path


def test_no_routing_section_means_the_builtin_rules(tmp_path: Path) -> None:
    s = load_config(_write(tmp_path, THREE_KEYS), environ={})
    assert s.routing.builtin and s.routing.rules == BUILTIN_RULES
    assert s.routing.rules[0].pipeline == "ct-chest"
    assert s.warnings() == []
    s = load_config(_write(tmp_path, THREE_KEYS + "routing: {}\n"), environ={})
    assert s.routing.builtin and s.routing.rules == BUILTIN_RULES


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("shipped", ["config/cad-node.yaml", "docker/cad-node.yaml"])
def test_shipped_files_name_the_builtin_rules_instead_of_copying_them(shipped: str) -> None:
    """One truth per rule: the YAML files list built-in rules by name."""
    import yaml

    raw = yaml.safe_load((REPO / shipped).read_text())
    assert raw["routing"]["rules"] == ["chest-ct", "chest-xr"]
    s = load_config(REPO / shipped, environ={})
    assert s.routing.rules == BUILTIN_RULES
    assert s.routing.rules[1].match.modality == ["CR", "DX"]
    assert s.routing.rules[1].match.body_part is None  # the pipeline refuses, not the rule


def test_a_named_rule_mixes_with_written_rules_and_an_unknown_name_fails(tmp_path: Path
                                                                         ) -> None:
    extra = ("routing:\n  rules:\n    - chest-xr\n    - {name: mr, pipeline: ct-chest, "
             "match: {modality: [MR]}}\n")
    s = load_config(_write(tmp_path, THREE_KEYS + extra), environ={})
    assert [r.name for r in s.routing.rules] == ["chest-xr", "mr"]
    assert s.routing.rules[0] == BUILTIN_RULES[1] and not s.routing.builtin
    with pytest.raises(ConfigError, match=r"routing\.rules.*'chest-mr' is not a built-in"):
        load_config(_write(tmp_path, THREE_KEYS + "routing: {rules: [chest-mr]}\n"), environ={})


def test_empty_rules_mean_analyse_nothing_and_warn(tmp_path: Path) -> None:
    cfg = _write(tmp_path, THREE_KEYS + "routing: {rules: []}\n")
    s = load_config(cfg, environ={})
    assert s.routing.rules == [] and s.routing.analyses_nothing and not s.routing.builtin
    assert any("analyses nothing" in w for w in s.warnings())
    proc = _cli("config", "check", str(cfg))
    assert proc.exit_code == 0
    assert "warning: routing.rules is empty" in proc.stderr.replace("\n", " ")


def test_config_check_prints_the_effective_rules(tmp_path: Path) -> None:
    cfg = _write(tmp_path, THREE_KEYS)
    proc = _cli("config", "check", str(cfg))
    assert proc.exit_code == 0, proc.stderr
    assert "effective routing rules (built-in)" in proc.stdout
    assert "chest-ct" in proc.stdout and "ct-chest" in proc.stdout
    assert "min_instances=40" in proc.stdout


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _write(tmp_path, THREE_KEYS + "models: {dir: ../bundles}\n")
    monkeypatch.chdir(tmp_path)  # not the file's directory
    s = load_config(cfg, environ={})
    assert s.node.storage_dir == str(tmp_path / "etc" / "var")
    assert s.models.dir == str(tmp_path / "bundles")
    s = load_config(cfg, environ={"CAD_NODE_NODE__STORAGE_DIR": "/srv/cad"})
    assert s.node.storage_dir == "/srv/cad"
    # models.dir left at its default keeps the bundle lookup of default_models_dir().
    assert load_config(_write(tmp_path, THREE_KEYS), environ={}).models.dir == "models"


def test_admin_edits_keep_comments_and_order_and_validate(tmp_path: Path) -> None:
    cfg = _write(tmp_path, THREE_KEYS + "study: {study_quiet_s: 30}   # tail comment\n")
    before = load_config(cfg, environ={})
    add_peer(cfg, "CT1", "10.0.0.5", actor="t")
    add_destination(cfg, "archive", "ARCH", "10.0.0.9", 104, ["sr"], actor="t")
    text = cfg.read_text()
    assert "# the operator's own comment" in text and "# who may send to us" in text
    assert "# tail comment" in text
    assert [ln.split(":")[0] for ln in text.splitlines() if ln and ln[0].isalpha()] == [
        "node", "peers", "destinations", "study"]
    s = load_config(cfg, environ={})
    assert [(p.ae_title, p.host) for p in s.peers] == [("MODALITY", "127.0.0.1"),
                                                        ("CT1", "10.0.0.5")]
    assert s.destination("archive").objects == ["sr"]
    with pytest.raises(ConfigError, match=r"peers\.2\.ae_title"):
        add_peer(cfg, "WAY_TOO_LONG_AE_TITLE", "10.0.0.6", actor="t")
    with pytest.raises(ConfigError, match="already a peer"):
        add_peer(cfg, "CT1", "10.0.0.5", actor="t")
    with pytest.raises(ConfigError, match="no peer"):
        remove_peer(cfg, "NOPE", actor="t")
    assert load_config(cfg, environ={}).peers[-1].ae_title == "CT1"  # untouched by failures
    remove_peer(cfg, "CT1", actor="t")
    remove_destination(cfg, "archive", actor="t")
    assert load_config(cfg, environ={}) == before
    assert "# the operator's own comment" in cfg.read_text()
    assert not list(cfg.parent.glob(".*.tmp"))
    changes = [e["change"] for e in read_events(tmp_path / "etc" / "var" / "audit")]
    assert changes == ["peers: added CT1@10.0.0.5",
                       "destinations: added archive (ARCH@10.0.0.9:104)",
                       "peers: removed 1 entry CT1", "destinations: removed archive"]


def test_peers_cli_add_list_remove(tmp_path: Path) -> None:
    cfg = _write(tmp_path, THREE_KEYS)
    ok = _cli("peers", "add", "CT2", "10.1.1.1", "-c", str(cfg))
    assert ok.exit_code == 0, ok.stderr
    bad = _cli("peers", "add", "CT3", "not a host!", "-c", str(cfg))
    assert bad.exit_code == 2 and "peers.2.host" in bad.stderr
    listed = _cli("peers", "list", "-c", str(cfg))
    assert "CT2" in listed.stdout and "CT3" not in listed.stdout
    gone = _cli("peers", "remove", "CT2", "-c", str(cfg))
    assert gone.exit_code == 0 and "CT2" not in cfg.read_text()
    dest = _cli("destinations", "add", "arch", "ARCH", "10.1.1.2", "104", "--objects", "sr,kos",
                "-c", str(cfg))
    assert dest.exit_code == 0, dest.stderr
    assert load_config(cfg, environ={}).destination("arch").objects == ["sr", "kos"]
    assert _cli("destinations", "remove", "nope", "-c", str(cfg)).exit_code == 2


class _Server:
    """Stands in for the running NodeServer: only its ``admission`` policy is used."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission


def test_reload_reconfigures_admission_and_keeps_the_old_config_on_a_bad_file(
    tmp_path: Path,
) -> None:
    cfg = _write(tmp_path, THREE_KEYS)
    settings = load_config(cfg)
    policy = Admission(settings)
    server = _Server(policy)
    live = LiveConfig(cfg, settings, server)
    assert policy.check("NEWPEER", "CADNODE", "127.0.0.1") is not None
    in_flight = policy.open("127.0.0.1")  # a connection admitted before the reload
    assert policy.in_use == 1
    add_peer(cfg, "NEWPEER", "127.0.0.1", actor="t")
    remove_peer(cfg, "MODALITY", actor="t")
    result = live.reload("tester")
    assert result.ok
    assert result.changes == ["peer added NEWPEER@127.0.0.1", "peer removed MODALITY@127.0.0.1"]
    assert server.admission is policy and policy.in_use == 1  # its slot is kept
    assert policy.check("NEWPEER", "CADNODE", "127.0.0.1") is None
    assert policy.check("MODALITY", "CADNODE", "127.0.0.1") is not None
    in_flight.release()
    assert policy.in_use == 0
    assert read_generation(settings.node.storage_dir) == 1
    # node.* changes are reported, not applied.
    cfg.write_text(cfg.read_text().replace("port: 11112", "port: 11113"))
    result = live.reload("tester")
    assert result.ok and result.not_applied == ["node"] and live.settings.node.port == 11112
    # A bad file: rejected, configuration and generation unchanged.
    cfg.write_text(cfg.read_text() + "peers: [{ae_title: X}]\n")
    result = live.reload("tester")
    assert not result.ok and "peers" in (result.error or "")
    assert policy.check("NEWPEER", "CADNODE", "127.0.0.1") is None
    assert read_generation(settings.node.storage_dir) == 2
    events = [e for e in read_events(Path(settings.node.storage_dir) / "audit")
              if e["actor"] == "tester"]
    assert [e["outcome"] for e in events] == [0, 0, 8]


def _hammer(directory: str, n: int, tag: int) -> None:
    log = AuditLog(directory, max_bytes=4096, backups=50)
    for i in range(n):
        log.record(AuditEvent.ADMIN_ACTION, actor=f"p{tag}", seq=i, pad="x" * 40)


def test_audit_file_rotates_and_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), 150, t)) for t in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rotated = sorted(tmp_path.glob(f"{AUDIT_FILENAME}.*"))
    assert len(rotated) >= 5
    for path in [*rotated, tmp_path / AUDIT_FILENAME]:
        assert path.stat().st_size <= 4096
        for line in path.read_text().splitlines():
            json.loads(line)  # whole lines only, never interleaved
    events = read_events(tmp_path)
    assert len(events) == 450
    for t in range(3):
        assert [e["seq"] for e in events if e["actor"] == f"p{t}"] == list(range(150))
    assert {e["event"] for e in events} == {"admin-action"}


def test_a_worker_picks_up_destinations_after_serve_reloaded(tmp_path: Path) -> None:
    from cad_node.live import worker_baseline, worker_settings

    cfg = _write(tmp_path, THREE_KEYS)
    serve_side = load_config(cfg)
    worker_side = load_config(cfg)
    worker_baseline(worker_side)
    assert worker_settings(worker_side, str(cfg)) is None  # nothing reloaded yet
    add_destination(cfg, "archive", "ARCH", "10.0.0.9", 104, actor="t")
    assert worker_settings(worker_side, str(cfg)) is None  # edited, but serve did not reload
    live = LiveConfig(cfg, serve_side, None)
    assert live.reload("t").ok
    fresh = worker_settings(worker_side, str(cfg))
    assert fresh is not None and [d.name for d in fresh.destinations] == ["pacs", "archive"]
    assert worker_settings(fresh, str(cfg)) is None  # once per generation


def test_web_is_off_and_loopback_by_default_and_warns_when_exposed(tmp_path: Path) -> None:
    s = load_config(_write(tmp_path, THREE_KEYS), environ={})
    assert not s.web.enabled and s.web.host == "127.0.0.1" and s.web.tokens == []
    exposed = load_config(_write(tmp_path, THREE_KEYS + "web: {enabled: true, host: 0.0.0.0}\n"),
                          environ={})
    assert any("not loopback" in w for w in exposed.warnings())
    with pytest.raises(ConfigError, match=r"web\.tokens\.0\.token"):
        load_config(_write(tmp_path, THREE_KEYS + "web: {tokens: [{name: a, token: short}]}\n"),
                    environ={})
