"""AUTOMATIC1111 requests -> JobSpec fields, and finished jobs -> A1111's `info`.

Samplers: A1111 names a sampler ("DPM++ 2M") and, since 1.9, a schedule type
("Karras") apart; the old combined names ("DPM++ 2M Karras") are still accepted. Here
the schedule type is Automatic (the sampler's own) or Karras with DPM++ 2M, the
combination sdworker has; anything else is refused naming the allowed values.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from PIL import Image, ImageOps

from sdworker import fetch
from sdworker.api.dialects.a1111_models import GenerationRequest, Img2ImgRequest
from sdworker.api.dialects.base import StatusError
from sdworker.engine.schedulers import (
    SCHEDULERS,
    SchedulerChoice,
    UnknownSchedulerError,
    find_scheduler,
    normalise_key,
)
from sdworker.errors import InvalidJobError
from sdworker.jobs import Job, ResizeMode
from sdworker.media import PARAMETERS_CHUNK

KARRAS = "dpmpp_2m_karras"
# A1111 spellings sdworker's scheduler table does not know.
EXTRA_ALIASES = {"pndm": ("PLMS",), "euler_a": ("k_euler_a",), "dpmpp_2m": ("k_dpmpp_2m",)}
SCHEDULE_TYPES = ("Automatic", "Karras")
# img2img resize_mode: 0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize
# (latent upscale; here the same as 0).
RESIZE_MODES = {0: ResizeMode.STRETCH, 1: ResizeMode.CROP, 2: ResizeMode.PAD, 3: ResizeMode.STRETCH}
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)((?::[^:>]*)*)>", re.IGNORECASE)
# One "Key: value" pair of an infotext's last line (A1111's re_param).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
IGNORED_INFO_KEYS = {"exif", "icc_profile", "dpi", "transparency", "gamma", "srgb"}


def sampler_choices() -> list[SchedulerChoice]:
    """The samplers A1111 clients can name: every scheduler but the Karras variant,
    which is DPM++ 2M with the Karras schedule type."""
    return [choice for choice in SCHEDULERS if choice.name != KARRAS]


def sampler_entries() -> list[dict[str, Any]]:
    """GET /samplers."""
    return [
        {
            "name": choice.label,
            "aliases": [choice.name, *choice.aliases, *EXTRA_ALIASES.get(choice.name, ())],
            "options": {},
        }
        for choice in sampler_choices()
    ]


def _lookup(name: str) -> SchedulerChoice | None:
    key = normalise_key(name)
    for canonical, aliases in EXTRA_ALIASES.items():
        if key in {normalise_key(alias) for alias in aliases}:
            return find_scheduler(canonical)
    try:
        return find_scheduler(name)
    except UnknownSchedulerError:
        return None


def _schedule_type(scheduler: str | None) -> bool:
    """True for Karras, False for Automatic; anything else is refused."""
    value = (scheduler or "automatic").strip().lower()
    if value not in {kind.lower() for kind in SCHEDULE_TYPES}:
        raise InvalidJobError(
            f"scheduler: {scheduler!r} is not supported; allowed: Automatic, Karras "
            "(with DPM++ 2M)",
            field="scheduler",
        )
    return value == "karras"


def resolve_sampler(body: GenerationRequest) -> str | None:
    """sampler_name (or sampler_index) plus scheduler -> sdworker's scheduler name;
    None: the model's default."""
    field = "sampler_name" if body.sampler_name else "sampler_index"
    given = body.sampler_name or body.sampler_index
    karras = _schedule_type(body.scheduler)
    if not given:
        if karras:
            raise InvalidJobError(
                "scheduler: Karras needs sampler_name 'DPM++ 2M'", field="scheduler"
            )
        return None
    name = given.strip()
    if name.lower().endswith(" karras"):  # pre-1.9 combined names
        name, karras = name[: -len(" karras")], True
    choice = _lookup(name)
    if choice is None:
        allowed = ", ".join(c.label for c in sampler_choices())
        raise StatusError(
            404,
            f"Sampler not found: {field} {given!r}; allowed: {allowed} (and 'DPM++ 2M Karras')",
            code="sampler_not_found",
            field=field,
        )
    if not karras:
        return choice.name
    if choice.name not in {"dpmpp_2m", KARRAS}:
        raise InvalidJobError(
            f"scheduler: Karras works with 'DPM++ 2M' only here, not {choice.label!r}; "
            "use scheduler 'Automatic' with other samplers",
            field="scheduler",
        )
    return KARRAS


