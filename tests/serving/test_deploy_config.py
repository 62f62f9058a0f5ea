"""The Kubernetes files configure settings that exist: every PVQC_ name in the ConfigMap, the Secret
template and the Deployment's env is a field of serving.settings.Settings, and together they load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def deployment_env() -> dict[str, str]:
    """The literal values the Deployment's containers set (valueFrom entries are the Secret's)."""
    env: dict[str, str] = {}
    for document in yaml.safe_load_all((K8S / "deployment.yaml").read_text()):
        spec = document["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def settings_env() -> dict[str, str]:
    config: dict[str, Any] = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    secret: dict[str, Any] = yaml.safe_load((K8S / "secret.yaml").read_text()).get("stringData", {})
    return {**config, **secret, **deployment_env()}


def test_every_pvqc_variable_the_cluster_sets_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    unknown = sorted(k for k in settings_env() if k.startswith("PVQC_") and k[5:].lower() not in fields)
    assert not unknown, f"not settings (silently ignored): {unknown}"


def test_the_cluster_settings_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in settings_env().items():
        if name.startswith("PVQC_"):
            monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("PVQC_VAR_DIR", str(tmp_path))  # the pod's volume paths do not exist here
    monkeypatch.setenv("PVQC_MODEL_REGISTRY", str(tmp_path / "registry"))
    settings = Settings()
    assert set(settings.lines) == {"line-1", "line-2"}
    # the HPA's replicas x each one's connections stay below PostgreSQL's default max_connections
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    assert hpa["spec"]["maxReplicas"] * (settings.db_pool_size + settings.db_max_overflow) < 100
