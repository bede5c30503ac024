"""The deployment files parse and agree with the code (names of streams, commands)."""

from __future__ import annotations

from pathlib import Path

import yaml

from sdworker.broker.redis import GROUP, PRIORITY_ORDER

DEPLOY = Path(__file__).parent.parent / "deploy"


def _documents(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        assert _documents(path), path


def test_compose_runs_redis_an_api_and_a_gpu_worker() -> None:
    (compose,) = _documents(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert services["api"]["command"] == ["sdworker", "api"]
    assert services["worker"]["command"][:2] == ["sdworker", "worker"]
    assert services["api"]["environment"]["SDWORKER_BROKER"].startswith("redis://")
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_k8s_worker_requests_a_gpu_and_keda_watches_every_priority_stream() -> None:
    (worker,) = _documents(DEPLOY / "k8s" / "worker.yaml")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    (scaled,) = _documents(DEPLOY / "k8s" / "keda-scaledobject.yaml")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    streams = {t["metadata"]["stream"] for t in scaled["spec"]["triggers"]}
    assert streams == {f"sdworker:stream:{p.value}" for p in PRIORITY_ORDER}
    assert {t["metadata"]["consumerGroup"] for t in scaled["spec"]["triggers"]} == {GROUP}
    api, service = _documents(DEPLOY / "k8s" / "api.yaml")
    assert api["kind"] == "Deployment" and service["kind"] == "Service"


def test_dockerfile_pins_torch_and_starts_the_service() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "pip install torch==2.13.0" in text
    assert 'CMD ["sdworker", "serve"]' in text
    # The same image deploys as a RunPod serverless worker: the SDK and the entry module.
    assert 'pip install ".[runpod]"' in text
    assert "python -m sdworker.runpod_handler" in text
    import importlib.util

    assert importlib.util.find_spec("sdworker.runpod_handler") is not None


def test_api_replicas_read_the_models_volume_the_workers_use() -> None:
    """The API validates model, LoRA, style and upscaler names against the model root."""
    (compose,) = _documents(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    # "${MODELS_DIR:-./models}:/models[:ro]": the container path is after the "}:"
    api_mounts = {v.split("}:")[1].split(":")[0] for v in services["api"]["volumes"]}
    worker_mounts = {v.split("}:")[1].split(":")[0] for v in services["worker"]["volumes"]}
    assert "/models" in api_mounts & worker_mounts
    assert services["api"]["volumes"][0].endswith(":ro")
    assert services["api"]["environment"]["SDXL_MODEL_ROOT"] == "/models"
    api, _ = _documents(DEPLOY / "k8s" / "api.yaml")
    spec = api["spec"]["template"]["spec"]
    (mount,) = spec["containers"][0]["volumeMounts"]
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}
    (worker,) = _documents(DEPLOY / "k8s" / "worker.yaml")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]}
    worker_claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in worker["spec"]["template"]["spec"]["volumes"]
    }
    assert claims == worker_claims
