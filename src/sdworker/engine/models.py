"""Model sources (built-in tiny, diffusers folder, single-file checkpoint, hub id):
finding them, telling their family, and loading them offline where possible."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from sdworker.engine.tiny import (
    clip_tokenizers,
    ensure_tiny_model,
    is_tiny_model,
    tiny_family,
)
from sdworker.errors import ModelLoadError, ModelNotFoundError
from sdworker.families import FAMILIES
from sdworker.model_registry import ModelConfig, load_model_registry
from sdworker.settings import Settings

CONFIGS_DIR = Path(__file__).parent / "configs"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# family -> (text-to-image or -video pipeline, img2img, inpaint) diffusers class names.
PIPELINE_CLASSES: dict[str, tuple[str, str | None, str | None]] = {
    "sd15": (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    ),
    "sd21": (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    ),
    "sdxl": (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    ),
    "sd3": (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
    ),
    "wan-t2v": ("WanPipeline", None, None),
}

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# model_index.json _class_name -> family.
_PIPELINE_FAMILIES = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionImg2ImgPipeline": "sd15",
    "StableDiffusionInpaintPipeline": "sd15",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "StableDiffusion3InpaintPipeline": "sd3",
    "WanPipeline": "wan-t2v",
}


class SourceKind(StrEnum):
    TINY = "tiny"
    FOLDER = "folder"
    SINGLE_FILE = "single_file"
    HUB = "hub"


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives and what it is; `location` is a path or a hub id."""

    name: str
    kind: SourceKind
    location: str
    family: str
    config: ModelConfig | None = None  # its model registry entry, if any

    @property
    def defaults(self) -> ModelConfig:
        return self.config or ModelConfig(source=self.location)


def _candidates(name: str, root: Path | None, *, trusted: bool) -> list[Path]:
    """Where a model name may live: under the model root, and (trusted names only, i.e.
    the operator's own settings or the CLI) as a path of its own."""
    bases: list[Path] = []
    if root is not None and not Path(name).is_absolute():
        bases.append(root.expanduser() / name)
    if trusted:
        try:
            bases.append(Path(name).expanduser())
        except RuntimeError:  # "~user" of an unknown user
            bases.append(Path(name))
    paths: list[Path] = []
    for base in bases:
        paths.append(base)
        if base.suffix not in SINGLE_FILE_SUFFIXES:
            paths.extend(base.with_name(base.name + suffix) for suffix in SINGLE_FILE_SUFFIXES)
    return paths


def _is_plain_name(name: str) -> bool:
    """A caller-supplied name stays inside the model root: no absolute, home or parent
    paths, no backslashes."""
    if not name or name.startswith(("/", "~")) or "\\" in name:
        return False
    return all(part not in {"", ".", ".."} for part in name.split("/"))


def resolve_model(
    name: str,
    settings: Settings,
    *,
    trusted: bool = True,
    registry: dict[str, ModelConfig] | None = None,
) -> ModelSource:
    """Find a model by name (a model registry entry first) and detect its family,
    without loading weights.

    Untrusted names (from API callers) are looked up only under the model root, as hub
    ids or as built-in models, and every miss gives the same error, so a caller learns
    nothing about the server's files."""
    registry = load_model_registry(settings) if registry is None else registry
    config = registry.get(name)
    if config is not None:
        # The operator's own entry: its source may be any path or hub id.
        found = _find_source(config.source, settings, trusted=True)
        family = config.family or found.family
        return ModelSource(name, found.kind, found.location, family, config)
    return _find_source(name, settings, trusted=trusted)


