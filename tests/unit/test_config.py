"""Configuration: the shipped YAML, environment overrides, precise errors, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cad_node.config import DEFAULT_CONFIG_PATH, ConfigError, load_config

CAD_NODE = str(Path(sys.executable).with_name("cad-node"))


def test_shipped_config_has_the_scripted_keys() -> None:
    s = load_config(DEFAULT_CONFIG_PATH, environ={})
    assert (s.node.ae_title, s.node.host, s.node.port, s.node.storage_dir) == (
        "CADNODE", "0.0.0.0", 11112, str(DEFAULT_CONFIG_PATH.parent.parent / "var"))
    assert ("MODALITY", "127.0.0.1") in [(p.ae_title, p.host) for p in s.peers]
    pacs = s.destination("pacs")
    assert (pacs.ae_title, pacs.host, pacs.port) == ("PACS", "127.0.0.1", 4242)
    assert s.study.force_complete_s >= s.study.study_quiet_s
    assert 0 < s.node.acse_timeout_s and 0 < s.node.dimse_timeout_s
    assert 0 < s.node.network_timeout_s


def test_every_node_and_study_key_is_documented_in_the_yaml() -> None:
    text = DEFAULT_CONFIG_PATH.read_text()
    s = load_config(DEFAULT_CONFIG_PATH, environ={})
    for key in [*type(s.node).model_fields, *type(s.study).model_fields]:
        lines = [ln for ln in text.splitlines() if ln.strip().startswith(f"{key}:")]
        assert lines, f"{key} missing from {DEFAULT_CONFIG_PATH.name}"
        assert "#" in lines[0], f"{key} has no comment"


def test_environment_overrides(tmp_path: Path) -> None:
    env = {"CAD_NODE_NODE__PORT": "11113", "CAD_NODE_STUDY__STUDY_QUIET_S": "5",
           "CAD_NODE_NODE__ACCEPT_ANY": "true"}
    s = load_config(DEFAULT_CONFIG_PATH, environ=env)
    assert s.node.port == 11113 and s.study.study_quiet_s == 5 and s.node.accept_any is True


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("node: {port: 70000}", "node.port"),
        ("node: {port: '11112'}", "node.port"),
        ("node: {ae_title: THIS_AE_TITLE_IS_TOO_LONG}", "node.ae_title"),
        ("node: {max_pdu: -1}", "node.max_pdu"),
        ("node: {acse_timeout_s: 0}", "node.acse_timeout_s"),
        ("node: {bogus: 1}", "node.bogus"),
        ("peers: [{ae_title: A, host: 'not a host!'}]", "peers.0.host"),
        ("study: {study_quiet_s: 100, force_complete_s: 10}", "study"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, environ={})
    assert key in str(info.value) and str(cfg) in str(info.value)


def test_config_check_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run([CAD_NODE, "config", "check", str(DEFAULT_CONFIG_PATH)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: {port: 0}\n")
    res = subprocess.run([CAD_NODE, "config", "check", str(bad)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "node.port" in res.stderr


def test_object_kinds_become_the_enum_once_at_the_config_edge(tmp_path: Path) -> None:
    from cad_node.config import DEFAULT_OBJECT_KINDS, ObjectKind, parse_object_kinds

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "destinations:\n"
        "  - {name: a, ae_title: A, host: 127.0.0.1, port: 104, objects: [kos, sr]}\n"
        "  - {name: b, ae_title: B, host: 127.0.0.1, port: 105}\n"
    )
    a, b = load_config(cfg, environ={}).destinations
    assert a.objects == [ObjectKind.KOS, ObjectKind.SR]
    assert all(type(k) is ObjectKind for k in a.objects)
    assert tuple(b.objects) == DEFAULT_OBJECT_KINDS == ("sr", "seg", "sc")
    assert [str(k) for k in ObjectKind] == ["sr", "seg", "sc", "gsps", "kos", "pm"]  # YAML spelling
    for bad, key in (("[sr, pdf]", "destinations.0.objects.1"), ("[sr, sr]", "objects"),
                     ("[]", "destinations.0.objects")):
        dest = f"{{name: a, ae_title: A, host: h, port: 1, objects: {bad}}}"
        cfg.write_text(f"destinations: [{dest}]\n")
        with pytest.raises(ConfigError) as info:
            load_config(cfg, environ={})
        assert key in str(info.value), info.value
    assert parse_object_kinds(" seg,gsps ") == [ObjectKind.SEG, ObjectKind.GSPS]
    for bad in ("sr,pdf", "", "sr,sr"):
        with pytest.raises(ValueError, match="kind"):
            parse_object_kinds(bad)


def test_output_profiles_by_name(tmp_path: Path) -> None:
    from cad_node.config import OUTPUT_PROFILES, ObjectKind

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "destinations:\n"
        "  - {name: a, ae_title: A, host: 127.0.0.1, port: 104, objects: legacy-pacs}\n"
        "  - {name: b, ae_title: B, host: 127.0.0.1, port: 105, objects: archive,\n"
        "     below_operating_point: true}\n"
    )
    a, b = load_config(cfg, environ={}).destinations
    assert a.objects == [ObjectKind.SC, ObjectKind.GSPS] and not a.below_operating_point
    assert b.objects == list(ObjectKind) and b.below_operating_point
    assert OUTPUT_PROFILES["ohif"] == (ObjectKind.SR, ObjectKind.SEG, ObjectKind.SC)
    cfg.write_text("destinations:\n"
                   "  - {name: a, ae_title: A, host: 127.0.0.1, port: 104, objects: weasis}\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg, environ={})
    assert "destinations.0.objects" in str(info.value) and "legacy-pacs" in str(info.value)
