"""The AUTOMATIC1111 dialect against a live service, through the real `webuiapi` client:
txt2img/img2img/inpainting, LoRA tags, per-request models, progress and interrupt,
options, listings, upscaling, PNG info and A1111's error shapes.

The service has a LoRA folder with one tiny LoRA, so its engine is built here (the
session engine has no LoRA folder)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webuiapi
from PIL import Image

from sdworker.api.dialects.a1111_models import Img2ImgRequest, Txt2ImgRequest
from sdworker.api.dialects.a1111_spec import generation_fields, parse_infotext, split_loras
from sdworker.api.dialects.base import build_spec
from sdworker.errors import InvalidJobError
from sdworker.settings import Settings
from tests.conftest import gradient_image, half_mask
from tests.dialects.conftest import LiveService, live_service

TINY: dict[str, Any] = {"width": 64, "height": 64, "steps": 2, "prompt": "a paper fox"}


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_folder: Path
) -> Iterator[LiveService]:
    from sdworker.engine.engine import Engine
    from sdworker.engine.tiny import build_tiny_pipeline
    from tests.support.adapter_builders import build_tiny_lora_peft

    loras = tmp_path_factory.mktemp("a1111-loras")
    build_tiny_lora_peft(build_tiny_pipeline("tiny-sdxl"), loras / "paper.safetensors", seed=3)
    engine = Engine(
        Settings(
            _env_file=None, cache_dir=cache_dir, device="cpu", model="tiny-sdxl", lora_dir=loras
        )
    )
    data = tmp_path_factory.mktemp("a1111-live")
    with live_service(data, cache_dir, engine, lora_dir=loras) as live:
        yield live


@pytest.fixture
def api(service: LiveService) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{service.url}/sdapi/v1", sampler="Euler a", steps=2)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_bytes(result: webuiapi.WebUIApiResult, index: int = 0) -> bytes:
    """The PNG bytes as the service sent them (webuiapi keeps the raw response)."""
    return base64.b64decode(result.json["images"][index])


def error_body(exc: pytest.ExceptionInfo[RuntimeError]) -> tuple[int, Any]:
    status, text = exc.value.args
    return status, json.loads(text)


# -- txt2img -------------------------------------------------------------------------


def test_txt2img_batch_reports_seeds_and_reproduces(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(**TINY, seed=1234, batch_size=2, negative_prompt="blur")
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    info = result.info
    assert info["seed"] == 1234
    assert info["all_seeds"] == [1234, 1235]
    assert info["all_prompts"] == ["a paper fox"] * 2
    assert info["negative_prompt"] == "blur"
    assert info["sampler_name"] == "Euler a"
    assert (info["steps"], info["width"], info["height"]) == (2, 64, 64)
    assert info["sd_model_name"] == "tiny-sdxl"
    assert "Seed: 1235" in info["infotexts"][1]
    assert info["interrupted"] is False
    assert result.parameters["batch_size"] == 2
    assert result.parameters["seed"] == 1234
    assert png_bytes(result, 0) != png_bytes(result, 1)
    again = api.txt2img(**TINY, seed=1234, batch_size=2, negative_prompt="blur")
    assert [png_bytes(again, i) for i in (0, 1)] == [png_bytes(result, i) for i in (0, 1)]


def test_random_seed_and_n_iter(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(**TINY, seed=-1, batch_size=1, n_iter=2, send_images=False)
    assert result.images == []
    seeds = result.info["all_seeds"]
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1 and seeds[0] >= 0


def test_karras_schedule_type_and_old_combined_name(api: webuiapi.WebUIApi) -> None:
    split = api.txt2img(**TINY, seed=5, sampler_name="DPM++ 2M", scheduler="Karras")
    combined = api.txt2img(**TINY, seed=5, sampler_name="DPM++ 2M Karras")
    assert split.info["sampler_name"] == "DPM++ 2M Karras"
    assert png_bytes(split) == png_bytes(combined)
    plain = api.txt2img(**TINY, seed=5, sampler_name="DPM++ 2M")
    assert png_bytes(plain) != png_bytes(split)


# -- img2img and inpainting ------------------------------------------------------------


def test_img2img_from_an_init_image(api: webuiapi.WebUIApi) -> None:
    init = gradient_image(96, 64)
    result = api.img2img(images=[init], **TINY, seed=7, denoising_strength=0.5, resize_mode=1)
    assert result.image.size == (64, 64)
    assert result.info["seed"] == 7
    assert result.info["denoising_strength"] == 0.5
    assert result.parameters["init_images"] is None  # include_init_images=False
    again = api.img2img(images=[init], **TINY, seed=7, denoising_strength=0.5, resize_mode=1)
    assert png_bytes(again) == png_bytes(result)
    stretched = api.img2img(images=[init], **TINY, seed=7, denoising_strength=0.5)
    assert png_bytes(stretched) != png_bytes(result)  # resize_mode 0 stretches


def test_inpainting_with_a_mask_and_its_inversion(api: webuiapi.WebUIApi) -> None:
    init, mask = gradient_image(), half_mask()
    masked = api.img2img(images=[init], mask_image=mask, **TINY, seed=9, denoising_strength=1.0)
    assert masked.image.size == (64, 64)
    assert masked.info["is_using_inpainting_conditioning"] is True
    inverted = api.img2img(
        images=[init],
        mask_image=mask,
        inpainting_mask_invert=1,
        **TINY,
        seed=9,
        denoising_strength=1.0,
    )
    swapped = api.img2img(
        images=[init],
        mask_image=Image.fromarray(255 - np.asarray(mask)),
        **TINY,
        seed=9,
        denoising_strength=1.0,
    )
    assert png_bytes(inverted) != png_bytes(masked)
    assert png_bytes(inverted) == png_bytes(swapped)


# -- LoRA tags and models --------------------------------------------------------------


def test_lora_tags_become_job_loras_and_are_stripped() -> None:
    prompt, loras = split_loras("a fox, <lora:paper:0.8> in snow <LORA:ink> <lora:x:1:0.5>")
    assert prompt == "a fox, in snow"
    assert loras == [
        {"name": "paper", "weight": 0.8},
        {"name": "ink", "weight": 1.0},
        {"name": "x", "weight": 1.0},
    ]
    body = Txt2ImgRequest(prompt="<lora:paper:0.5> fox", disable_extra_networks=False)
    spec = build_spec(generation_fields(body, "tiny-sdxl", 8, {}))
    assert [(lora.name, lora.weight) for lora in spec.loras] == [("paper", 0.5)]
    assert spec.prompt == "fox"
    off = Txt2ImgRequest(prompt="<lora:paper:0.5> fox", disable_extra_networks=True)
    assert build_spec(generation_fields(off, "tiny-sdxl", 8, {})).loras == []
    with pytest.raises(InvalidJobError, match="weight 'heavy' is not a number"):
        split_loras("<lora:paper:heavy>")


def test_a_lora_tag_changes_the_image(api: webuiapi.WebUIApi, service: LiveService) -> None:
    assert [lora["name"] for lora in api.get_loras()] == ["paper"]
    plain = api.txt2img(**TINY, seed=11)
    styled = api.txt2img(**{**TINY, "prompt": "a paper fox <lora:paper:1.5>"}, seed=11)
    assert png_bytes(styled) != png_bytes(plain)
    assert styled.info["prompt"] == "a paper fox <lora:paper:1.5>"
    assert "Lora: paper:1.5" in styled.info["infotexts"][0]
    unknown = service.client.post(
        "/sdapi/v1/txt2img", json={**TINY, "prompt": "<lora:missing:1> fox"}
    )
    assert unknown.status_code == 422, unknown.text
    detail = unknown.json()["detail"][0]
    assert detail["loc"] == ["body", "prompt"]
    assert "missing" in detail["msg"] and "paper" in detail["msg"]


def test_override_settings_picks_the_model_of_one_request(
    api: webuiapi.WebUIApi, service: LiveService
) -> None:
    ok = api.txt2img(**TINY, seed=1, override_settings={"sd_model_checkpoint": "tiny-sdxl"})
    assert ok.info["sd_model_name"] == "tiny-sdxl"
    with pytest.raises(RuntimeError) as exc:
        api.txt2img(**TINY, override_settings={"sd_model_checkpoint": "dreamshaper"})
    status, body = error_body(exc)
    assert status == 422
    assert body["detail"][0]["loc"] == ["body", "override_settings", "sd_model_checkpoint"]
    assert "'dreamshaper'" in body["detail"][0]["msg"] and "tiny-sdxl" in body["detail"][0]["msg"]
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sdxl"  # nothing switched


# -- progress, interrupt ---------------------------------------------------------------


def wait_until(check: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_progress_per_task_and_interrupt(api: webuiapi.WebUIApi, service: LiveService) -> None:
    idle = api.get_progress()
    assert (idle["progress"], idle["state"]["job_count"]) == (0.0, 0)
    outcome: dict[str, Any] = {}
    long_job = {**TINY, "width": 256, "height": 256, "steps": 120, "force_task_id": "task(long)"}

    def generate() -> None:
        body = {**long_job, "seed": 3}
        outcome["response"] = service.client.post("/sdapi/v1/txt2img", json=body)

    thread = threading.Thread(target=generate)
    thread.start()
    running = wait_until(lambda: (p := api.get_progress())["state"]["sampling_step"] >= 1 and p)
    assert 0.01 < running["progress"] < 1.0
    assert running["state"]["job"] == "scripts_txt2img"
    assert running["state"]["job_count"] == 1
    assert running["state"]["sampling_steps"] == 120
    assert running["eta_relative"] > 0
    assert running["current_image"] is None
    task = service.client.post(
        "/internal/progress", json={"id_task": "task(long)", "id_live_preview": -1}
    ).json()
    assert task["active"] is True and task["completed"] is False
    assert 0 < task["progress"] < 1
    by_query = service.client.get("/sdapi/v1/progress", params={"id_task": "task(long)"}).json()
    assert by_query["state"]["sampling_steps"] == 120
    assert api.interrupt() == {}
    thread.join(60)
    response = outcome["response"]
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["images"] == []
    assert json.loads(body["info"])["interrupted"] is True
    after = api.get_progress()
    assert (after["progress"], after["state"]["job_count"]) == (0.0, 0)
    api.util_wait_for_ready(check_interval=0.1)
    done = service.client.post("/internal/progress", json={"id_task": "task(long)"}).json()
    assert (done["active"], done["queued"], done["completed"]) == (False, False, True)


def test_per_task_progress_of_a_finished_and_an_unknown_task(
    api: webuiapi.WebUIApi, service: LiveService
) -> None:
    # webuiapi has no force_task_id argument: send the request directly.
    response = service.client.post(
        "/sdapi/v1/txt2img", json={**TINY, "seed": 2, "force_task_id": "task(short)"}
    )
    assert response.status_code == 200
    done = service.client.post("/internal/progress", json={"id_task": "task(short)"}).json()
    assert done["completed"] is True and done["active"] is False
    unknown = service.client.post("/internal/progress", json={"id_task": "task(nope)"}).json()
    assert unknown == {
        "active": False,
        "queued": False,
        "completed": False,
        "progress": None,
        "eta": None,
        "live_preview": None,
        "id_live_preview": -1,
        "textinfo": "Waiting...",
    }


# -- options and listings --------------------------------------------------------------


def test_options_get_and_post(api: webuiapi.WebUIApi, service: LiveService) -> None:
    options = api.get_options()
    assert options["sd_model_checkpoint"] == "tiny-sdxl"
    assert api.util_get_current_model() == "tiny-sdxl"
    api.util_set_model("tiny-sdxl")
    assert api.set_options({"sd_model_checkpoint": "tiny-sdxl [abc123]"}) is None
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sdxl"
    # webuiapi's set_options returns the body whatever the status: ask directly.
    refused = service.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "sd_model_checkpoint"]
    assert "'nope'" in refused.json()["detail"][0]["msg"]
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sdxl"


def test_listings(api: webuiapi.WebUIApi) -> None:
    assert api.util_get_model_names() == ["tiny-sdxl"]
    model = api.get_sd_models()[0]
    assert set(model) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "LMS", "Heun", "UniPC", "LCM"} <= set(samplers)
    assert "DPM++ 2M Karras" not in samplers and "PLMS" in samplers["PNDM"]["aliases"]
    assert api.util_get_scheduler_names() == ["automatic", "karras"]
    loras = api.get_loras()
    assert loras == [
        {"name": "paper", "alias": "paper", "path": "paper.safetensors", "metadata": {}}
    ]
    names = [u["name"] for u in api.get_upscalers()]
    assert names[:3] == ["None", "Lanczos", "Hires"]
    assert set(api.get_upscalers()[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.get_cmd_flags()["api"] is True
    assert api.get_sd_vae() == [] and api.get_prompt_styles() == []


# -- extras and png-info ---------------------------------------------------------------


def test_extra_single_image_upscales(api: webuiapi.WebUIApi) -> None:
    source = gradient_image(48, 32)
    result = api.extra_single_image(source, upscaler_1="Lanczos", upscaling_resize=2)
    assert result.image.size == (96, 64)
    assert "Lanczos" in result.info
    unchanged = api.extra_single_image(source, upscaler_1="None", upscaling_resize=4)
    assert unchanged.image.size == (48, 32)
    with pytest.raises(RuntimeError) as exc:
        api.extra_single_image(source, upscaler_1="Lanczos", upscaling_resize=3)
    status, body = error_body(exc)
    assert status == 422 and body["detail"][0]["loc"] == ["body", "upscaling_resize"]
    with pytest.raises(RuntimeError) as exc:
        api.extra_single_image(source, upscaler_1="R-ESRGAN 4x+")
    status, body = error_body(exc)
    assert status == 422 and "Lanczos" in body["detail"][0]["msg"]


def test_png_info_reads_what_the_service_wrote(api: webuiapi.WebUIApi) -> None:
    made = api.txt2img(**TINY, seed=4242, negative_prompt="fog")
    info = api.png_info(Image.open(io.BytesIO(png_bytes(made))))
    assert "Seed: 4242" in info.info
    assert info.parameters["Seed"] == "4242"
    assert info.parameters["Prompt"] == "a paper fox"
    assert info.parameters["Negative prompt"] == "fog"
    assert (info.parameters["Size-1"], info.parameters["Size-2"]) == ("64", "64")
    assert info.parameters["Sampler"] == "Euler a"
    plain = api.png_info(gradient_image(8, 8))
    assert plain.info == "" and plain.parameters == {}


def test_parse_infotext_handles_multiline_prompts_and_quotes() -> None:
    text = 'a fox\nin snow\nNegative prompt: fog\nSteps: 2, Sampler: Euler a, Lora: "a:1, b:2"'
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a fox\nin snow"
    assert parsed["Negative prompt"] == "fog"
    assert parsed["Lora"] == "a:1, b:2"


# -- errors ----------------------------------------------------------------------------


def test_errors_in_a1111_shapes(api: webuiapi.WebUIApi, service: LiveService) -> None:
    with pytest.raises(RuntimeError) as exc:
        api.txt2img(**TINY, sampler_name="Euler z")
    status, body = error_body(exc)
    assert status == 404
    assert set(body) == {"error", "detail", "body", "errors"}
    assert "sampler_name 'Euler z'" in body["detail"] and "DPM++ 2M" in body["detail"]
    with pytest.raises(RuntimeError) as exc:
        api.txt2img(**{**TINY, "steps": 0})
    status, body = error_body(exc)
    assert status == 422 and body["detail"][0]["loc"] == ["body", "steps"]
    with pytest.raises(RuntimeError) as exc:
        api.txt2img(**TINY, sampler_name="Euler a", scheduler="Karras")
    status, body = error_body(exc)
    assert status == 422 and body["detail"][0]["loc"] == ["body", "scheduler"]
    with pytest.raises(RuntimeError) as exc:
        api.txt2img(**TINY, scheduler="Exponential")
    assert "Automatic, Karras" in error_body(exc)[1]["detail"][0]["msg"]
    with pytest.raises(RuntimeError) as exc:
        api.txt2img(**TINY, batch_size=5, n_iter=2)
    status, body = error_body(exc)
    assert status == 422 and body["detail"][0]["loc"] == ["body", "batch_size"]
    assert "10 images" in body["detail"][0]["msg"]
    with pytest.raises(RuntimeError) as exc:
        api.txt2img(**TINY, enable_hr=True)
    assert error_body(exc)[1]["detail"][0]["loc"] == ["body", "enable_hr"]
    bad_type = service.client.post("/sdapi/v1/txt2img", json={**TINY, "steps": "many"})
    assert bad_type.status_code == 422 and bad_type.json()["detail"][0]["loc"][-1] == "steps"
    no_image = service.client.post("/sdapi/v1/img2img", json=TINY)
    assert no_image.status_code == 404 and no_image.json()["detail"] == "Init image not found"
    bad_image = service.client.post("/sdapi/v1/img2img", json={**TINY, "init_images": ["%%"]})
    assert bad_image.status_code == 422
    assert bad_image.json()["detail"][0]["loc"] == ["body", "init_images"]


def test_unknown_fields_are_ignored_and_parameters_echo_the_request() -> None:
    body = Img2ImgRequest.model_validate(
        {"init_images": ["x"], "alwayson_scripts": {"x": {}}, "my_extension_field": 1}
    )
    assert "my_extension_field" not in body.model_dump()


def test_a_request_past_the_sync_timeout_names_its_job(
    service: LiveService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service.settings, "sync_timeout_s", 0.3)
    slow = {**TINY, "width": 256, "height": 256, "steps": 120, "seed": 1}
    response = service.client.post("/sdapi/v1/txt2img", json=slow)
    assert response.status_code == 504, response.text
    body = response.json()
    assert body["error"] == "TimeoutError"
    job_id = body["detail"].split("job ")[1].split()[0]
    assert f"GET /v1/jobs/{job_id}" in body["detail"]
    assert service.client.delete(f"/v1/jobs/{job_id}").status_code == 200  # free the worker


def test_options_are_per_caller_never_a_global_switch(make_client: Any) -> None:
    """One app's POST /options (webuiapi's util_set_model) must not switch the model
    under another caller's requests: options are kept per API key."""
    client = make_client(
        api_keys="k1,k2", models='{"second": {"source": "tiny-sd15", "family": "sd15"}}'
    )
    first, second = {"Authorization": "Bearer k1"}, ("someone", "k2")  # Bearer and Basic
    switched = client.post(
        "/sdapi/v1/options", json={"sd_model_checkpoint": "second"}, headers=first
    )
    assert switched.status_code == 200, switched.text
    assert client.get("/sdapi/v1/options", headers=first).json()["sd_model_checkpoint"] == (
        "second"
    )
    theirs = client.get("/sdapi/v1/options", auth=second).json()
    assert theirs["sd_model_checkpoint"] == "tiny-sdxl"
    # Progress and interrupt are per caller too: nothing of k1's shows for k2.
    progress = client.get("/sdapi/v1/progress", auth=second).json()
    assert progress["state"]["job_count"] == 0
    assert client.post("/sdapi/v1/interrupt", auth=second).status_code == 200
