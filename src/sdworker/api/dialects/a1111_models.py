"""AUTOMATIC1111's `/sdapi/v1` request and response bodies (its modules/api/models.py).

The request models declare A1111's fields so that `parameters` echoes a request the way
A1111 does, and ignore unknown ones (clients such as webuiapi send many, and extensions
add more). Generation fields left out take the model's defaults, not A1111's fixed 512 px
and 50 steps, which would be wrong for SDXL.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class GenerationRequest(BaseModel):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = Field(default=None, description="Accepted, not used.")
    seed: int = Field(default=-1, description="-1: a random seed.")
    subseed: int = Field(default=-1, description="Accepted, not used.")
    subseed_strength: float = Field(default=0.0, description="Accepted, not used.")
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = Field(default=None, description="GET /sdapi/v1/samplers.")
    sampler_index: str | None = Field(default=None, description="Old name of sampler_name.")
    scheduler: str | None = Field(default=None, description="Automatic, or Karras (DPM++ 2M).")
    batch_size: int = Field(default=1, ge=1)
    n_iter: int = Field(default=1, ge=1)
    steps: int | None = Field(default=None, description="Default: the model's.")
    cfg_scale: float | None = Field(default=None, description="Default: the model's.")
    width: int | None = Field(default=None, description="Default: the model's.")
    height: int | None = Field(default=None, description="Default: the model's.")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = Field(
        default=None, description="Per request; sd_model_checkpoint picks the model."
    )
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = Field(
        default=None, description="Any value: the deployment's refiner (SDWORKER_REFINER)."
    )
    refiner_switch_at: float | None = Field(default=None, description="Share of the steps.")
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = Field(
        default=None, max_length=255, description="id_task for POST /internal/progress."
    )
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None


class Txt2ImgRequest(GenerationRequest):
    """POST /sdapi/v1/txt2img (StableDiffusionTxt2ImgProcessingAPI)."""

    enable_hr: bool = Field(default=False, description="Hires fix: refused when true.")
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(GenerationRequest):
    """POST /sdapi/v1/img2img (StableDiffusionImg2ImgProcessingAPI)."""

    init_images: list[str] | None = Field(
        default=None, description="One image: base64, data URI or http(s) URL."
    )
    resize_mode: int = Field(
        default=0, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 as 0."
    )
    image_cfg_scale: float | None = None
    mask: str | None = Field(default=None, description="Inpainting mask (white = repaint).")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = Field(default=None, description="Accepted, not used.")
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(default=0, description="1: repaint the black part.")
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class ExtrasSingleImageRequest(BaseModel):
    """POST /sdapi/v1/extra-single-image: upscale one image."""

    model_config = ConfigDict(extra="ignore")

    image: str = Field(default="", description="base64 or data URI.")
    resize_mode: int = Field(default=0, description="0: scale by upscaling_resize.")
    show_extras_results: bool = True
    gfpgan_visibility: float = 0
    codeformer_visibility: float = 0
    codeformer_weight: float = 0
    upscaling_resize: float = Field(default=2, description="2 or 4.")
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str | None = Field(default="None", description="GET /sdapi/v1/upscalers.")
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float = 0
    upscale_first: bool = False


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field(description="base64 or data URI of a PNG (or JPEG/WEBP).")


class InternalProgressRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id_task: str | None = Field(default=None, description="force_task_id of the request.")
    id_live_preview: int = -1
    live_preview: bool = True


class ImagesResponse(BaseModel):
    """txt2img and img2img: base64 PNGs, the request as received, info as a JSON string."""

    images: list[str] | None = None
    parameters: dict[str, Any]
    info: str


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None = None


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class InternalProgressResponse(BaseModel):
    active: bool
    queued: bool
    completed: bool
    progress: float | None = None
    eta: float | None = None
    live_preview: str | None = None
    id_live_preview: int | None = None
    textinfo: str | None = None
