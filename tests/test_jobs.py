"""JobSpec validation and plan_generation against the SDXL family profile."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sdworker import planning
from sdworker.engine.schedulers import scheduler_names
from sdworker.errors import InvalidJobError
from sdworker.families import SDXL, Task
from sdworker.jobs import SEED_MAX, JobSpec, describe_validation_error
from sdworker.planning import GenerationMode, plan_generation

IMG = "input.png"
MASK = "mask.png"


def spec_error(**kwargs: Any) -> str:
    """describe_validation_error output for a JobSpec that must not validate."""
    with pytest.raises(ValidationError) as info:
        JobSpec(**kwargs)
    return describe_validation_error(info.value)


def plan(max_num_images: int = 8, **kwargs: Any) -> planning.GenerationPlan:
    return plan_generation(JobSpec(**kwargs), SDXL, max_num_images=max_num_images)


def plan_error(max_num_images: int = 8, **kwargs: Any) -> InvalidJobError:
    with pytest.raises(InvalidJobError) as info:
        plan(max_num_images=max_num_images, **kwargs)
    return info.value


# --------------------------------------------------------------------------- JobSpec: size


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("1024x1024", (1024, 1024)),
        ("768*512", (768, 512)),
        (" 640 X 480 ", (640, 480)),
        ("832\u00d71216", (832, 1216)),  # multiplication sign
    ],
)
def test_size_sets_width_and_height(size: str, expected: tuple[int, int]) -> None:
    spec = JobSpec(size=size)
    assert (spec.width, spec.height) == expected


def test_size_agreeing_with_width_and_height_is_accepted() -> None:
    spec = JobSpec(size="768x512", width=768, height=512)
    assert (spec.width, spec.height) == (768, 512)


@pytest.mark.parametrize(
    ("extra", "name"), [({"width": 512}, "width"), ({"height": 1000}, "height")]
)
def test_size_conflicting_with_width_or_height_is_an_error(
    extra: dict[str, int], name: str
) -> None:
    message = spec_error(size="1024x1024", **extra)
    assert "size" in message
    assert name in message
    assert "1024x1024" in message


@pytest.mark.parametrize("size", ["1024", "1024x", "x1024", "axb", "1024x1024x3", "-8x8", ""])
def test_malformed_size_is_an_error(size: str) -> None:
    message = spec_error(size=size)
    assert "size" in message
    assert "1024x1024" in message  # shows the expected form


def test_size_with_zero_side_is_rejected() -> None:
    with pytest.raises(ValidationError):
        JobSpec(size="0x512")


def test_width_zero_is_rejected() -> None:
    assert spec_error(width=0).startswith("width:")


# --------------------------------------------------------------------------- JobSpec: bounds


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("steps", [1, 30, 150], [0, 151, -1]),
        ("guidance_scale", [0, 0.0, 7.5, 30], [-0.1, 30.01, 31]),
        ("seed", [0, 1, 2**32 - 1], [-1, 2**32, 2**40]),
        ("strength", [0, 0.5, 1], [-0.01, 1.01]),
        ("reference_strength", [0, 0.3, 1], [-0.01, 1.5]),
        ("num_images", [1, 8, 64], [0, 65, -3]),
    ],
)
def test_numeric_bounds(name: str, good: list[float], bad: list[float]) -> None:
    for value in good:
        assert getattr(JobSpec(**{name: value}), name) == value
    for value in bad:
        message = spec_error(**{name: value})
        assert message.startswith(f"{name}: "), message
        assert repr(value) in message  # the offending input is echoed
        assert ";" not in message  # exactly one problem


def test_seed_max_constant() -> None:
    assert SEED_MAX == 2**32 - 1


def test_unknown_fields_are_rejected() -> None:
    message = spec_error(prompt="x", cfg_scale=7)
    assert message.startswith("cfg_scale: ")
    assert "not permitted" in message.lower()


def test_describe_validation_error_gives_one_line_per_problem() -> None:
    message = spec_error(steps=0, seed=-1, bogus=True)
    parts = message.split("; ")
    assert len(parts) == 3
    assert sorted(part.split(":", 1)[0] for part in parts) == ["bogus", "seed", "steps"]


def test_describe_validation_error_type_errors_name_field_and_input() -> None:
    message = spec_error(steps="many")
    assert message.startswith("steps: ")
    assert "'many'" in message


# --------------------------------------------------------------------------- JobSpec: scheduler


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("K_EULER_ANCESTRAL", "euler_a"),
        ("Euler a", "euler_a"),
        ("DPM++ 2M Karras", "dpmpp_2m_karras"),
        ("DPM++ 2M", "dpmpp_2m"),
        ("DPMSolverMultistep", "dpmpp_2m"),
        ("K_EULER", "euler"),
        ("KLMS", "lms"),
        ("EulerDiscreteScheduler", "euler"),
        ("euler", "euler"),
        ("UniPC", "unipc"),
    ],
)
def test_scheduler_aliases_are_canonicalised(given: str, canonical: str) -> None:
    assert JobSpec(scheduler=given).scheduler == canonical


def test_scheduler_none_stays_none() -> None:
    assert JobSpec().scheduler is None


def test_unknown_scheduler_lists_valid_names_and_names_the_field() -> None:
    message = spec_error(scheduler="warp_drive")
    assert message.startswith("scheduler: ")
    assert "warp_drive" in message
    for name in scheduler_names():
        assert name in message
    assert "Value error" not in message


# --------------------------------------------------------------------------- plan: defaults


def test_plan_defaults_for_sdxl_text2img() -> None:
    result = plan(prompt="a cat", seed=5)
    assert result.task is Task.TEXT2IMG
    assert result.mode is GenerationMode.TEXT2IMG
    assert (result.width, result.height) == (1024, 1024)
    assert result.num_inference_steps == 30
    assert result.denoise_steps == 30
    assert result.guidance_scale == 7.5
    assert result.scheduler == "euler"
    assert result.strength is None
    assert result.seeds == [5]
    assert result.num_images == 1
    assert result.prompt == "a cat"
    assert result.negative_prompt is None
    assert result.warnings == []


def test_plan_keeps_explicit_values() -> None:
    result = plan(
        width=768,
        height=512,
        steps=12,
        guidance_scale=0,
        scheduler="K_EULER_ANCESTRAL",
        negative_prompt="blurry",
        seed=1,
    )
    assert (result.width, result.height) == (768, 512)
    assert result.num_inference_steps == 12
    assert result.guidance_scale == 0  # 0 is a value, not "use the default"
    assert result.scheduler == "euler_a"
    assert result.negative_prompt == "blurry"


def test_plan_empty_negative_prompt_becomes_none() -> None:
    assert plan(negative_prompt="").negative_prompt is None


# --------------------------------------------------------------------------- plan: size bounds


@pytest.mark.parametrize(("width", "height"), [(64, 64), (2048, 2048), (64, 2048), (1016, 1024)])
def test_plan_accepts_sizes_in_bounds(width: int, height: int) -> None:
    result = plan(width=width, height=height)
    assert (result.width, result.height) == (width, height)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"width": 1020}, "width"),  # not a multiple of 8
        ({"height": 1001}, "height"),
        ({"width": 56}, "width"),  # below 64
        ({"height": 2056}, "height"),  # above 2048
        ({"size": "4096x1024"}, "width"),
        ({"size": "1024x8"}, "height"),
    ],
)
def test_plan_rejects_sizes_out_of_bounds(kwargs: dict[str, Any], name: str) -> None:
    error = plan_error(**kwargs)
    assert error.field == name
    assert error.message.startswith(f"{name}: ")
    assert "multiple of 8" in error.message
    assert "64" in error.message and "2048" in error.message
    assert error.code == "invalid_request"


# --------------------------------------------------------------------------- plan: num_images


@pytest.mark.parametrize("count", [1, 3, 6, 8])
def test_plan_accepts_num_images_up_to_limit(count: int) -> None:
    result = plan(num_images=count, seed=10)
    assert result.num_images == count
    assert result.seeds == list(range(10, 10 + count))


@pytest.mark.parametrize("count", [9, 64])
def test_plan_rejects_num_images_over_limit(count: int) -> None:
    error = plan_error(num_images=count)
    assert error.field == "num_images"
    assert str(count) in error.message and "8" in error.message


def test_plan_num_images_limit_is_the_argument() -> None:
    assert plan(max_num_images=2, num_images=2).num_images == 2
    assert plan_error(max_num_images=2, num_images=3).field == "num_images"


# --------------------------------------------------------------------------- plan: seeds


def test_plan_random_seed_when_none(monkeypatch: pytest.MonkeyPatch) -> None:
    bounds: list[int] = []

    def fake_randbelow(upper: int) -> int:
        bounds.append(upper)
        return 123456

    monkeypatch.setattr(planning.secrets, "randbelow", fake_randbelow)
    result = plan(num_images=3)
    assert bounds == [2**32]  # draws from the whole valid seed range
    assert result.seeds == [123456, 123457, 123458]


def test_plan_random_seeds_are_valid_and_vary() -> None:
    drawn = {plan().seeds[0] for _ in range(5)}
    assert all(0 <= seed <= SEED_MAX for seed in drawn)
    assert len(drawn) > 1


def test_plan_seeds_wrap_at_2_to_the_32() -> None:
    result = plan(seed=SEED_MAX - 1, num_images=4)
    assert result.seeds == [SEED_MAX - 1, SEED_MAX, 0, 1]
    # every returned seed is itself a valid input seed
    for seed in result.seeds:
        JobSpec(seed=seed)


# --------------------------------------------------------------------------- plan: task inference


@pytest.mark.parametrize(
    ("kwargs", "task", "mode"),
    [
        ({}, Task.TEXT2IMG, GenerationMode.TEXT2IMG),
        ({"image": IMG}, Task.IMG2IMG, GenerationMode.REFERENCE_MODIFY),
        ({"image": IMG, "mask": MASK}, Task.INPAINT, GenerationMode.INPAINT),
    ],
)
def test_plan_infers_task(kwargs: dict[str, str], task: Task, mode: GenerationMode) -> None:
    result = plan(**kwargs)
    assert result.task is task
    assert result.mode is mode
    assert result.image == kwargs.get("image")
    assert result.mask == kwargs.get("mask")


def test_task_accepts_string_value() -> None:
    assert JobSpec(task="img2img").task is Task.IMG2IMG
    assert JobSpec(task="upscale").task is Task.UPSCALE
    assert JobSpec(task="text2video").task is Task.TEXT2VIDEO
    assert spec_error(task="video2video").startswith("task: ")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"task": "img2img"}, "image"),
        ({"task": "inpaint"}, "image"),
        ({"task": "inpaint", "image": IMG}, "mask"),
        ({"task": "text2img", "image": IMG}, "task"),
        ({"task": "text2img", "mask": MASK}, "task"),
    ],
)
def test_plan_task_inputs_mismatch(kwargs: dict[str, str], name: str) -> None:
    error = plan_error(**kwargs)
    assert error.field == name
    assert error.message.startswith(f"{name}: ")


def test_plan_text2img_with_image_message_mentions_image() -> None:
    assert "image" in plan_error(task="text2img", image=IMG).message


# --------------------------------------------------------------------------- plan: strengths


def test_plan_default_strengths() -> None:
    img2img = plan(image=IMG, steps=20)
    assert img2img.strength == 0.75
    assert img2img.denoise_steps == 15
    assert img2img.num_inference_steps == 20
    inpaint = plan(image=IMG, mask=MASK, steps=20)
    assert inpaint.strength == 1.0
    assert inpaint.denoise_steps == 20


def test_plan_text2img_ignores_strength() -> None:
    result = plan(strength=0.3, steps=20)
    assert result.strength is None
    assert result.denoise_steps == 20


def test_reference_modify_keeps_values_as_given() -> None:
    result = plan(
        image=IMG, strength=0.6, steps=25, guidance_scale=4.0, negative_prompt="ugly", seed=3
    )
    assert result.mode is GenerationMode.REFERENCE_MODIFY
    assert result.strength == 0.6
    assert result.num_inference_steps == 25
    assert result.guidance_scale == 4.0
    assert result.negative_prompt == "ugly"
    assert result.denoise_steps == int(25 * 0.6) == 15
    assert result.warnings == []


@pytest.mark.parametrize("strength", [0.1, 0.33, 0.5, 0.77, 0.99, 1.0])
@pytest.mark.parametrize("steps", [10, 30, 37, 150])
def test_reference_modify_denoise_steps(strength: float, steps: int) -> None:
    result = plan(image=IMG, strength=strength, steps=steps)
    assert result.denoise_steps == int(steps * strength)


def test_reference_strength_is_inverted() -> None:
    result = plan(image=IMG, reference_strength=0.3, steps=30)
    assert result.strength == pytest.approx(0.7)
    assert result.denoise_steps == int(30 * result.strength)
    assert result.warnings == []


def test_strength_wins_over_reference_strength_with_warning() -> None:
    result = plan(image=IMG, strength=0.4, reference_strength=0.3)
    assert result.strength == 0.4
    assert len(result.warnings) == 1
    assert "reference_strength" in result.warnings[0]


def test_reference_strength_applies_to_inpaint() -> None:
    assert plan(image=IMG, mask=MASK, reference_strength=0.25).strength == pytest.approx(0.75)


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.05), (3, 0.3), (1, 0.99), (30, 0.0)])
def test_plan_rejects_strength_with_no_denoise_step(steps: int, strength: float) -> None:
    error = plan_error(image=IMG, steps=steps, strength=strength)
    assert error.field == "strength"
    assert error.message.startswith("strength: ")
    assert f"steps={steps}" in error.message


def test_plan_accepts_exactly_one_denoise_step() -> None:
    assert plan(image=IMG, steps=10, strength=0.1).denoise_steps == 1


# --------------------------------------------------------------------------- plan: exact copy


@pytest.mark.parametrize(
    ("given", "expected"), [(0.5, 0.05), (1.0, 0.05), (0.05, 0.05), (0.02, 0.02), (0, 0.01)]
)
def test_exact_copy_clamps_strength(given: float, expected: float) -> None:
    result = plan(image=IMG, exact_copy_mode=True, strength=given)
    assert result.mode is GenerationMode.EXACT_COPY
    assert result.task is Task.IMG2IMG
    assert result.strength == pytest.approx(expected)


def test_exact_copy_default_strength_is_clamped() -> None:
    assert plan(image=IMG, exact_copy_mode=True).strength == pytest.approx(0.05)


def test_exact_copy_forces_guidance_and_drops_negative_prompt() -> None:
    result = plan(image=IMG, exact_copy_mode=True, guidance_scale=9.0, negative_prompt="bad hands")
    assert result.guidance_scale == 1.0
    assert result.negative_prompt is None
    assert len(result.warnings) == 1
    assert "negative_prompt" in result.warnings[0]


def test_exact_copy_without_negative_prompt_has_no_warning() -> None:
    assert plan(image=IMG, exact_copy_mode=True).warnings == []


def test_exact_copy_denoise_steps_for_every_strength() -> None:
    seen = set()
    for i in range(10, 51):  # 0.010 .. 0.050 in 0.001 steps
        strength = i / 1000
        result = plan(image=IMG, exact_copy_mode=True, strength=strength, steps=30)
        assert 6 <= result.denoise_steps <= 10, strength
        # diffusers' img2img runs int(num_inference_steps * strength) steps
        assert int(result.num_inference_steps * result.strength) == result.denoise_steps, (
            strength,
            result.num_inference_steps,
        )
        seen.add(result.denoise_steps)
    # denoise steps grow with strength across the whole 6..10 range
    assert seen == {6, 7, 8, 9, 10}


def test_exact_copy_denoise_steps_at_range_ends() -> None:
    assert plan(image=IMG, exact_copy_mode=True, strength=0.01).denoise_steps == 6
    assert plan(image=IMG, exact_copy_mode=True, strength=0.05).denoise_steps == 10


@pytest.mark.parametrize("kwargs", [{}, {"image": IMG, "mask": MASK}, {"task": "text2img"}])
def test_exact_copy_only_for_img2img(kwargs: dict[str, str]) -> None:
    error = plan_error(exact_copy_mode=True, **kwargs)
    assert error.field == "exact_copy_mode"
    assert "img2img" in error.message