def _find_source(name: str, settings: Settings, *, trusted: bool) -> ModelSource:
    if is_tiny_model(name):
        return ModelSource(name, SourceKind.TINY, name, tiny_family(name))
    if not trusted and not _is_plain_name(name):
        raise ModelNotFoundError(
            f"model {name!r} is not a model name: give a name under the model root, a hub "
            "id (org/name) or tiny-sdxl",
            field="model",
        )
    tried = _candidates(name, settings.model_root, trusted=trusted)
    for path in tried:
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError:  # e.g. a name too long for the file system: not there
            continue
        if is_dir:
            return ModelSource(name, SourceKind.FOLDER, str(path), folder_family(path))
        if is_file:
            return ModelSource(name, SourceKind.SINGLE_FILE, str(path), single_file_family(path))
    if _HUB_ID_RE.match(name) and not name.startswith((".", "~")):
        allowed = settings.allowed_model_list
        if not trusted and name not in allowed and "*" not in allowed:
            # A hub id means a multi-GB download: callers get only what the operator allows.
            raise ModelNotFoundError(
                f"model {name!r} is not available; the operator can allow hub models with "
                "SDWORKER_ALLOWED_MODELS",
                field="model",
            )
        return ModelSource(name, SourceKind.HUB, name, hub_family(name))
    root_hint = (
        f"model root is {settings.model_root}"
        if settings.model_root
        else "no model root set (SDWORKER_MODEL_ROOT / SDXL_MODEL_ROOT / MODEL_ROOT)"
    )
    where = f"tried: {', '.join(str(p) for p in tried)}" if trusted else "not under the model root"
    raise ModelNotFoundError(
        f"model {name!r} not found; {where} ({root_hint}); "
        "give a .safetensors/.ckpt file, a diffusers folder, a hub id (org/name), a model "
        "registry name (SDWORKER_MODELS) or a built-in tiny model (tiny-sdxl, tiny-sd15, "
        "tiny-sd21, tiny-sd3, tiny-wan)",
        field="model",
    )


def _family_from_index(
    index: dict[str, Any], where: str, unet_config: dict[str, Any] | None = None
) -> str:
    class_name = str(index.get("_class_name", ""))
    family = _PIPELINE_FAMILIES.get(class_name)
    if family is None:
        known = ", ".join(sorted(set(_PIPELINE_FAMILIES)))
        raise ModelLoadError(
            f"{where}: unsupported pipeline class {class_name!r} (served: {known})",
            field="model",
        )
    if family == "sdxl" and index.get("text_encoder", [None])[0] is None:
        return "sdxl-refiner"  # the refiner has only the second text encoder
    if family == "sd15" and unet_config is not None and _is_sd2_unet(unet_config):
        return "sd21"
    return family


