"""Scheduler names, aliases and building diffusers schedulers from an SDXL config."""

from __future__ import annotations

from typing import Any

import diffusers
import pytest

from sdworker.engine.schedulers import (
    SCHEDULERS,
    UnknownSchedulerError,
    build_scheduler,
    find_scheduler,
    normalise_key,
    scheduler_names,
)

EXPECTED_CLASSES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "dpmpp_sde": "DPMSolverSDEScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
    "flow_match_euler": "FlowMatchEulerDiscreteScheduler",
}


@pytest.fixture(scope="module")
def sdxl_config() -> Any:
    """The scheduler config an SDXL checkpoint ships with."""
    return diffusers.EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    ).config


def build(name: str, config: Any, seeds: list[int] | None = None) -> Any:
    return build_scheduler(find_scheduler(name), config, seeds if seeds is not None else [0])


def test_scheduler_names_are_the_table_in_order() -> None:
    assert scheduler_names() == list(EXPECTED_CLASSES)
    assert len(set(scheduler_names())) == len(scheduler_names())


@pytest.mark.parametrize("name", list(EXPECTED_CLASSES))
def test_every_scheduler_builds(name: str, sdxl_config: Any) -> None:
    scheduler = build(name, sdxl_config, [1, 2])
    assert type(scheduler).__name__ == EXPECTED_CLASSES[name]
    assert isinstance(scheduler, getattr(diffusers, EXPECTED_CLASSES[name]))
    # the model's own noise schedule is kept
    assert scheduler.config.beta_start == 0.00085
    assert scheduler.config.beta_end == 0.012
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.num_train_timesteps == 1000
    # and it is usable
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) >= 10


def test_every_table_name_is_covered() -> None:
    assert {choice.name for choice in SCHEDULERS} == set(EXPECTED_CLASSES)


def test_karras_sigmas(sdxl_config: Any) -> None:
    karras = build("dpmpp_2m_karras", sdxl_config)
    plain = build("dpmpp_2m", sdxl_config)
    assert karras.config.use_karras_sigmas is True
    assert plain.config.use_karras_sigmas is False
    for scheduler in (karras, plain):
        assert scheduler.config.algorithm_type == "dpmsolver++"
        assert scheduler.config.solver_order == 2
    karras.set_timesteps(20)
    plain.set_timesteps(20)
    assert karras.timesteps.tolist() != plain.timesteps.tolist()


def test_pndm_skips_prk_steps(sdxl_config: Any) -> None:
    assert build("pndm", sdxl_config).config.skip_prk_steps is True


def test_dpmpp_sde_gets_the_seeds(sdxl_config: Any) -> None:
    seeds = [7, 8, 9]
    scheduler = build("dpmpp_sde", sdxl_config, seeds)
    assert scheduler.config.noise_sampler_seed == [7, 8, 9]
    seeds.append(10)  # the scheduler holds its own copy
    assert scheduler.config.noise_sampler_seed == [7, 8, 9]
    # the table entry is not changed by building
    assert "noise_sampler_seed" not in find_scheduler("dpmpp_sde").overrides


@pytest.mark.parametrize("name", [n for n in EXPECTED_CLASSES if n != "dpmpp_sde"])
def test_other_schedulers_get_no_seed(name: str, sdxl_config: Any) -> None:
    assert "noise_sampler_seed" not in build(name, sdxl_config, [5]).config


def test_each_build_is_a_fresh_instance(sdxl_config: Any) -> None:
    first = build("euler", sdxl_config)
    second = build("euler", sdxl_config)
    assert first is not second
    first.set_timesteps(5)
    second.set_timesteps(25)
    assert len(first.timesteps) == 5


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("PNDM", "pndm"),
        ("KLMS", "lms"),
        ("K_LMS", "lms"),
        ("DDIM", "ddim"),
        ("K_EULER", "euler"),
        ("K_EULER_ANCESTRAL", "euler_a"),
        ("Euler a", "euler_a"),
        ("euler-ancestral", "euler_a"),
        ("DPMSolverMultistep", "dpmpp_2m"),
        ("DPM++ 2M", "dpmpp_2m"),
        ("DPM++ 2M Karras", "dpmpp_2m_karras"),
        ("K_DPMPP_2M_KARRAS", "dpmpp_2m_karras"),
        ("DPM++ SDE", "dpmpp_sde"),
        ("UniPC", "unipc"),
        ("LCM", "lcm"),
        ("Heun", "heun"),
        ("DDPM", "ddpm"),
        ("  euler  ", "euler"),
    ],
)
def test_aliases_resolve(alias: str, name: str) -> None:
    assert find_scheduler(alias).name == name


def test_diffusers_class_name_resolves_like_its_alias() -> None:
    assert find_scheduler("DPMSolverMultistep").name == "dpmpp_2m"
    assert find_scheduler("DPMSolverMultistepScheduler").name == "dpmpp_2m"


@pytest.mark.parametrize(
    ("class_name", "name"),
    [
        ("DDIMScheduler", "ddim"),
        ("EulerDiscreteScheduler", "euler"),
        ("EulerAncestralDiscreteScheduler", "euler_a"),
        ("LMSDiscreteScheduler", "lms"),
        ("DPMSolverSDEScheduler", "dpmpp_sde"),
        ("UniPCMultistepScheduler", "unipc"),
    ],
)
def test_unique_diffusers_class_names_resolve(class_name: str, name: str) -> None:
    assert find_scheduler(class_name).name == name


@pytest.mark.parametrize("name", list(EXPECTED_CLASSES))
def test_canonical_and_label_names_resolve(name: str) -> None:
    choice = find_scheduler(name)
    assert choice.name == name
    assert find_scheduler(choice.label) is choice
    assert find_scheduler(name.upper()) is choice


def test_normalise_key() -> None:
    assert normalise_key("DPM++ 2M Karras") == "dpmpp_2m_karras"
    assert normalise_key("  K-Euler  a ") == "k_euler_a"


@pytest.mark.parametrize("name", ["warp", "", "DPM++ 3M", "euler_b", "dpm"])
def test_unknown_scheduler(name: str) -> None:
    with pytest.raises(UnknownSchedulerError) as info:
        find_scheduler(name)
    message = str(info.value)
    assert repr(name) in message
    for valid in scheduler_names():
        assert valid in message
    assert isinstance(info.value, ValueError)