def split_loras(prompt: str, *, keep: bool = True) -> tuple[str, list[dict[str, Any]]]:
    """`<lora:name:weight>` tags -> (the prompt without them, [{name, weight}]); keep=False
    (disable_extra_networks) drops the LoRAs but still strips the tags, as A1111 does."""
    loras: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        name, rest = match.group(1).strip(), match.group(2)
        parts = [part.strip() for part in rest.split(":")[1:]]
        weight = 1.0
        if parts and parts[0]:
            try:
                weight = float(parts[0])
            except ValueError:
                raise InvalidJobError(
                    f"prompt: LoRA tag {match.group(0)!r}: weight {parts[0]!r} is not a number",
                    field="prompt",
                ) from None
        loras.append({"name": name, "weight": weight})
        return ""

    stripped = LORA_TAG.sub(take, prompt)
    stripped = re.sub(r"[ \t]{2,}", " ", stripped).strip().strip(",").strip()
    return stripped, loras if keep else []


def _refuse_unsupported(body: GenerationRequest) -> None:
    if body.script_name:
        raise StatusError(422, f"Script '{body.script_name}' not found", code="script_not_found")
    if getattr(body, "enable_hr", False):
        raise InvalidJobError(
            "enable_hr: hires fix is not supported; generate, then upscale with POST "
            "/sdapi/v1/extra-single-image (upscaler_1 'Hires' re-denoises at the larger size)",
            field="enable_hr",
        )


def generation_fields(
    body: GenerationRequest, model: str, max_images: int, metadata: dict[str, Any]
) -> dict[str, Any]:
    """The JobSpec fields of a txt2img or img2img request (model already resolved)."""
    _refuse_unsupported(body)
    num_images = body.batch_size * body.n_iter
    if num_images > max_images:
        raise InvalidJobError(
            f"batch_size: batch_size x n_iter = {num_images} images; at most {max_images} "
            "per request here",
            field="batch_size",
        )
    prompt, loras = split_loras(body.prompt, keep=not body.disable_extra_networks)
    fields: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "negative_prompt": body.negative_prompt or None,
        "num_images": num_images,
        "seed": body.seed if body.seed >= 0 else None,
        "scheduler": resolve_sampler(body),
        "steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "width": body.width,
        "height": body.height,
        "loras": loras,
        "metadata": metadata,
    }
    if body.refiner_checkpoint:
        fields["refiner"] = "ensemble"
        fields["high_noise_frac"] = body.refiner_switch_at
    if isinstance(body, Img2ImgRequest):
        fields |= img2img_fields(body)
    return fields


def img2img_fields(body: Img2ImgRequest) -> dict[str, Any]:
    images = body.init_images or []
    if not images:
        raise StatusError(404, "Init image not found", code="init_image_missing")
    if len(images) > 1:
        raise InvalidJobError(
            f"init_images: one image per request here, not {len(images)}", field="init_images"
        )
    if body.resize_mode not in RESIZE_MODES:
        raise InvalidJobError(
            f"resize_mode: must be 0, 1, 2 or 3, not {body.resize_mode}", field="resize_mode"
        )
    fields: dict[str, Any] = {
        "image": images[0],
        "strength": body.denoising_strength if body.denoising_strength is not None else 0.75,
        "resize_mode": RESIZE_MODES[body.resize_mode],
    }
    if body.mask:
        fields["mask"] = inverted(body.mask) if body.inpainting_mask_invert else body.mask
    return fields


