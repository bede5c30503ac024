"""Random-weight adapter files for tiny SDXL pipelines
(diffusers 0.42.1, peft 0.21, transformers 5.x).

Self-contained: needs only torch, safetensors, transformers and a diffusers SDXL pipeline object.

* build_tiny_ip_adapter      -> plain IP-Adapter (image_proj + ip_adapter)
                                 + tiny CLIP vision encoder
* build_tiny_lora_peft       -> diffusers/PEFT LoRA (``unet.<module>.lora_A.weight`` ...)
* build_tiny_lora_kohya      -> kohya/sd-scripts LoRA (``lora_unet_..._to_q.lora_down.weight`` ...),
                                 SGM/LDM unet naming (``input_blocks_5_1_...``, real SDXL files) or
                                 diffusers naming (``down_blocks_2_attentions_0_...``)
* build_tiny_lora_for_sd15_like -> PEFT LoRA whose attn2 to_k/to_v lora_A has in_features 768
* lora_cross_attention_dim   -> a LoRA file's cross-attention dim from its header only
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Text-encoder attention projections (CLIP naming) used when text_encoders=True.
_TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


# --------------------------------------------------------------------------- IP-Adapter
def _ip_hidden_size(unet: Any, proc_name: str) -> int:
    """The hidden size diffusers' ``_convert_ip_adapter_attn_to_diffusers`` assumes for a
    processor."""
    channels = list(unet.config.block_out_channels)
    if proc_name.startswith("mid_block"):
        return channels[-1]
    block_id = int(proc_name.split(".")[1])
    if proc_name.startswith("up_blocks"):
        return list(reversed(channels))[block_id]
    return channels[block_id]


def build_tiny_ip_adapter(
    pipe: Any,
    folder: Path,
    seed: int = 0,
    subfolder: str = "sdxl_models",
    image_size: int = 32,
    image_embed_dim: int = 32,
    std: float = 0.2,
) -> None:
    """Write a random plain IP-Adapter for ``pipe.unet`` in the h94/IP-Adapter layout::

        folder/<subfolder>/ip-adapter.safetensors
            flat keys image_proj.proj.weight, ip_adapter.1.to_k_ip.weight
        folder/<subfolder>/ip-adapter.bin
            torch.save({"image_proj": {...}, "ip_adapter": {...}})
        folder/<subfolder>/image_encoder/
            CLIPVisionModelWithProjection + preprocessor_config.json

    Load with ``pipe.load_ip_adapter(str(folder), subfolder=subfolder,
    weight_name="ip-adapter.safetensors",
    image_encoder_folder="image_encoder")``.
    """
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = pipe.unet
    cross_dim = int(unet.config.cross_attention_dim)
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).contiguous()

    # ImageProjection: image_embeds = Linear(image_embed_dim, 4 * cross_dim),
    # norm = LayerNorm(cross_dim); diffusers detects the plain IP-Adapter by "proj.weight"
    # and reads 4 tokens, cross_dim = rows // 4.
    image_proj = {
        "proj.weight": rnd(4 * cross_dim, image_embed_dim),
        "proj.bias": rnd(4 * cross_dim),
        "norm.weight": torch.ones(cross_dim) + rnd(cross_dim),
        "norm.bias": rnd(cross_dim),
    }
    # One to_k_ip/to_v_ip pair per cross-attention (attn2) processor, in unet.attn_processors order,
    # numbered 1, 3, 5, ... (the original numbering counts attn1 as the even ids).
    ip_adapter: dict[str, torch.Tensor] = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = _ip_hidden_size(unet, name)
        ip_adapter[f"{key_id}.to_k_ip.weight"] = rnd(hidden, cross_dim)
        ip_adapter[f"{key_id}.to_v_ip.weight"] = rnd(hidden, cross_dim)
        key_id += 2

    out = Path(folder) / subfolder
    out.mkdir(parents=True, exist_ok=True)
    flat = {f"image_proj.{k}": v for k, v in image_proj.items()}
    flat.update({f"ip_adapter.{k}": v for k, v in ip_adapter.items()})
    save_file(flat, str(out / "ip-adapter.safetensors"))
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, out / "ip-adapter.bin")

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        projection_dim=image_embed_dim,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(config).eval()
    finally:
        torch.random.set_rng_state(state)
    encoder.save_pretrained(str(out / "image_encoder"), safe_serialization=True)
    # load_ip_adapter itself builds CLIPImageProcessor(size=image_size, crop_size=image_size)
    # when the pipeline has no feature_extractor; this file is for loaders that read it
    # explicitly.
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(str(out / "image_encoder"))


# --------------------------------------------------------------------------- LoRA helpers
def _random_lora_layers(
    pipe: Any, rank: int, seed: int, targets: tuple[str, ...], text_encoders: bool, std: float = 0.1
) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(component, module name as in pipe.<component>, lora_A/down [r,in], lora_B/up [out,r]),
    deterministic."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    components = [("unet", pipe.unet, tuple(targets))]
    if text_encoders:
        for comp in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, comp, None) is not None:
                components.append((comp, getattr(pipe, comp), _TE_TARGETS))
    for comp, model, suffixes in components:
        for name, module in model.named_modules():
            # Works on an already LoRA-wrapped model too: use the peft wrapper's base layer,
            # skip its parts.
            if ".lora_" in name or name.endswith(".base_layer") or ".base_layer." in name:
                continue
            if hasattr(module, "get_base_layer"):
                module = module.get_base_layer()
            if not isinstance(module, torch.nn.Linear):
                continue
            if not any(name.endswith("." + s) for s in suffixes):
                continue
            if (
                comp == "unet" and "attentions." not in name
            ):  # transformer blocks + proj_in/proj_out
                continue
            a = torch.randn(rank, module.in_features, generator=gen) * std
            b = (
                torch.randn(module.out_features, rank, generator=gen) * std
            )  # nonzero: changes the image
            layers.append((comp, name, a.contiguous(), b.contiguous()))
    return layers


def _te_name(model: Any, name: str) -> str:
    # transformers 5 flattens CLIPTextModel (no .text_model) but CLIPTextModelWithProjection
    # keeps it.
    # Real files always say text_model.*; diffusers strips it again where the model lacks it.
    return name if name.startswith("text_model.") else f"text_model.{name}"


def build_tiny_lora_peft(
    pipe: Any,
    path: Path | str,
    rank: int = 4,
    seed: int = 0,
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    text_encoders: bool = True,
) -> None:
    """diffusers/PEFT LoRA: ``unet.<module>.lora_A.weight`` [r,in], ``.lora_B.weight`` [out,r],
    ``text_encoder.text_model.encoder.layers.N.self_attn.q_proj.lora_A.weight``,
    ``text_encoder_2....``.
    No alphas and no metadata: diffusers then uses lora_alpha = r (scale 1.0)."""
    from safetensors.torch import save_file

    sd = {}
    for comp, name, a, b in _random_lora_layers(pipe, rank, seed, targets, text_encoders):
        key = name if comp == "unet" else _te_name(getattr(pipe, comp), name)
        sd[f"{comp}.{key}.lora_A.weight"] = a
        sd[f"{comp}.{key}.lora_B.weight"] = b
    save_file(sd, str(path), metadata={"format": "pt"})


def _sgm_unet_name(unet: Any, name: str) -> str:
    """diffusers unet module name -> original SGM/LDM name (what kohya uses for SDXL)."""
    lpb = unet.config.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError(
            "SGM naming needs an int layers_per_block (diffusers' converter assumes it)"
        )
    parts = name.split(".")
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        idx = 1 + int(parts[1]) * (lpb + 1) + int(parts[3])
        return ".".join(["input_blocks", str(idx), "1", *parts[4:]])
    if parts[0] == "up_blocks" and parts[2] == "attentions":
        idx = int(parts[1]) * (lpb + 1) + int(parts[3])
        return ".".join(["output_blocks", str(idx), "1", *parts[4:]])
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    raise ValueError(f"no SGM name for {name}")


def build_tiny_lora_kohya(
    pipe: Any,
    path: Path | str,
    rank: int = 4,
    seed: int = 0,
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    text_encoders: bool = True,
    alpha: float | None = None,
    naming: str = "sgm",
) -> None:
    """kohya/sd-scripts LoRA. ``naming="sgm"`` (real SDXL files):
    ``lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_q.lora_down.weight``;
    ``naming="diffusers"``:
    ``lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_to_q...``.
    Plus ``.lora_up.weight``, ``.alpha`` (scalar; scale = alpha / rank; default alpha = rank)
    and ``lora_te1_`` / ``lora_te2_`` ``text_model_encoder_layers_N_self_attn_q_proj``.
    With the same seed and alpha=rank it is the exact
    same adapter as build_tiny_lora_peft."""
    from safetensors.torch import save_file

    if naming not in ("sgm", "diffusers"):
        raise ValueError("naming must be 'sgm' or 'diffusers'")
    alpha = float(rank if alpha is None else alpha)
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    sd = {}
    for comp, name, a, b in _random_lora_layers(pipe, rank, seed, targets, text_encoders):
        if comp == "unet":
            mod = _sgm_unet_name(pipe.unet, name) if naming == "sgm" else name
        else:
            mod = _te_name(getattr(pipe, comp), name)
        base = f"{prefixes[comp]}_{mod.replace('.', '_')}"
        sd[f"{base}.lora_down.weight"] = a
        sd[f"{base}.lora_up.weight"] = b
        sd[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(
        sd,
        str(path),
        metadata={
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
        },
    )


def build_tiny_lora_for_sd15_like(
    pipe: Any,
    path: Path | str,
    rank: int = 4,
    seed: int = 0,
    cross_attention_dim: int = 768,
    fmt: str = "peft",
) -> None:
    """LoRA on the tiny unet's own attention module names, but attn2.to_k/to_v lora_A
    (lora_down) has in_features=cross_attention_dim (768 as in SD 1.5) instead of the unet's.
    fmt: "peft" or "kohya"."""
    from safetensors.torch import save_file

    sd = {}
    for _, name, a, b in _random_lora_layers(
        pipe, rank, seed, ("to_q", "to_k", "to_v", "to_out.0"), False
    ):
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            a = (
                torch.randn(
                    rank, cross_attention_dim, generator=torch.Generator().manual_seed(seed)
                )
                * 0.1
            )
        if fmt == "peft":
            sd[f"unet.{name}.lora_A.weight"] = a.contiguous()
            sd[f"unet.{name}.lora_B.weight"] = b
        else:
            base = "lora_unet_" + name.replace(".", "_")
            sd[f"{base}.lora_down.weight"] = a.contiguous()
            sd[f"{base}.lora_up.weight"] = b
            sd[f"{base}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))


# --------------------------------------------------------------------------- header-only inspection
def lora_cross_attention_dim(path: Path | str) -> int | None:
    """in_features of an attn2 to_k/to_v LoRA down matrix, read from the safetensors header only
    (768 SD1.x, 1024 SD2.x, 2048 SDXL base, 1280 SDXL refiner); None if the file has no such key.
    Handles PEFT (``attn2.to_k.lora_A.weight``),
    old diffusers (``attn2.processor.to_k_lora.down.weight``)
    and kohya (``attn2_to_k.lora_down.weight``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            k = key.replace("_", ".")
            if ".attn2." not in k or not any(t in k for t in (".to.k.", ".to.v.")):
                continue
            if k.endswith(("lora.A.weight", "lora.down.weight")):
                return int(f.get_slice(key).get_shape()[1])
    return None


def lora_file_info(path: Path | str) -> dict:
    """Cheap summary: format, components present, rank, cross-attention dim, header metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata() or {}
        kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in keys)
        rank = None
        for k in keys:
            if k.endswith(("lora_A.weight", "lora_down.weight")):
                rank = int(f.get_slice(k).get_shape()[0])
                break
    comps = (
        sorted({k.split(".")[0] for k in keys})
        if not kohya
        else sorted({"unet" if k.startswith("lora_unet_") else k.split("_")[1] for k in keys})
    )
    return {
        "format": "kohya" if kohya else "peft",
        "components": comps,
        "sgm_unet_names": any(
            p in k for k in keys for p in ("input_blocks", "middle_block", "output_blocks")
        ),
        "rank": rank,
        "cross_attention_dim": lora_cross_attention_dim(path),
        "metadata": {
            k: (json.loads(v) if k == "lora_adapter_metadata" else v) for k, v in meta.items()
        },
    }


# PEFT warns on every adapter added to a model that already holds one, and diffusers
# when it deletes an active adapter (its own cleanup after a failed load does): benign,
# but pytest turns warnings into errors, which would abort diffusers half-way. Modules
# that switch adapters use: pytestmark = [pytest.mark.filterwarnings(f) for f in ...].
BENIGN_ADAPTER_WARNINGS = (
    "ignore:Already found a `peft_config` attribute in the model:UserWarning",
    "ignore:Adapter .* was active which is now deleted:UserWarning",
)
