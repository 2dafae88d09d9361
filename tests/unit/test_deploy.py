"""Deployment files: systemd units (systemd-analyze verify), compose file schema, Dockerfiles."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cad_node.config import load_config
from tests.conftest import REPO_ROOT, SYSTEMD_ANALYZE, require_program, skip_or_fail

SYSTEMD = REPO_ROOT / "systemd"
DOCKER = REPO_ROOT / "docker"
INSTALL_PREFIX = "/opt/cad-node/.venv/bin/cad-node"
UNITS = ("cad-node-receiver.service", "cad-node-worker@.service",
         "cad-node-receiver-only.service", "cad-node-worker-only@.service")
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
             "PrivateTmp": "yes", "RestrictNamespaces": "yes", "CapabilityBoundingSet": ""}


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / name)
    return parser


@pytest.mark.parametrize("name", UNITS)
def test_units_are_hardened(name: str) -> None:
    unit = _unit(name)
    service = unit["Service"]
    assert service["User"] == "cad-node" and service["Group"] == "cad-node"
    for key, value in HARDENING.items():
        assert service[key] == value, key
    assert service["Restart"] == "always" and float(service["RestartSec"]) > 0
    assert unit["Unit"]["StartLimitBurst"]
    assert service["ExecStart"].startswith(INSTALL_PREFIX)
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_scale_out_variants() -> None:
    """Receiver-only (no worker, PostgreSQL/WADO config) and worker-only (own storage)."""
    receiver = _unit("cad-node-receiver-only.service")["Service"]
    assert "serve --no-worker" in receiver["ExecStart"]
    worker = _unit("cad-node-worker-only@.service")["Service"]
    assert "worker " in worker["ExecStart"] and "--device cuda:%i" in worker["ExecStart"]
    # The worker-only host never writes the receiver's storage directory.
    assert worker["ReadWritePaths"] == "/var/lib/cad-node-worker"
    assert "/var/lib/cad-node\n" not in (SYSTEMD / "cad-node-worker-only@.service").read_text()


def test_worker_template_uses_instance_as_gpu() -> None:
    exec_start = _unit("cad-node-worker@.service")["Service"]["ExecStart"]
    assert "--device cuda:%i" in exec_start and "--queues inference" in exec_start
    assert "PrivateDevices" not in _unit("cad-node-worker@.service")["Service"]
    assert _unit("cad-node-receiver.service")["Service"]["PrivateDevices"] == "yes"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = require_program(SYSTEMD_ANALYZE)  # Debian package systemd (make peers)
    cad_node = Path(sys.executable).parent / "cad-node"  # the venv running the tests
    if not cad_node.exists():
        skip_or_fail(f"the venv has no cad-node entry point ({cad_node})")
    # Verify with the install prefix pointed at this checkout (ExecStart must exist).
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace(INSTALL_PREFIX, str(cad_node))
        (tmp_path / name).write_text(text)
    instance = tmp_path / "cad-node-worker@0.service"
    shutil.copy(tmp_path / "cad-node-worker@.service", instance)
    remote = tmp_path / "cad-node-worker-only@0.service"
    shutil.copy(tmp_path / "cad-node-worker-only@.service", remote)
    proc = subprocess.run([exe, "verify", str(tmp_path / UNITS[0]), str(instance),
                           str(tmp_path / UNITS[2]), str(remote)],
                          capture_output=True, text=True, timeout=120)
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "cad-node" in ln]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ours == [], ours


# -- compose ----------------------------------------------------------------
#: Top-level keys of the Compose Specification (compose-spec.io, "Compose file").
_TOP_LEVEL = {"version", "name", "services", "networks", "volumes", "configs", "secrets",
              "include"}
#: Service keys of the Compose Specification used or plausibly used here.
_SERVICE_KEYS = {
    "build", "command", "container_name", "depends_on", "deploy", "entrypoint", "environment",
    "env_file", "healthcheck", "image", "labels", "logging", "networks", "ports", "profiles",
    "restart", "stop_grace_period", "stop_signal", "user", "volumes", "working_dir",
    "ulimits", "cap_drop", "cap_add", "read_only", "security_opt", "tmpfs", "expose",
}
_RESTART = {"no", "always", "on-failure", "unless-stopped"}
_DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
_PORT = re.compile(r"^((\d{1,3}\.){3}\d{1,3}:)?\d{1,5}(:\d{1,5})?(/(tcp|udp))?$")
_DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")


def _check_compose(doc: Any) -> list[str]:
    """Structural checks after the Compose Specification; returns the problems found."""
    errors: list[str] = []
    if not isinstance(doc, dict):
        return ["top level is not a mapping"]
    for key in doc:
        if key not in _TOP_LEVEL and not str(key).startswith("x-"):
            errors.append(f"unknown top-level key {key!r}")
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        return [*errors, "services must be a non-empty mapping"]
    volumes = set((doc.get("volumes") or {}).keys())
    networks = set((doc.get("networks") or {}).keys())
    for name, svc in services.items():
        where = f"services.{name}"
        if not isinstance(svc, dict):
            errors.append(f"{where} is not a mapping")
            continue
        for key in svc:
            if key not in _SERVICE_KEYS and not str(key).startswith("x-"):
                errors.append(f"{where}: unknown key {key!r}")
        if "image" not in svc and "build" not in svc:
            errors.append(f"{where}: needs image or build")
        build = svc.get("build")
        if isinstance(build, dict):
            context = (DOCKER / build.get("context", ".")).resolve()
            if not (context / build.get("dockerfile", "Dockerfile")).exists():
                errors.append(f"{where}: build.dockerfile does not exist")
        for key in ("command", "entrypoint"):
            value = svc.get(key)
            if value is not None and not (isinstance(value, str) or (
                    isinstance(value, list) and all(isinstance(v, str) for v in value))):
                errors.append(f"{where}.{key} must be a string or a list of strings")
        env = svc.get("environment", {})
        if isinstance(env, dict):
            for k, v in env.items():
                if v is not None and not isinstance(v, str | int | float | bool):
                    errors.append(f"{where}.environment.{k} is not a scalar")
                if isinstance(v, bool):
                    errors.append(f"{where}.environment.{k}: quote booleans")
        elif not isinstance(env, list):
            errors.append(f"{where}.environment must be a mapping or a list")
        for port in svc.get("ports", []):
            if not (isinstance(port, str) and _PORT.match(port)):
                errors.append(f"{where}.ports: bad port {port!r} (quote it)")
        for vol in svc.get("volumes", []):
            source = str(vol).split(":")[0]
            if not source.startswith((".", "/")) and source not in volumes:
                errors.append(f"{where}.volumes: named volume {source!r} is not declared")
            if source.startswith(".") and not (DOCKER / source).exists():
                errors.append(f"{where}.volumes: bind source {source!r} does not exist")
        nets = svc.get("networks", [])
        for net in nets if isinstance(nets, list) else list(nets):
            if net not in networks:
                errors.append(f"{where}.networks: {net!r} is not declared")
        deps = svc.get("depends_on", {})
        for dep, spec in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
            if dep not in services:
                errors.append(f"{where}.depends_on: unknown service {dep!r}")
            cond = (spec or {}).get("condition", "service_started")
            if cond not in _DEPENDS_CONDITIONS:
                errors.append(f"{where}.depends_on.{dep}: bad condition {cond!r}")
            if cond == "service_healthy" and "healthcheck" not in services.get(dep, {}):
                errors.append(f"{where}.depends_on.{dep}: service_healthy without healthcheck")
        if "restart" in svc and svc["restart"] not in _RESTART:
            errors.append(f"{where}.restart: {svc['restart']!r}")
        grace = svc.get("stop_grace_period")
        if grace is not None and not _DURATION.match(str(grace)):
            errors.append(f"{where}.stop_grace_period: {grace!r} is not a duration")
        health = svc.get("healthcheck")
        if health is not None:
            if not isinstance(health.get("test"), list | str):
                errors.append(f"{where}.healthcheck.test missing")
            for k in ("interval", "timeout"):
                if k in health and not _DURATION.match(str(health[k])):
                    errors.append(f"{where}.healthcheck.{k} is not a duration")
    return errors


def test_compose_file_schema() -> None:
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert _check_compose(doc) == []
    services = doc["services"]
    assert {"redis", "receiver", "worker", "orthanc"} <= set(services)
    assert services["orthanc"]["profiles"] == ["demo"]  # optional
    redis_cmd = " ".join(services["redis"]["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in redis_cmd
    assert "ports" not in services["redis"]  # private: compose network only
    assert "--no-worker" in services["receiver"]["command"]
    # Scale-out: PostgreSQL, two workers, none of them on the receiver's volume.
    assert {"postgres", "worker-2"} <= set(services)
    assert "ports" not in services["postgres"]
    receiver_volumes = {v.split(":")[0] for v in services["receiver"]["volumes"]}
    for name in ("worker", "worker-2", "worker-gpu"):
        env = services[name]["environment"]
        assert env["CAD_NODE_STORAGE__FETCH_URL"] == "http://receiver:8043"
        assert env["CAD_NODE_STORAGE__DATABASE_URL"].startswith("postgresql://")
        volumes = {v.split(":")[0] for v in services[name]["volumes"]}
        assert not (volumes & receiver_volumes - {"./cad-node.yaml"}), name


def test_compose_checker_catches_mistakes() -> None:
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    doc["services"]["worker"]["depends_on"]["nosuch"] = {"condition": "service_started"}
    doc["services"]["worker"]["restrat"] = "always"
    doc["services"]["receiver"]["ports"].append(11112)
    problems = _check_compose(doc)
    assert len(problems) == 3, problems


def test_docker_config_and_dockerfiles() -> None:
    settings = load_config(DOCKER / "cad-node.yaml", environ={})
    assert settings.jobs.broker_url == "redis://redis:6379/0"
    assert not settings.jobs.embedded_worker
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([\d.]+)"', pyproject)
    assert torch_pin is not None
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (DOCKER / name).read_text()
        assert f"ARG TORCH_VERSION={torch_pin.group(1)}" in text
        assert "USER cad-node" in text
        for src in re.findall(r"^COPY (\S+) ", text, flags=re.MULTILINE):
            assert (REPO_ROOT / src).exists(), f"{name}: COPY {src} does not exist"