def decode_image(value: str, field: str) -> Image.Image:
    """A base64 or data-URI image (fetch.decode_image: formats, pixel cap), or a 422
    naming the field."""
    data = value.strip()
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise InvalidJobError(f"{field}: not a base64 or data-URI image", field=field) from None
    return fetch.decode_image(raw, field=field)


def inverted(mask: str) -> str:
    """inpainting_mask_invert: the mask with black and white swapped, as base64 PNG."""
    if mask.startswith(("http://", "https://")):
        raise InvalidJobError(
            "inpainting_mask_invert: needs the mask as base64, not a URL", field="mask"
        )
    image = ImageOps.invert(decode_image(mask, "mask").convert("L"))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def read_infotext(image: Image.Image) -> str | None:
    """The generation parameters an image carries: PNG text or EXIF UserComment."""
    text = image.info.get(PARAMETERS_CHUNK)
    if isinstance(text, str):
        return text
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(b"UNICODE\0"):
        return comment[8:].decode("utf-16-be", errors="replace")
    return comment if isinstance(comment, str) else None


def text_items(image: Image.Image) -> dict[str, str]:
    """The image's other text chunks (A1111's `items`)."""
    return {
        str(key): value
        for key, value in image.info.items()
        if isinstance(value, str) and key != PARAMETERS_CHUNK and key not in IGNORED_INFO_KEYS
    }


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's parse_generation_parameters, in short: Prompt, Negative prompt and the
    last line's `Key: value` pairs (sizes split into Key-1 and Key-2)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        else:
            (negative if negative else prompt).append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, raw in _PARAM.findall(last):
        value = raw.strip()
        if value.startswith('"') and value.endswith('"'):
            with contextlib.suppress(ValueError):  # a malformed quote stays as written
                value = json.loads(value)
        size = _SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size[1], size[2]
        else:
            result[key] = value
    return result


def _number(params: dict[str, Any], key: str, kind: type[float] | type[int], given: Any) -> Any:
    """A number of the infotext (what the job used), else the request's."""
    try:
        return kind(params[key])
    except (KeyError, ValueError):
        return given


def info_json(
    body: GenerationRequest, job: Job, images: Iterable[Image.Image], *, interrupted: bool
) -> str:
    """A1111's `info` (Processed.js()): a JSON string with the seeds, prompts, sampler,
    size and the infotext of each image."""
    pictures = list(images)
    infotexts = [read_infotext(image) or "" for image in pictures]
    params = parse_infotext(infotexts[0]) if infotexts and infotexts[0] else {}
    seeds = list(job.result.seeds) if job.result else []
    count = len(seeds) or body.batch_size * body.n_iter
    seed = seeds[0] if seeds else (body.seed if body.seed >= 0 else -1)
    width, height = pictures[0].size if pictures else (body.width, body.height)
    when = job.started_at or job.created_at
    info = {
        "prompt": body.prompt,
        "all_prompts": [body.prompt] * count,
        "negative_prompt": body.negative_prompt or "",
        "all_negative_prompts": [body.negative_prompt or ""] * count,
        "seed": seed,
        "all_seeds": seeds or [seed] * count,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": body.subseed_strength,
        "width": width,
        "height": height,
        "sampler_name": params.get("Sampler") or body.sampler_name or body.sampler_index,
        "cfg_scale": _number(params, "CFG scale", float, body.cfg_scale),
        "steps": _number(params, "Steps", int, body.steps),
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": job.result.model if job.result else job.spec.model,
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": job.spec.strength,
        "extra_generation_params": {k: params[k] for k in ("Lora", "Refiner") if k in params},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": body.styles or [],
        "job_timestamp": timestamp(when),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": job.spec.mask is not None,
        "version": "sdworker",
        "interrupted": interrupted,
        "sdworker_job_id": job.id,
    }
    return json.dumps(info)


def timestamp(when: datetime | None) -> str:
    """A1111's job_timestamp: local-free YYYYmmddHHMMSS (UTC here)."""
    if when is None:
        return "0"
    return when.astimezone(UTC).strftime("%Y%m%d%H%M%S")
