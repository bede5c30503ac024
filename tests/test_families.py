"""Family profiles: defaults, bounds, which tasks and features each family takes."""

from __future__ import annotations

from typing import Any

import pytest

from sdworker.errors import InvalidJobError
from sdworker.families import FAMILIES, SD3, SD15, SD21, SDXL, Task, families_for
from sdworker.jobs import JobSpec
from sdworker.planning import GenerationPlan, generated_frame_count, plan_generation


def _plan(family: str, **fields: Any) -> GenerationPlan:
    return plan_generation(JobSpec(prompt="x", **fields), FAMILIES[family], max_num_images=8)


def _refused(family: str, field: str, **fields: Any) -> str:
    with pytest.raises(InvalidJobError) as caught:
        _plan(family, **fields)
    assert caught.value.field == field, caught.value.message
    return caught.value.message


@pytest.mark.parametrize(
    ("profile", "size", "steps", "guidance", "scheduler"),
    [
        (SD15, (512, 512), 30, 7.5, "pndm"),
        (SD21, (768, 768), 30, 7.5, "ddim"),
        (SDXL, (1024, 1024), 30, 7.5, "euler"),
        (SD3, (1024, 1024), 28, 7.0, "flow_match_euler"),
    ],
)
def test_family_defaults(
    profile: Any, size: tuple[int, int], steps: int, guidance: float, scheduler: str
) -> None:
    plan = _plan(profile.name)
    assert (plan.width, plan.height) == size
    assert (plan.num_inference_steps, plan.guidance_scale, plan.scheduler) == (
        steps,
        guidance,
        scheduler,
    )
    assert plan.task is Task.TEXT2IMG


def test_video_defaults_are_the_replaced_endpoints() -> None:
    plan = _plan("wan-t2v")
    assert plan.task is Task.TEXT2VIDEO
    assert (plan.width, plan.height) == (832, 480)
    assert plan.video is not None
    assert (plan.video.num_frames, plan.video.fps, plan.video.generated_frames) == (81, 15, 81)
    assert plan.guidance_scale == 5.0 and plan.scheduler == "unipc"


def test_video_fields() -> None:
    plan = _plan("wan-t2v", video_width=1280, video_height=720, num_frames=16, fps=24,
                 video_guidance_scale=6.0, steps=4)  # fmt: skip
    assert (plan.width, plan.height) == (1280, 720)
    assert plan.video is not None and plan.video.num_frames == 16
    assert plan.video.generated_frames == 17  # 4k + 1, the extra frame is dropped
    assert plan.video.fps == 24 and plan.guidance_scale == 6.0


@pytest.mark.parametrize(("asked", "made"), [(16, 17), (17, 17), (18, 21), (81, 81), (20, 21)])
def test_generated_frames_are_4k_plus_1(asked: int, made: int) -> None:
    assert generated_frame_count(asked) == made


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"num_frames": 15}, "num_frames"),
        ({"num_frames": 82}, "num_frames"),
        ({"fps": 5}, "fps"),
        ({"fps": 31}, "fps"),
        ({"video_height": 500}, "video_height"),
        ({"video_width": 800}, "video_width"),
    ],
)
def test_video_fields_out_of_range_name_the_field(fields: dict[str, int], field: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        JobSpec(prompt="x", **fields)
    assert caught.value.errors()[0]["loc"] in ((field,), ())
    assert field in str(caught.value)


def test_a_task_the_family_cannot_do_names_the_families_that_can() -> None:
    message = _refused("sdxl", "task", task="text2video")
    assert "families that can: wan-t2v" in message
    message = _refused("wan-t2v", "task", task="img2img", image="x")
    assert "sd15, sd21, sdxl, sd3" in message
    assert families_for(Task.INPAINT) == ["sd15", "sd21", "sdxl", "sd3"]


def test_video_fields_on_an_image_job_are_refused() -> None:
    assert "text2video" in _refused("sdxl", "num_frames", task="text2img", num_frames=17)


def test_sizes_follow_the_family_multiple() -> None:
    assert _plan("sd15", width=520, height=512).width == 520
    assert "multiple of 16" in _refused("sd3", "width", width=520, height=512)
    assert "multiple of 16" in _refused("wan-t2v", "height", width=832, height=488)


def test_flow_matching_families_take_only_their_sampler() -> None:
    assert "allowed: flow_match_euler" in _refused("sd3", "scheduler", scheduler="euler")
    assert "allowed: unipc" in _refused("wan-t2v", "scheduler", scheduler="ddim")
    assert "flow_match_euler" in _refused("sd15", "scheduler", scheduler="flow_match_euler")
    assert _plan("sd15", scheduler="K_EULER_ANCESTRAL").scheduler == "euler_a"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"loras": [{"name": "a"}]}, "loras"),
        ({"style": {"name": "a"}}, "style"),
        ({"prompt_weighting": True}, "prompt_weighting"),
        ({"compel_weights": "(x:1.2)"}, "compel_weights"),
        ({"high_quality": True}, "high_quality"),
        ({"refiner": "refine"}, "refiner"),
        ({"reference_type": "style", "image": "x"}, "reference_type"),
        ({"preset": "lcm"}, "preset"),
    ],
)
@pytest.mark.parametrize("family", ["sd15", "sd21", "sd3"])
def test_sdxl_only_features_are_refused_on_other_families(
    family: str, fields: dict[str, Any], field: str
) -> None:
    assert "families that do: sdxl" in _refused(family, field, **fields)


def test_turbo_preset_keeps_a_flow_models_own_sampler() -> None:
    plan = _plan("sd3", preset="turbo")
    assert plan.scheduler == "flow_match_euler" and plan.guidance_scale == 0.0
