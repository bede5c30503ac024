"""Convert diffusers-format SDXL (and SD 1.x/2.x) weights into the original Stability (SGM /
"ldm") single file.

The original layout is what ``sd_xl_base_1.0.safetensors`` uses and what
``StableDiffusionXLPipeline.from_single_file`` reads:

* ``model.diffusion_model.*``  - the UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``)
* ``first_stage_model.*``      - the VAE (``encoder.down.N.block.M`` ..., 1x1-conv attention)
* ``conditioner.embedders.0.transformer.text_model.*`` - CLIP ViT-L/14 (transformers layout)
* ``conditioner.embedders.1.model.*`` - OpenCLIP bigG (``transformer.resblocks.N`` with fused
  ``attn.in_proj_weight``, ``text_projection`` stored as ``(width, embed_dim)``)

SD 1.x files hold CLIP-L as ``cond_stage_model.transformer.text_model.*``, SD 2.x files OpenCLIP-H
as ``cond_stage_model.model.*``; UNet and VAE are named as in SDXL.

Every block and layer count is read from the state dicts, so tiny random models with these
architectures convert as well as the real ones.
"""

# Hand-written on purpose: diffusers ships only the original -> diffusers direction as a library
# function (``diffusers.loaders.single_file_utils``, used by ``from_single_file``). The reverse only
# exists as the unpackaged script ``scripts/convert_diffusers_to_original_sdxl.py``, which
# hard-codes SDXL's block counts and writes OpenCLIP's ``text_projection`` untransposed.

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."

StateDict = Mapping[str, Tensor]

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}