def _is_sd2_unet(config: dict[str, Any]) -> bool:
    """SD 2.x UNets attend to OpenCLIP-H (1024 wide) through linear projections; SD 1.x
    ones to CLIP-L (768) through 1x1 convolutions."""
    return bool(config.get("use_linear_projection")) or config.get("cross_attention_dim") == 1024


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_family(path: Path) -> str:
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ModelLoadError(
            f"{path} is a folder without model_index.json, so not a diffusers model folder",
            field="model",
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{index_path} is not readable JSON: {exc}", field="model") from exc
    return _family_from_index(index, str(path), _read_json(path / "unet" / "config.json"))


class _KeysOnlyUnpickler(pickle.Unpickler):
    """Reads a torch zip checkpoint's pickle without torch and without running anything:
    every global becomes an inert stub and tensor storages are never loaded, so only the
    dict structure (the tensor names) comes out."""

    def find_class(self, module: str, name: str) -> Any:
        return _Stub

    def persistent_load(self, pid: Any) -> Any:
        return None


class _Stub:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _ckpt_state(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
        if name is None:
            raise ValueError("no data.pkl inside (not a torch zip checkpoint)")
        with archive.open(name) as handle:
            return _KeysOnlyUnpickler(handle).load()


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a single-file checkpoint, read without loading any tensor (and
    without torch, so the API process can inspect models too)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as handle:
                return list(handle.keys())
        state = _ckpt_state(path)
    except Exception as exc:  # any parse failure means a corrupt or foreign file
        raise ModelLoadError(
            f"{path} is not a readable {path.suffix} checkpoint ({type(exc).__name__}: {exc})",
            field="model",
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} holds no state dict", field="model")
    return [str(key) for key in state]


def family_from_keys(keys: Iterable[str]) -> str | None:
    """Tell the family of an original-layout (ldm/sgm) checkpoint from its tensor names."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has("model.diffusion_model.joint_blocks."):
        return "sd3"
    if has("patch_embedding.") and has("blocks.0.self_attn."):
        return "wan-t2v"  # a Wan2.1 transformer in its original layout
    if not has("model.diffusion_model."):
        return None
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        return "sdxl-refiner"
    if has("cond_stage_model.model."):
        return "sd21"
    if has("cond_stage_model.transformer."):
        return "sd15"
    return None


def single_file_family(path: Path) -> str:
    keys = checkpoint_keys(path)
    family = family_from_keys(keys)
    if family is None:
        sample = ", ".join(sorted(keys)[:3]) or "none"
        raise ModelLoadError(
            f"{path} is not a Stable Diffusion checkpoint in the original layout "
            f"(no model.diffusion_model.* keys; found e.g. {sample})",
            field="model",
        )
    return family


def hub_family(repo_id: str) -> str:
    """Family from the hub repo's model_index.json (hub cache and HF_HUB_OFFLINE honoured)."""
    from huggingface_hub import hf_hub_download

    try:
        index_path = hf_hub_download(repo_id, "model_index.json")
    except Exception as exc:  # network, auth, offline mode, missing repo
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        why = "not in the local hub cache and HF_HUB_OFFLINE is set" if offline else str(exc)
        raise ModelLoadError(
            f"hub model {repo_id!r} could not be fetched: {type(exc).__name__}: {why}",
            field="model",
        ) from exc
    index = json.loads(Path(index_path).read_text())
    unet_config = None
    if _PIPELINE_FAMILIES.get(str(index.get("_class_name"))) == "sd15":
        try:
            unet_config = _read_json(Path(hf_hub_download(repo_id, "unet/config.json")))
        except Exception:  # no unet config: keep the pipeline class's family
            unet_config = None
    return _family_from_index(index, repo_id, unet_config)


def pipeline_class(family: str, slot: int = 0) -> Any:
    """The diffusers class of a family's pipeline: 0 base, 1 img2img, 2 inpaint."""
    import diffusers

    name = PIPELINE_CLASSES[family][slot]
    if name is None:
        raise ModelLoadError(f"{family} models have no pipeline for that task", field="task")
    return getattr(diffusers, name)


def load_pipeline(source: ModelSource, settings: Settings, dtype: torch.dtype) -> Any:
    """Load the base pipeline of a model (text-to-image, or text-to-video for Wan) on the
    CPU (placement is the caller's)."""
    if source.family not in FAMILIES:
        hint = (
            " (it runs behind an SDXL base: set SDWORKER_REFINER)"
            if "refiner" in source.family
            else ""
        )
        raise ModelLoadError(
            f"model {source.name!r} is a {source.family} model{hint}; this version serves "
            f"{', '.join(FAMILIES)}",
            field="model",
        )
    cls = pipeline_class(source.family)
    options = pipeline_options(settings, source.family)
    try:
        if source.kind is SourceKind.SINGLE_FILE:
            pipe = _load_single_file(cls, source, settings, dtype)
        else:
            location = source.location
            if source.kind is SourceKind.TINY:
                location = str(ensure_tiny_model(source.location, settings.cache_dir))
            pipe = cls.from_pretrained(location, dtype=dtype, **options)
    except ModelLoadError:
        raise
    except Exception as exc:  # diffusers raises many types for one cause: unusable weights
        raise ModelLoadError(
            f"model {source.name!r} ({source.kind.value} {source.location}) failed to load: "
            f"{type(exc).__name__}: {exc}",
            field="model",
        ) from exc
    _check_safety_checker(pipe, source, settings)
    prediction = source.defaults.prediction_type
    if prediction and pipe.scheduler.config.get("prediction_type") != prediction:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=prediction
        )
    return pipe


def _check_safety_checker(pipe: Any, source: ModelSource, settings: Settings) -> None:
    wanted = settings.safety_checker and source.family in ("sd15", "sd21")
    if wanted and getattr(pipe, "safety_checker", None) is None:
        raise ModelLoadError(
            f"SDWORKER_SAFETY_CHECKER is on but model {source.name!r} ships no "
            "safety_checker; turn the setting off or use a model folder that has one",
            field="safety_checker",
        )


def pipeline_options(settings: Settings, family: str = "sdxl") -> dict[str, Any]:
    """Constructor options that pipelines do not keep in their config (so from_pipe
    would fall back to diffusers' defaults): SDXL's invisible watermark is explicit (off
    by default, not 'on whenever the package is installed'); SD 1.x/2.x's safety
    checker is loaded only when SDWORKER_SAFETY_CHECKER is on."""
    if family in ("sd15", "sd21"):
        if settings.safety_checker:
            return {}
        return {"safety_checker": None, "requires_safety_checker": False}
    if family != "sdxl":
        return {}
    if settings.watermark:
        from diffusers.utils import is_invisible_watermark_available

        if not is_invisible_watermark_available():
            raise ModelLoadError(
                "SDWORKER_WATERMARK is on but the invisible-watermark package is not "
                "installed: pip install 'sdworker[watermark]'",
                field="watermark",
            )
    return {"add_watermarker": settings.watermark}


def _single_file_tokenizers(family: str, config_dir: Path) -> dict[str, Any]:
    """CLIP tokenizers from the shipped BPE files when the config folder has none."""
    if (config_dir / "tokenizer").is_dir():
        return {}
    clip, clip_padded = clip_tokenizers()
    if family == "sd15":
        return {"tokenizer": clip}
    if family == "sd21":
        return {"tokenizer": clip_padded}  # SD 2.x pads with "!" like OpenCLIP
    if family == "sd3":
        if not (config_dir / "tokenizer_3").is_dir():
            raise ModelLoadError(
                f"config folder {config_dir} has no tokenizer_3 (SD3's T5 tokenizer): point "
                "the registry entry's config_dir or SDWORKER_MODEL_CONFIG at an SD3 diffusers "
                "folder",
                field="model",
            )
        return {"tokenizer": clip, "tokenizer_2": clip_padded}
    return {"tokenizer": clip, "tokenizer_2": clip_padded}


def _load_single_file(
    pipeline_cls: Any, source: ModelSource, settings: Settings, dtype: torch.dtype
) -> Any:
    if source.family == "wan-t2v":
        raise ModelLoadError(
            f"{source.location} is a Wan transformer on its own; Wan models load from a "
            "diffusers folder or hub id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)",
            field="model",
        )
    own = source.defaults.config_dir
    config_dir = (
        Path(own).expanduser()
        if own
        else settings.model_config_dir or CONFIGS_DIR / f"{source.family}-base"
    )
    if not (config_dir / "model_index.json").is_file():
        raise ModelLoadError(
            f"config folder {config_dir} has no model_index.json (set the registry entry's "
            "config_dir or SDWORKER_MODEL_CONFIG to the model's diffusers config folder)",
            field="model",
        )
    extra = _single_file_tokenizers(source.family, config_dir)
    try:
        return pipeline_cls.from_single_file(
            source.location,
            config=str(config_dir),
            local_files_only=True,
            dtype=dtype,
            **extra,
            **pipeline_options(settings, source.family),
        )
    except Exception as exc:
        raise ModelLoadError(
            f"{source.location} could not be loaded as {source.family} with the configs in "
            f"{config_dir} ({type(exc).__name__}: {exc}); if the checkpoint's architecture "
            "differs, point SDWORKER_MODEL_CONFIG at a matching diffusers config folder",
            field="model",
        ) from exc


def _safetensors_numel(path: Path) -> int:
    """Parameters in a .safetensors file, from its JSON header only (no tensor read)."""
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in entry["shape"]:
            count *= int(dim)
        total += count
    return total


def _weight_files(folder: Path) -> list[Path]:
    """The weight files from_pretrained reads: variant files (x.fp16.safetensors) only
    where no plain file sits next to them."""
    files = sorted(folder.rglob("*.safetensors")) or sorted(folder.rglob("*.bin"))
    plain = {f.parent / f.name.split(".")[0] for f in files if f.name.count(".") == 1}
    return [
        f for f in files if f.name.count(".") == 1 or f.parent / f.name.split(".")[0] not in plain
    ]


def estimate_weight_bytes(source: ModelSource, settings: Settings, element_size: int) -> int | None:
    """Memory a model's weights will take once loaded in a dtype of `element_size` bytes,
    counted from the files' headers; None when the files are not on this machine."""
    if source.config is not None and source.config.memory_gb is not None:
        return int(source.config.memory_gb * 1024**3)
    if source.kind is SourceKind.TINY:
        root = ensure_tiny_model(source.location, settings.cache_dir)
    elif source.kind is SourceKind.HUB:
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(source.location, local_files_only=True))
        except Exception:  # not downloaded yet: measured after loading instead
            return None
    else:
        root = Path(source.location)
    files = [root] if root.is_file() else _weight_files(root)
    total = 0
    for path in files:
        if path.suffix == ".safetensors":
            total += _safetensors_numel(path) * element_size
        else:  # pickled weights: the file size is the best estimate without unpickling
            total += path.stat().st_size
    return total or None
