"""The API process validates jobs (LoRA names, styles, prompt syntax, upscale caps)
without importing torch, diffusers or compel: those belong to workers (DESIGN.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys, tempfile
from fastapi.testclient import TestClient
from sdworker.api.app import create_app
from sdworker.settings import Settings

app = create_app(Settings(data_dir=tempfile.mkdtemp(), lora_dir=sys.argv[1]))
with TestClient(app) as client:
    bad = client.post("/v1/jobs", json={"prompt": "a (cat", "prompt_weighting": True})
    assert bad.status_code == 422, bad.text
    job = {"prompt": "a (cat:1.2)", "prompt_weighting": True, "loras": [{"name": "ink"}]}
    assert client.post("/v1/jobs", json=job).status_code == 202
    assert client.get("/v1/loras").json()["loras"][0]["name"] == "ink"
    assert client.get("/status").status_code == 200
heavy = sorted(m for m in ("torch", "diffusers", "compel", "transformers") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def test_api_validates_features_without_torch(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    key = "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    save_file({key: np.zeros((4, 96), dtype=np.float32)}, str(tmp_path / "ink.safetensors"))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY:", done.stdout
