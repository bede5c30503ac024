"""Model families: what each architecture can do, its defaults and its bounds. No I/O."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sdworker.errors import ModelLoadError

# Samplers for the epsilon/v-prediction UNet families (every table entry but the
# flow-matching ones); flow-matching families take only their own.
FLOW_MATCH_SCHEDULERS = ("flow_match_euler",)


class Task(StrEnum):
    """What a job asks the engine to do."""

    TEXT2IMG = "text2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    UPSCALE = "upscale"
    TEXT2VIDEO = "text2video"


class Option(StrEnum):
    """Generation features beyond a family's plain tasks (issue 6): not every
    architecture has the adapters, second text encoder or refiner they rely on."""

    REFINER = "refiner"
    LORAS = "loras"
    PROMPT_WEIGHTING = "prompt_weighting"
    REFERENCE = "reference_type"
    LCM = "lcm"


@dataclass(frozen=True)
class FamilyProfile:
    """Defaults and bounds of one model family; JobSpec validation reads these."""

    name: str
    label: str
    tasks: frozenset[Task]
    default_size: tuple[int, int]  # width, height
    min_side: int
    max_side: int
    default_steps: int
    default_guidance: float
    default_scheduler: str
    size_multiple: int = 8  # VAE downsampling x transformer patch size
    schedulers: tuple[str, ...] | None = None  # None: every non-flow-matching sampler
    options: frozenset[Option] = frozenset()

    def allows_scheduler(self, name: str) -> bool:
        if self.schedulers is None:
            return name not in FLOW_MATCH_SCHEDULERS
        return name in self.schedulers


_IMAGE_TASKS = frozenset({Task.TEXT2IMG, Task.IMG2IMG, Task.INPAINT, Task.UPSCALE})

SDXL = FamilyProfile(
    name="sdxl",
    label="Stable Diffusion XL (base, Turbo, Lightning)",
    tasks=_IMAGE_TASKS,
    default_size=(1024, 1024),
    min_side=64,
    max_side=2048,
    default_steps=30,
    default_guidance=7.5,
    default_scheduler="euler",
    options=frozenset(Option),
)
SD15 = FamilyProfile(
    name="sd15",
    label="Stable Diffusion 1.x",
    tasks=_IMAGE_TASKS,
    default_size=(512, 512),
    min_side=64,
    max_side=1536,
    default_steps=30,
    default_guidance=7.5,
    default_scheduler="pndm",  # SD 1.5's own
)
SD21 = FamilyProfile(
    name="sd21",
    label="Stable Diffusion 2.x (v-prediction 768 and epsilon 512, SD-Turbo)",
    tasks=_IMAGE_TASKS,
    default_size=(768, 768),
    min_side=64,
    max_side=1536,
    default_steps=30,
    default_guidance=7.5,
    default_scheduler="ddim",  # SD 2.1's own
)
SD3 = FamilyProfile(
    name="sd3",
    label="Stable Diffusion 3 / 3.5 (MMDiT: Medium, Large, Large Turbo)",
    tasks=_IMAGE_TASKS,
    default_size=(1024, 1024),
    min_side=64,
    max_side=2048,
    default_steps=28,
    default_guidance=7.0,
    default_scheduler="flow_match_euler",
    size_multiple=16,  # VAE x8, then 2x2 patches
    schedulers=FLOW_MATCH_SCHEDULERS,
)
WAN_T2V = FamilyProfile(
    name="wan-t2v",
    label="Wan2.1 text-to-video",
    tasks=frozenset({Task.TEXT2VIDEO}),
    default_size=(832, 480),
    min_side=64,
    max_side=1280,
    default_steps=50,
    default_guidance=5.0,
    default_scheduler="unipc",  # flow-matching UniPC, Wan's own
    size_multiple=16,
    schedulers=("unipc",),
)
# The SDXL refiner runs only behind an SDXL base (SDWORKER_REFINER), never on its own.
SERVED = (SD15, SD21, SDXL, SD3, WAN_T2V)
FAMILIES: dict[str, FamilyProfile] = {family.name: family for family in SERVED}


def families_for(task: Task) -> list[str]:
    """Names of the families that can run a task."""
    return [family.name for family in SERVED if task in family.tasks]


def families_with(option: Option) -> list[str]:
    return [family.name for family in SERVED if option in family.options]


def served_profile(family: str, model: str) -> FamilyProfile:
    """The profile of a served family; ModelLoadError naming what is served otherwise."""
    try:
        return FAMILIES[family]
    except KeyError:
        hint = " (it runs behind an SDXL base: set SDWORKER_REFINER)" if "refiner" in family else ""
        raise ModelLoadError(
            f"model {model!r} is a {family} model{hint}; this version serves "
            f"{', '.join(FAMILIES)} models",
            field="model",
        ) from None
