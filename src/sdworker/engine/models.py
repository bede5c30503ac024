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

from sdworker.engine.tiny import clip_tokenizers, ensure_tiny_model, is_tiny_model
from sdworker.errors import ModelLoadError, ModelNotFoundError
from sdworker.settings import Settings

CONFIGS_DIR = Path(__file__).parent / "configs"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
SUPPORTED_FAMILIES = ("sdxl",)

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


def resolve_model(name: str, settings: Settings, *, trusted: bool = True) -> ModelSource:
    """Find a model by name and detect its family, without loading weights.

    Untrusted names (from API callers) are looked up only under the model root, as hub
    ids or as built-in models, and every miss gives the same error, so a caller learns
    nothing about the server's files."""
    if is_tiny_model(name):
        family = "sdxl-refiner" if name.endswith("refiner") else "sdxl"
        return ModelSource(name, SourceKind.TINY, name, family)
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
        "give a .safetensors/.ckpt file, a diffusers folder, a hub id (org/name) or tiny-sdxl",
        field="model",
    )


def _family_from_index(index: dict[str, Any], where: str) -> str:
    class_name = str(index.get("_class_name", ""))
    family = _PIPELINE_FAMILIES.get(class_name)
    if family is None:
        raise ModelLoadError(f"{where}: unsupported pipeline class {class_name!r}", field="model")
    if family == "sdxl" and index.get("text_encoder", [None])[0] is None:
        return "sdxl-refiner"  # the refiner has only the second text encoder
    return family


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
    return _family_from_index(index, str(path))


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
    return _family_from_index(json.loads(Path(index_path).read_text()), repo_id)


def load_pipeline(source: ModelSource, settings: Settings, dtype: torch.dtype) -> Any:
    """Load the text-to-image pipeline of a model on the CPU (placement is the caller's)."""
    if source.family not in SUPPORTED_FAMILIES:
        raise ModelLoadError(
            f"model {source.name!r} is a {source.family} model; this version serves "
            f"{', '.join(SUPPORTED_FAMILIES)}",
            field="model",
        )
    from diffusers import StableDiffusionXLPipeline

    options = pipeline_options(settings)
    try:
        if source.kind is SourceKind.SINGLE_FILE:
            return _load_single_file(StableDiffusionXLPipeline, source, settings, dtype)
        location = source.location
        if source.kind is SourceKind.TINY:
            location = str(ensure_tiny_model(source.location, settings.cache_dir))
        return StableDiffusionXLPipeline.from_pretrained(location, dtype=dtype, **options)
    except ModelLoadError:
        raise
    except Exception as exc:  # diffusers raises many types for one cause: unusable weights
        raise ModelLoadError(
            f"model {source.name!r} ({source.kind.value} {source.location}) failed to load: "
            f"{type(exc).__name__}: {exc}",
            field="model",
        ) from exc


def pipeline_options(settings: Settings) -> dict[str, Any]:
    """Constructor options of SDXL pipelines: the invisible watermark is explicit (off by
    default), not diffusers' 'on whenever the package happens to be installed'."""
    if settings.watermark:
        from diffusers.utils import is_invisible_watermark_available

        if not is_invisible_watermark_available():
            raise ModelLoadError(
                "SDWORKER_WATERMARK is on but the invisible-watermark package is not "
                "installed: pip install 'sdworker[watermark]'",
                field="watermark",
            )
    return {"add_watermarker": settings.watermark}


def _load_single_file(
    pipeline_cls: Any, source: ModelSource, settings: Settings, dtype: torch.dtype
) -> Any:
    config_dir = settings.model_config_dir or CONFIGS_DIR / f"{source.family}-base"
    if not (config_dir / "model_index.json").is_file():
        raise ModelLoadError(
            f"config folder {config_dir} has no model_index.json (SDWORKER_MODEL_CONFIG)",
            field="model",
        )
    extra: dict[str, Any] = {}
    if not (config_dir / "tokenizer").is_dir():
        extra["tokenizer"], extra["tokenizer_2"] = clip_tokenizers()
    try:
        return pipeline_cls.from_single_file(
            source.location,
            config=str(config_dir),
            local_files_only=True,
            dtype=dtype,
            **extra,
            **pipeline_options(settings),
        )
    except Exception as exc:
        raise ModelLoadError(
            f"{source.location} could not be loaded as {source.family} with the configs in "
            f"{config_dir} ({type(exc).__name__}: {exc}); if the checkpoint's architecture "
            "differs, point SDWORKER_MODEL_CONFIG at a matching diffusers config folder",
            field="model",
        ) from exc
