"""Tiny random-weight models of the families beside SDXL: SD 1.5, SD 2.1, SD3 and Wan2.1.

Each keeps the traits the engine branches on (text encoders and their widths, attention
layout, prediction type, latent channels, VAE scale factors, scheduler config, default
size) and shrinks everything else: on two CPU cores a 2-step run at 64 px takes well
under a second, one SD3 step at 1024 px about two seconds, and a 2-step Wan clip of 17
frames at 480x832 15-30 s, nearly all of it in the Wan VAE's full-size decoder.
The weights come from fixed seeds, so every build on every machine is the same; the
caller's global torch RNG is saved and restored around them.

The tiny SD 1.5 carries a safety checker whose concept thresholds are far below any
cosine similarity, so it flags every image (``TINY_SAFETY_CHECKER_FLAGS_ALL``): with it
on, each image comes back black and marked NSFW, which tests can rely on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sdworker.engine.tokenizers_local import clip_tokenizers, t5_tokenizer, umt5_tokenizer

TINY_SAFETY_CHECKER_FLAGS_ALL = True

# The text encoders differ in width where the real ones do (CLIP-L 768, OpenCLIP-H 1024,
# OpenCLIP-bigG 1280, T5-XXL 4096), so a detector can tell the families apart by them.
SD15_TEXT_HIDDEN = 32
SD21_TEXT_HIDDEN = 48
SD3_CLIP_HIDDEN = (32, 64)
SD3_T5_HIDDEN = 128
WAN_TEXT_HIDDEN = 32

_SAFETY_IMAGE_SIZE = 32


@contextmanager
def _rng_restored() -> Iterator[None]:
    """Seeding inside must not change the draws of the caller's global torch RNG."""
    import torch

    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def clip_text_encoder(hidden: int, act: str, projection: bool, seed: int) -> Any:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def tiny_vae(latent_channels: int, sample_size: int, seed: int, **factors: Any) -> Any:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Four blocks: three downsamplings, so latents are 1/8 of the image like the real VAEs.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=sample_size,
        **factors,
    ).eval()


def _sd_unet(sd2: bool, seed: int) -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=96 if sd2 else 64,  # 768 px (SD 2.1) and 512 px (SD 1.5) defaults
        in_channels=4,
        out_channels=4,
        # No attention at full latent size keeps the default sizes cheap on a CPU.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        # SD 2.x configs give heads per block as a list; SD 1.5 gives one number.
        attention_head_dim=[2, 2, 4] if sd2 else 2,
        cross_attention_dim=SD21_TEXT_HIDDEN if sd2 else SD15_TEXT_HIDDEN,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=32,
    ).eval()


def _safety_checker(seed: int) -> tuple[Any, Any]:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": _SAFETY_IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(config).eval()
    # A concept is flagged when cosine(image, concept) - threshold > 0; cosines lie in
    # [-1, 1], so a threshold of -2 flags every image whatever the random weights.
    threshold = -2.0 if TINY_SAFETY_CHECKER_FLAGS_ALL else 2.0
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    processor = CLIPImageProcessor(
        size={"shortest_edge": _SAFETY_IMAGE_SIZE},
        crop_size={"height": _SAFETY_IMAGE_SIZE, "width": _SAFETY_IMAGE_SIZE},
    )
    return checker, processor


def build_sd15() -> Any:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    with _rng_restored():
        unet = _sd_unet(sd2=False, seed=10)
        vae = tiny_vae(4, 512, seed=11, scaling_factor=0.18215)
        text_encoder = clip_text_encoder(SD15_TEXT_HIDDEN, "quick_gelu", projection=False, seed=12)
        safety_checker, feature_extractor = _safety_checker(seed=13)
    # The scheduler config of runwayml/stable-diffusion-v1-5.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizers()[0],
        unet=unet,
        scheduler=scheduler,
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=True,
    )


def build_sd21() -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    with _rng_restored():
        unet = _sd_unet(sd2=True, seed=20)
        vae = tiny_vae(4, 768, seed=21, scaling_factor=0.18215)
        # OpenCLIP-H: gelu, not CLIP-L's quick_gelu.
        text_encoder = clip_text_encoder(SD21_TEXT_HIDDEN, "gelu", projection=False, seed=22)
    # The scheduler config of stabilityai/stable-diffusion-2-1 (a v-prediction model).
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="v_prediction",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizers()[1],  # SD 2.x pads with "!", like SDXL's second
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _t5_encoder(umt5: bool, vocab_size: int, d_model: int, seed: int) -> Any:
    import torch
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    options: dict[str, Any] = {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "d_kv": 8,
        "d_ff": 2 * d_model,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": "gated-gelu",  # T5 v1.1 and UMT5, as SD3 and Wan use
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(seed)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**options)).eval()
    return T5EncoderModel(T5Config(**options)).eval()


def build_sd3() -> Any:
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tokenizer, tokenizer_2 = clip_tokenizers()
    tokenizer_3 = t5_tokenizer()
    clip_l, clip_g = SD3_CLIP_HIDDEN
    with _rng_restored():
        torch.manual_seed(30)
        transformer = SD3Transformer2DModel(
            sample_size=128,  # 1024 px
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=SD3_T5_HIDDEN,
            caption_projection_dim=32,  # = heads x head dim, as in SD3
            pooled_projection_dim=clip_l + clip_g,  # the two pooled CLIP outputs
            pos_embed_max_size=192,  # SD3 medium's: room for sizes up to 3072 px
        ).eval()
        vae = tiny_vae(
            16,
            1024,
            seed=31,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoder = clip_text_encoder(clip_l, "quick_gelu", projection=True, seed=32)
        text_encoder_2 = clip_text_encoder(clip_g, "gelu", projection=True, seed=33)
        text_encoder_3 = _t5_encoder(False, len(tokenizer_3), SD3_T5_HIDDEN, seed=34)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def build_wan() -> Any:
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    tokenizer = umt5_tokenizer()
    with _rng_restored():
        torch.manual_seed(40)
        # Two temporal and three spatial downsamplings, as Wan2.1's VAE: 4k+1 frames of
        # H x W become k+1 latent frames of H/8 x W/8. The decoder runs at full size, so
        # its width sets the cost; narrower is not cheaper, though: with fewer than 8
        # input channels torch's CPU 3D convolution leaves oneDNN for a slower path, and
        # RMS norms over 2 channels amplify float rounding ~1000-fold (a reloaded copy,
        # its weights at other addresses, would no longer give the same pixels).
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()
        torch.manual_seed(41)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,  # split three ways by the 3D rotary embedding
            in_channels=16,
            out_channels=16,
            text_dim=WAN_TEXT_HIDDEN,
            freq_dim=256,
            ffn_dim=48,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        ).eval()
        text_encoder = _t5_encoder(True, len(tokenizer), WAN_TEXT_HIDDEN, seed=42)
    # The scheduler config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers.
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
    )
