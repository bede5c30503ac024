"""The command line as a user meets it: outputs, one-line errors, help."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdworker.cli import app
from sdworker.settings import Settings
from tests.conftest import gradient_image, half_mask
from tests.support.receiver import Receiver


@pytest.fixture
def run(cache_dir: Path, tiny_folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SDWORKER_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("SDWORKER_DEVICE", "cpu")
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(app, list(args))

    return invoke


def test_generate_writes_pngs_with_parameters_and_prints_seeds(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run(
        "generate",
        "a red barn",
        "-n",
        "fog",
        "--size",
        "64x64",
        "--steps",
        "2",
        "--seed",
        "41",
        "-b",
        "2",
        "--scheduler",
        "K_EULER_ANCESTRAL",
        "-o",
        "barn.png",
    )
    assert result.exit_code == 0, result.output
    for index, seed in enumerate((41, 42)):
        path = tmp_path / f"barn-{index}.png"
        assert f"{path.name}  seed={seed}" in result.stdout
        with Image.open(path) as image:
            assert image.size == (64, 64)
            parameters = image.text["parameters"]
        assert parameters.startswith("a red barn\nNegative prompt: fog\n")
        assert (
            f"Steps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: {seed}, Size: 64x64" in parameters
        )
    assert "2 image(s) in" in result.stdout


def test_default_output_goes_to_the_outputs_folder(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run("generate", "x", "--size", "64x64", "--steps", "1", "--seed", "5")
    assert result.exit_code == 0, result.output
    (written,) = (tmp_path / "outputs").glob("*-5.png")
    assert written.name in result.stdout


def test_img2img_and_inpaint_from_the_command_line(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gradient_image().save(tmp_path / "init.png")
    half_mask().save(tmp_path / "mask.png")
    img2img = run(
        "generate",
        "x",
        "--image",
        "init.png",
        "--strength",
        "0.5",
        "--size",
        "64x64",
        "--steps",
        "4",
        "--seed",
        "1",
        "-o",
        "a.png",
    )
    assert img2img.exit_code == 0, img2img.output
    inpaint = run(
        "generate",
        "x",
        "--image",
        "init.png",
        "--mask",
        "mask.png",
        "--size",
        "64x64",
        "--steps",
        "2",
        "--seed",
        "1",
        "-o",
        "b.png",
    )
    assert inpaint.exit_code == 0, inpaint.output
    assert (tmp_path / "a.png").is_file() and (tmp_path / "b.png").is_file()


def test_save_latents_writes_float16_nchw(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run(
        "generate",
        "x",
        "--size",
        "64x128",
        "--steps",
        "1",
        "--seed",
        "1",
        "-o",
        "l.png",
        "--save-latents",
        "l.bin",
    )
    assert result.exit_code == 0, result.output
    assert "shape=[1, 4, 16, 8] float16" in result.stdout
    data = np.fromfile(tmp_path / "l.bin", dtype=np.float16)
    assert data.size == 4 * 16 * 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--size", "500x512"],
            "width: 500 is not allowed for sdxl: use a multiple of 8 from 64 to 2048",
        ),
        (["--size", "4096x1024"], "width: 4096 is not allowed"),
        (["--scheduler", "warp"], "scheduler: unknown scheduler 'warp'; valid: ddim, ddpm"),
        (["--model", "missing.safetensors"], "model 'missing.safetensors' not found; tried:"),
        (["--mask", "mask.png"], "image: inpaint needs an input image"),
        (["--image", "nope.png"], "image: nope.png does not exist"),
        (["--steps", "0"], "steps: Input should be greater than or equal to 1"),
        (["--guidance", "31"], "guidance_scale: Input should be less than or equal to 30"),
        (["-b", "9"], "num_images: 9 is over the limit of 8"),
        (["--seed", "4294967296"], "seed: Input should be less than or equal to 4294967295"),
        (
            ["--image", "init.png", "--strength", "1.5"],
            "strength: Input should be less than or equal to 1",
        ),
        (["--device", "tpu"], "device must be auto, cpu, mps, cuda, cuda:N or N"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(
    run,
    tmp_path: Path,
    args: list[str],
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    gradient_image().save(tmp_path / "init.png")
    result = run("generate", "x", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_corrupt_checkpoint_is_one_line(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    result = run("generate", "x", "--model", "bad.safetensors")
    assert result.exit_code == 2
    assert "bad.safetensors is not a readable .safetensors checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_mask_of_another_size_is_one_line(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gradient_image(64, 64).save(tmp_path / "i.png")
    half_mask(32, 32).save(tmp_path / "m.png")
    result = run(
        "generate", "x", "--image", "i.png", "--mask", "m.png", "--size", "64x64", "--steps", "2"
    )
    assert result.exit_code == 2
    assert "mask: is 32x32 but the image is 64x64" in result.stderr
    assert "Traceback" not in result.output


def test_help_explains_every_option(run) -> None:  # type: ignore[no-untyped-def]
    result = run("generate", "--help")
    assert result.exit_code == 0
    for option in (
        "--negative",
        "--size",
        "--steps",
        "--guidance",
        "--seed",
        "--scheduler",
        "--num-images",
        "--image",
        "--strength",
        "--mask",
        "--model",
        "--output",
    ):
        assert option in result.stdout


def test_schedulers_lists_names_and_aliases(run) -> None:  # type: ignore[no-untyped-def]
    result = run("schedulers")
    assert result.exit_code == 0
    for text in ("dpmpp_2m_karras", "K_EULER_ANCESTRAL".lower(), "klms", "LCMScheduler"):
        assert text in result.stdout


def test_models_lists_tiny_and_models_under_the_root(
    run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    monkeypatch.setenv("SDXL_MODEL_ROOT", str(tmp_path))
    result = run("models")
    assert result.exit_code == 0, result.output
    assert "tiny-sdxl" in result.stdout
    assert "junk.safetensors" in result.stdout and "unusable" in result.stdout
    assert str(tmp_path) in result.stdout


def test_models_shows_the_registry_families_and_video_model(
    run, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SDWORKER_MODELS", '{"fast15": {"source": "tiny-sd15", "steps": 12}}')
    monkeypatch.setenv("DOWNLOAD_WAN2_MODEL", "true")
    monkeypatch.setenv("SDWORKER_VIDEO_MODEL", "tiny-wan")
    monkeypatch.setenv("COLUMNS", "200")
    result = run("models")
    assert result.exit_code == 0, result.output
    assert "fast15" in result.stdout and "steps=12" in result.stdout
    assert "video model:   tiny-wan" in result.stdout
    for name, family in (("tiny-sd21", "sd21"), ("tiny-sd3", "sd3"), ("tiny-wan", "wan-t2v")):
        assert name in result.stdout and family in result.stdout


def test_models_with_a_bad_registry_says_what_is_wrong(
    run, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SDWORKER_MODELS", '{"x": {"source": "tiny-sd15", "steps": 0}}')
    result = run("models")
    assert result.exit_code != 0
    assert "model 'x': steps" in result.output


def test_generate_with_a_lora_path_and_weighting(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from sdworker.engine.tiny import build_tiny_pipeline
    from tests.support.adapter_builders import build_tiny_lora_peft

    build_tiny_lora_peft(build_tiny_pipeline("tiny-sdxl"), tmp_path / "ink.safetensors", seed=3)
    common = ("--size", "64x64", "--steps", "2", "--seed", "5")
    plain = run("generate", "a (cat:1.3)", *common, "-o", "plain.png")
    styled = run(
        "generate", "a (cat:1.3)", *common, "-w", "--lora", "ink.safetensors:0.8", "-o", "s.png"
    )
    assert plain.exit_code == 0 and styled.exit_code == 0, styled.output
    with Image.open(tmp_path / "s.png") as image:
        assert "Lora: ink.safetensors:0.8" in image.text["parameters"]
        styled_pixels = np.asarray(image)
    with Image.open(tmp_path / "plain.png") as image:
        assert not np.array_equal(np.asarray(image), styled_pixels)


def test_upscale_from_the_command_line(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gradient_image(40, 24).save(tmp_path / "small.png")
    result = run("generate", "", "--image", "small.png", "--upscale", "4", "-o", "big.png")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "big.png") as image:
        assert image.size == (160, 96)
        assert "Size: 160x96" in image.text["parameters"]
        assert "Upscaler: lanczos x4" in image.text["parameters"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lora", "nope:0.5"], "loras[0].name: unknown LoRA 'nope'"),
        (["--lora", "x:heavy"], "'heavy' is not a number"),
        (["--style", "ink:2"], "style.name: unknown style 'ink'"),
        (["--refiner", "ensemble"], "no refiner is configured"),
        (["--weighting", "--size", "64x64"], "prompt: '(' is never closed at character 1"),
        (["--image", "init.png", "--upscale", "3"], "upscale_factor: must be 2 or 4"),
    ],
)
def test_feature_errors_are_one_line(run, tmp_path: Path, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    gradient_image().save(tmp_path / "init.png")
    prompt = "(cat" if "--weighting" in args else "x"
    result = run("generate", prompt, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- candle-worker (sd-worker-rbee's command line) ----------------------------------------


def test_candle_worker_help_lists_the_original_options(run) -> None:  # type: ignore[no-untyped-def]
    result = run("candle-worker", "--help")
    assert result.exit_code == 0
    for option in (
        "--worker-id",
        "--sd-version",
        "--port",
        "--callback-url",
        "--cuda-device",
        "--use-f16",
        "--use-flash-attn",
        "--model-path",
        "--host",
        "--heartbeat-interval",
    ):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("v9", "Unknown SD version: v9. Supported: v1-5, v2-1, xl, turbo"),
        ("xl-inpaint", "inpaint-only checkpoints are not supported yet; use v1-5, v2-1, xl, turbo"),
    ],
)
def test_candle_worker_refuses_an_sd_version_it_cannot_serve(
    run, version: str, message: str
) -> None:  # type: ignore[no-untyped-def]
    result = run("candle-worker", "--worker-id", "w1", "--sd-version", version)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _bodies(receiver: Receiver) -> list[dict[str, Any]]:
    """The JSON bodies the receiver got, each with the path it was POSTed to."""
    return [{"path": call["path"], **json.loads(call["body"])} for call in list(receiver.calls)]


def _wait_for_body(receiver: Receiver, check: Callable[[dict[str, Any]], bool]) -> None:
    deadline = time.monotonic() + 30
    while not any(check(body) for body in _bodies(receiver)):
        assert time.monotonic() < deadline, _bodies(receiver)[-3:]
        time.sleep(0.05)


def _children(pid: int) -> set[int]:
    """Processes whose parent is pid (the supervised worker runs in a session of its own)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if entry.name.isdigit() and int(stat.rpartition(")")[2].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def _stop(process: subprocess.Popen[bytes], children: set[int]) -> None:
    """SIGTERM (drain), then SIGKILL; then any worker it left behind."""
    if process.poll() is None:
        children |= _children(process.pid)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
    for pid in children:
        if _alive(pid) and b"sdworker" in Path(f"/proc/{pid}/cmdline").read_bytes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_candle_worker_registers_serves_at_the_root_and_sends_heartbeats(
    cache_dir: Path, tiny_folder: Path, tmp_path: Path
) -> None:
    from httpx_sse import connect_sse

    receiver = Receiver()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SDWORKER_")
        and key not in {"WORKER_ID", "SD_VERSION", "PORT", "CALLBACK_URL", "MODEL_PATH"}
    }
    env |= {
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "SDWORKER_DATA_DIR": str(tmp_path / "data"),
        "SDWORKER_CACHE_DIR": str(cache_dir),
        "SDWORKER_HEARTBEAT_INTERVAL_S": "0.5",
        "SDWORKER_PROGRESS_INTERVAL_S": "0",
        "SDWORKER_POLL_INTERVAL_S": "0.05",
        "SDWORKER_DRAIN_TIMEOUT_S": "10",
    }
    command = [
        sys.executable, "-m", "sdworker", "candle-worker", "--worker-id", "w7",
        "--sd-version", "xl", "--model-path", "tiny-sdxl", "--port", str(port),
        "--callback-url", f"{receiver.url}/hive/workers", "--heartbeat-interval", "0.5",
    ]  # fmt: skip
    log_path = tmp_path / "candle.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
        )
    children: set[int] = set()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            children |= _children(process.pid)
            with contextlib.suppress(httpx.TransportError):
                if (health := client.get("/health")).status_code == 200:
                    break
            time.sleep(0.2)
        body = health.json()
        assert body["worker_id"] == "w7" and body["model_version"] == "tiny-sdxl"
        assert body["device"] and body["uptime_seconds"] > 0
        # POST /execute at the root streams the image.
        request = {"prompt": "a kite", "steps": 2, "width": 64, "height": 64, "seed": 31}
        with connect_sse(client, "POST", "/execute", json=request) as source:
            events = list(source.iter_sse())
        assert [e.event for e in events] == ["progress", "progress", "complete"]
        done = events[-1].json()
        assert done["seed"] == 31
        image = Image.open(io.BytesIO(base64.b64decode(done["image"])))
        assert image.size == (64, 64)
        # The orchestrator got a registration, then heartbeats, all for w7.
        _wait_for_body(receiver, lambda b: b["event"] == "heartbeat" and b["status"] == "ready")
        bodies = _bodies(receiver)
        first = bodies[0]
        assert first["event"] == "register" and first["path"] == "/hive/workers"
        assert first["status"] in {"starting", "ready"}
        assert first["sd_version"] == "xl" and first["port"] == port
        assert first["worker"]["id"] == "w7" and first["implementation"] == "sdworker"
        assert {b["worker_id"] for b in bodies} == {"w7"}
        assert all(b["event"] == "heartbeat" for b in bodies[1:])
        assert bodies[-1]["model_version"] == "tiny-sdxl"
        # SIGTERM drains and tells the orchestrator this worker stopped.
        _stop(process, children)
        assert process.returncode == 0, log_path.read_text()
        last = _bodies(receiver)[-1]
        assert last["event"] == "shutdown" and last["status"] == "stopped"
    finally:
        client.close()
        _stop(process, children)
        receiver.close()
    # No stray process: the worker went with it.
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children and not any(_alive(pid) for pid in children)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_serve_names_where_the_other_apis_answer() -> None:
    from sdworker.cli import _dialect_summary

    settings = Settings(_env_file=None, dialects={"lcm": "/", "dream": "off"})
    summary = _dialect_summary(settings)
    assert "lcm /," in summary and "runpod /runpod" in summary
    assert "dream" not in summary