_UNET_BLOCK = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_BLOCK = re.compile(
    r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_VAE_PLAIN = re.compile(r"((encoder|decoder)\.conv_(in|out)|(post_)?quant_conv)\.(weight|bias)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_CLIP_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_CLIP_OTHER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


class SDXLComponents(Protocol):
    """What :func:`pipeline_to_original_state_dict` needs: a ``StableDiffusionXLPipeline`` fits."""

    @property
    def unet(self) -> torch.nn.Module: ...
    @property
    def vae(self) -> torch.nn.Module: ...
    @property
    def text_encoder(self) -> torch.nn.Module: ...
    @property
    def text_encoder_2(self) -> torch.nn.Module: ...


def _rename_head(name: str, table: Mapping[str, str]) -> str:
    """Rename the leading module path of ``name`` (``conv1.weight`` -> ``in_layers.2.weight``)."""
    for old, new in table.items():
        if name.startswith(old + "."):
            return new + name[len(old) :]
    return name


def _count(keys: list[str], pattern: str) -> int:
    """Number of distinct integers captured by ``pattern`` (group 1) over ``keys``."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def _unmapped(model: str, key: str) -> ValueError:
    return ValueError(f"{model}: no original-layout name for diffusers key {key!r}")


def unet_to_original(unet: StateDict) -> dict[str, Tensor]:
    """UNet2DConditionModel (SDXL architecture) -> ``model.diffusion_model.*``."""
    keys = list(unet)
    layers = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")  # config.layers_per_block
    if layers == 0:
        raise ValueError("unet: state dict has no down_blocks.0.resnets")
    attention_up = re.compile(r"up_blocks\.(\d+)\.attentions\.")
    up_with_attention = {int(m.group(1)) for k in keys if (m := attention_up.match(k))}
    out: dict[str, Tensor] = {}
    for key, tensor in unet.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            new = f"{_UNET_TOP[module]}.{param}"
        elif m := _UNET_BLOCK.fullmatch(key):
            side, kind, rest = m.group(1), m.group(3), m.group(5)
            block, index = int(m.group(2)), int(m.group(4))
            if kind == "downsamplers":
                new = f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{rest.removeprefix('conv.')}"
            elif kind == "upsamplers":
                slot = 2 if block in up_with_attention else 1
                new = f"output_blocks.{block * (layers + 1) + layers}.{slot}.{rest}"
            else:
                # input_blocks: conv_in, then per block `layers` resnets + 1 downsampler;
                # output_blocks: per block `layers + 1` resnets, the last one also the upsampler
                position = block * (layers + 1) + index + (1 if side == "down" else 0)
                group = "input_blocks" if side == "down" else "output_blocks"
                if kind == "resnets":
                    new = f"{group}.{position}.0.{_rename_head(rest, _UNET_RESNET)}"
                else:
                    new = f"{group}.{position}.1.{rest}"
        elif m := _UNET_MID.fullmatch(key):
            kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "resnets":
                new = f"middle_block.{2 * index}.{_rename_head(rest, _UNET_RESNET)}"
            else:
                new = f"middle_block.{2 * index + 1}.{rest}"
        else:
            raise _unmapped("unet", key)
        out[UNET_PREFIX + new] = tensor
    return out


def vae_to_original(vae: StateDict) -> dict[str, Tensor]:
    """AutoencoderKL -> ``first_stage_model.*`` (mid-block attention as 1x1 convolutions)."""
    up_blocks = _count(list(vae), r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Tensor] = {}
    for key, tensor in vae.items():
        value = tensor
        if m := _VAE_BLOCK.fullmatch(key):
            coder, side, block, kind, index, rest = m.groups()
            # the diffusers decoder counts up_blocks from the bottleneck, the original from the top
            level = int(block) if side == "down" else up_blocks - 1 - int(block)
            if kind == "resnets":
                rest = _rename_head(rest, {"conv_shortcut": "nin_shortcut"})
                new = f"{coder}.{side}.{level}.block.{index}.{rest}"
            else:
                new = f"{coder}.{side}.{level}.{side}sample.{rest}"
        elif m := _VAE_MID.fullmatch(key):
            coder, kind, index, rest = m.groups()
            if kind == "resnets":
                rest = _rename_head(rest, {"conv_shortcut": "nin_shortcut"})
                new = f"{coder}.mid.block_{int(index) + 1}.{rest}"
            else:
                new = f"{coder}.mid.attn_{int(index) + 1}.{_rename_head(rest, _VAE_ATTENTION)}"
                if value.ndim == 2:  # nn.Linear (out, in) -> nn.Conv2d 1x1 (out, in, 1, 1)
                    value = value.reshape(*value.shape, 1, 1)
        elif re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key):
            new = key.replace("conv_norm_out", "norm_out")
        elif _VAE_PLAIN.fullmatch(key):
            new = key
        else:
            raise _unmapped("vae", key)
        out[VAE_PREFIX + new] = value
    return out


def clip_l_to_original(text_encoder: StateDict, prefix: str = CLIP_L_PREFIX) -> dict[str, Tensor]:
    """CLIPTextModel -> ``conditioner.embedders.0.transformer.text_model.*``.

    transformers >= 5.6 dropped the ``text_model.`` wrapper from ``CLIPTextModel``; the original
    layout (and diffusers' loader) always has it, so it is added back when missing.
    """
    return {
        prefix + (key if key.startswith("text_model.") else "text_model." + key): tensor
        for key, tensor in text_encoder.items()
    }


def open_clip_to_original(
    text_encoder_2: StateDict, prefix: str = OPEN_CLIP_PREFIX
) -> dict[str, Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP ``conditioner.embedders.1.model.*``."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, tensor in text_encoder_2.items():
        inner = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            # nn.Linear stores (projection_dim, hidden); open_clip applies `x @ text_projection`
            out["text_projection"] = tensor.t().contiguous()
        elif inner in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[inner]] = tensor
        elif m := _CLIP_QKV.fullmatch(inner):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = tensor
        elif m := _CLIP_OTHER.fullmatch(inner):
            layer, module, param = m.groups()
            renamed = _rename_head(f"{module}.{param}", _CLIP_LAYER)
            if renamed == f"{module}.{param}":
                raise _unmapped("text_encoder_2", key)
            out[f"transformer.resblocks.{layer}.{renamed}"] = tensor
        else:
            raise _unmapped("text_encoder_2", key)
    for (layer, param), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"text_encoder_2: layer {layer} {param} lacks one of q/k/v")
        # nn.MultiheadAttention.in_proj_* is [q; k; v] stacked along the output dimension
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = fused
    return {prefix + key: tensor for key, tensor in out.items()}


def sdxl_to_original_state_dict(
    unet: StateDict, vae: StateDict, text_encoder: StateDict, text_encoder_2: StateDict
) -> dict[str, Tensor]:
    """Merge the four diffusers state dicts into one original-layout SDXL state dict."""
    return {
        **unet_to_original(unet),
        **vae_to_original(vae),
        **clip_l_to_original(text_encoder),
        **open_clip_to_original(text_encoder_2),
    }


def pipeline_to_original_state_dict(pipe: SDXLComponents) -> dict[str, Tensor]:
    """The original-layout state dict of an SDXL, SD 1.x or SD 2.x pipeline."""
    if getattr(pipe, "text_encoder_2", None) is None:  # SD 1.x / 2.x: one text encoder
        unet = pipe.unet.state_dict()
        text = pipe.text_encoder.state_dict()
        sd2 = bool(getattr(pipe.unet, "config", {}).get("use_linear_projection"))
        encoder = (
            open_clip_to_original(text, SD2_OPEN_CLIP_PREFIX)
            if sd2
            else clip_l_to_original(text, SD1_CLIP_PREFIX)
        )
        return {**unet_to_original(unet), **vae_to_original(pipe.vae.state_dict()), **encoder}
    return sdxl_to_original_state_dict(
        pipe.unet.state_dict(),
        pipe.vae.state_dict(),
        pipe.text_encoder.state_dict(),
        pipe.text_encoder_2.state_dict(),
    )


def save_single_file(
    pipe: SDXLComponents, path: str | Path, *, dtype: torch.dtype | None = None
) -> Path:
    """Write ``pipe`` as an original-layout single file; the format follows the suffix.

    ``.safetensors`` goes through ``safetensors.torch.save_file``; ``.ckpt`` / ``.pt`` /
    ``.pth`` is ``torch.save({"state_dict": ...})`` as the original trainers wrote it.
    ``dtype`` optionally casts floating-point tensors (e.g. ``torch.float16``).
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in {".safetensors", ".ckpt", ".pt", ".pth"}:
        raise ValueError(f"unsupported suffix {target.suffix!r}: use .safetensors or .ckpt")
    state = {
        key: (value.to(dtype) if dtype is not None and value.is_floating_point() else value)
        .detach()
        .to("cpu")
        .contiguous()
        for key, value in pipeline_to_original_state_dict(pipe).items()
    }
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(target), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state}, target)
    return target
