"""Scheduler names and aliases -> diffusers scheduler class and config overrides.

The name table is plain data so that request validation (API process, no torch) can
use it; diffusers is imported only when a scheduler is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import SchedulerMixin


@dataclass(frozen=True)
class SchedulerChoice:
    """One selectable sampler: canonical name, diffusers class, overrides, accepted aliases."""

    name: str
    label: str
    class_name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    # Stochastic samplers driven by a Brownian tree take a per-image seed in config.
    seeds_in_config: bool = False


SCHEDULERS: tuple[SchedulerChoice, ...] = (
    SchedulerChoice("ddim", "DDIM", "DDIMScheduler"),
    SchedulerChoice("ddpm", "DDPM", "DDPMScheduler"),
    SchedulerChoice("pndm", "PNDM", "PNDMScheduler", {"skip_prk_steps": True}),
    SchedulerChoice("lms", "LMS", "LMSDiscreteScheduler", aliases=("klms", "k_lms")),
    SchedulerChoice("euler", "Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    SchedulerChoice(
        "euler_a",
        "Euler a",
        "EulerAncestralDiscreteScheduler",
        aliases=("k_euler_ancestral", "euler_ancestral"),
    ),
    SchedulerChoice("heun", "Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
    SchedulerChoice(
        "dpmpp_2m",
        "DPM++ 2M",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        aliases=("dpmsolvermultistep", "k_dpmpp_2m"),
    ),
    SchedulerChoice(
        "dpmpp_2m_karras",
        "DPM++ 2M Karras",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        aliases=("k_dpmpp_2m_karras",),
    ),
    SchedulerChoice(
        "dpmpp_sde",
        "DPM++ SDE",
        "DPMSolverSDEScheduler",
        aliases=("dpmsolversde", "k_dpmpp_sde"),
        seeds_in_config=True,
    ),
    SchedulerChoice("unipc", "UniPC", "UniPCMultistepScheduler", aliases=("unipcmultistep",)),
    SchedulerChoice("lcm", "LCM", "LCMScheduler"),
    # Flow-matching models (SD3) only; see families.FamilyProfile.schedulers.
    SchedulerChoice(
        "flow_match_euler",
        "Flow Euler",
        "FlowMatchEulerDiscreteScheduler",
        aliases=("flowmatcheuler",),
    ),
)


def normalise_key(name: str) -> str:
    """Fold case, spaces, hyphens and '++' so 'DPM++ 2M Karras' == 'dpmpp_2m_karras'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("++", "pp")).strip("_")


# A diffusers class name means its first (default-config) entry, e.g. DPM++ 2M, not Karras.
_BY_KEY: dict[str, SchedulerChoice] = {}
for _choice in reversed(SCHEDULERS):
    _BY_KEY[normalise_key(_choice.class_name)] = _choice
for _choice in SCHEDULERS:
    for _key in (_choice.name, _choice.label, *_choice.aliases):
        _BY_KEY[normalise_key(_key)] = _choice


class UnknownSchedulerError(ValueError):
    """A scheduler name that is not in the table; the message lists the valid names."""


def scheduler_names() -> list[str]:
    """Canonical scheduler names, in table order."""
    return [choice.name for choice in SCHEDULERS]


def find_scheduler(name: str) -> SchedulerChoice:
    """The scheduler for a name or alias (any case; also diffusers class names)."""
    choice = _BY_KEY.get(normalise_key(name))
    if choice is None:
        raise UnknownSchedulerError(
            f"unknown scheduler {name!r}; valid: {', '.join(scheduler_names())} "
            "(aliases such as K_EULER, K_EULER_ANCESTRAL, KLMS, DPMSolverMultistep are accepted)"
        )
    return choice


def canonical_scheduler(value: str | None) -> str | None:
    """A field validator's view: the canonical name, ValueError (listing the valid
    names) for an unknown one, None kept."""
    if value is None:
        return None
    try:
        return find_scheduler(value).name
    except UnknownSchedulerError as exc:
        raise ValueError(str(exc)) from None


def build_scheduler(choice: SchedulerChoice, base_config: Any, seeds: list[int]) -> SchedulerMixin:
    """A fresh scheduler from the model's own scheduler config plus the choice's overrides.

    A fresh instance per job: schedulers hold per-run state and are not thread-safe.
    """
    import diffusers

    cls = getattr(diffusers, choice.class_name)
    overrides = dict(choice.overrides)
    if choice.seeds_in_config:
        # One Brownian tree per image, seeded like the image's initial noise, so that
        # image i of a batch equals a lone image with seed + i.
        overrides["noise_sampler_seed"] = list(seeds)
    scheduler: SchedulerMixin = cls.from_config(base_config, **overrides)
    return scheduler
