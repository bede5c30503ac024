"""Model families: what each architecture can do and its defaults and bounds. No I/O."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sdworker.errors import ModelLoadError


class Task(StrEnum):
    """What a job asks the engine to do."""

    TEXT2IMG = "text2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    UPSCALE = "upscale"


@dataclass(frozen=True)
class FamilyProfile:
    """Defaults and bounds of one model family; JobSpec validation reads these."""

    name: str
    tasks: frozenset[Task]
    default_size: tuple[int, int]
    min_side: int
    max_side: int
    default_steps: int
    default_guidance: float
    default_scheduler: str


SDXL = FamilyProfile(
    name="sdxl",
    tasks=frozenset({Task.TEXT2IMG, Task.IMG2IMG, Task.INPAINT, Task.UPSCALE}),
    default_size=(1024, 1024),
    min_side=64,
    max_side=2048,
    default_steps=30,
    default_guidance=7.5,
    default_scheduler="euler",
)

FAMILIES: dict[str, FamilyProfile] = {SDXL.name: SDXL}


def served_profile(family: str, model: str) -> FamilyProfile:
    """The profile of a served family; ModelLoadError naming what is served otherwise."""
    try:
        return FAMILIES[family]
    except KeyError:
        raise ModelLoadError(
            f"model {model!r} is a {family} model; this version serves "
            f"{', '.join(sorted(FAMILIES))} models",
            field="model",
        ) from None
