"""LoRA files and named styles: finding them, reading what they fit (from tensor shapes,
without loading weights or torch) and resolving a job's `loras` and `style` into the
adapters to activate. The API (validation, GET /v1/loras) and the engine share it."""

from __future__ import annotations

import re
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdworker.errors import InvalidJobError
from sdworker.options import LoraRequest, StyleRequest
from sdworker.settings import Settings

LORA_SUFFIXES = (".safetensors",)

# Cross-attention width -> the family whose UNet has it (the text encoders' width).
FAMILY_BY_CROSS_ATTENTION_DIM = {
    768: "sd15",
    1024: "sd21",
    2048: "sdxl",
    1280: "sdxl-refiner",
    96: "tiny-sdxl",
    64: "tiny-sdxl-refiner",
}

_CROSS_ATTN_KEY = re.compile(r"attn2[._]to_k[._].*(lora_A|lora_down|lora\.down)\.weight$")
_ADAPTER_NAME_BAD = re.compile(r"[^A-Za-z0-9_]")


@dataclass(frozen=True)
class LoraFile:
    """A LoRA on disk and what its tensors say about it."""

    name: str
    path: Path
    format: str  # diffusers (PEFT keys), kohya, or unknown
    cross_attention_dim: int | None
    rank: int | None
    size_bytes: int

    @property
    def family(self) -> str | None:
        if self.cross_attention_dim is None:
            return None
        return FAMILY_BY_CROSS_ATTENTION_DIM.get(self.cross_attention_dim, "unknown")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": self.format,
            "family": self.family,
            "cross_attention_dim": self.cross_attention_dim,
            "rank": self.rank,
            "size_bytes": self.size_bytes,
        }


def adapter_name_for(name: str) -> str:
    """A PEFT-safe adapter name: no dots, and a "sdw-" prefix because PEFT finds an
    adapter's tensors by substring, so a name like "a" or "1" would also match module
    paths ("attentions", "down_blocks.1") and touch other adapters' weights."""
    return "sdw-" + (_ADAPTER_NAME_BAD.sub("_", name) or "lora")


def inspect_lora(path: Path, name: str | None = None) -> LoraFile:
    """Read a LoRA file's format, cross-attention width and rank from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            keys = list(handle.keys())
            dim = rank = None
            for key in keys:
                if _CROSS_ATTN_KEY.search(key):
                    shape = handle.get_slice(key).get_shape()
                    rank, dim = int(shape[0]), int(shape[1])
                    break
    except Exception as exc:  # any parse failure: not a safetensors LoRA
        raise InvalidJobError(
            f"{path.name} is not a readable .safetensors LoRA ({type(exc).__name__}: {exc})",
            field="loras",
        ) from exc
    if any(key.startswith(("lora_unet_", "lora_te")) for key in keys):
        fmt = "kohya"
    elif any(".lora_A." in key or ".lora.down." in key or ".lora_down." in key for key in keys):
        fmt = "diffusers"
    else:
        fmt = "unknown"
    return LoraFile(
        name=name or path.stem,
        path=path,
        format=fmt,
        cross_attention_dim=dim,
        rank=rank,
        size_bytes=path.stat().st_size,
    )


class LoraCatalog:
    """The LoRA folder: name (file name without extension) -> LoraFile, re-read when a
    file changes. Callers name LoRAs; only trusted callers (CLI) may give paths."""

    def __init__(self, folder: Path | None, *, allow_paths: bool = False) -> None:
        self._folder = folder
        self._allow_paths = allow_paths
        self._cache: dict[Path, tuple[float, int, LoraFile]] = {}
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path | None:
        return self._folder

    def _read(self, path: Path, name: str) -> LoraFile:
        stat = path.stat()
        with self._lock:
            cached = self._cache.get(path)
            if cached and cached[:2] == (stat.st_mtime, stat.st_size) and cached[2].name == name:
                return cached[2]
        lora = inspect_lora(path, name)
        with self._lock:
            self._cache[path] = (stat.st_mtime, stat.st_size, lora)
        return lora

    def names(self) -> list[str]:
        if self._folder is None or not self._folder.is_dir():
            return []
        return sorted(
            path.relative_to(self._folder).with_suffix("").as_posix()
            for path in self._folder.rglob("*")
            if path.suffix in LORA_SUFFIXES and path.is_file()
        )

    def list(self) -> list[LoraFile]:
        """Every readable LoRA in the folder (unreadable files are left out)."""
        found = []
        for name in self.names():
            try:
                found.append(self.find(name, field="loras"))
            except InvalidJobError:
                continue
        return found

    def find(self, name: str, *, field: str) -> LoraFile:
        """The LoRA called `name`; an InvalidJobError listing the known names otherwise."""
        found = self._locate(name)
        if found is None:
            known = ", ".join(self.names()) or "none (no LoRA folder or it is empty)"
            # No folder path in the message: callers learn nothing of the server's files.
            raise InvalidJobError(f"{field}: unknown LoRA {name!r}; known: {known}", field=field)
        canonical, path = found
        return self._read(path, canonical)

    def _locate(self, name: str) -> tuple[str, Path] | None:
        """(catalog name, file): "x" and "x.safetensors" are the same LoRA, one adapter."""
        plain = bool(name) and not name.startswith(("/", "~")) and "\\" not in name
        plain = plain and all(part not in {"", ".", ".."} for part in name.split("/"))
        try:
            if plain and self._folder is not None:
                stem = name.removesuffix(".safetensors")
                candidate = self._folder / f"{stem}.safetensors"
                if candidate.is_file():
                    return stem, candidate
            if self._allow_paths:
                path = Path(name).expanduser()
                if path.suffix in LORA_SUFFIXES and path.is_file():
                    return name, path
        except (OSError, RuntimeError):  # a name too long for the file system, "~nobody"
            return None
        return None


@dataclass(frozen=True)
class Style:
    """A named style: a LoRA at one of a few strength levels."""

    name: str
    lora: str
    adapter_name: str
    levels: tuple[float, ...]
    cross_attention_dim: int | None = None
    description: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lora": Path(self.lora).stem,  # a name, never the operator's path
            "adapter_name": self.adapter_name,
            "levels": list(self.levels),
            "cross_attention_dim": self.cross_attention_dim,
            "description": self.description,
        }


class StyleRegistryError(ValueError):
    """The style file is unreadable or malformed (the message says where)."""


def _parse_style(name: str, entry: Any, where: Path) -> Style:
    if not isinstance(entry, dict):
        raise StyleRegistryError(f"{where}: style {name!r} must be a table/mapping")
    lora = entry.get("lora")
    levels = entry.get("levels", [1.0])
    if not isinstance(lora, str) or not lora:
        raise StyleRegistryError(f"{where}: style {name!r} needs `lora` (a LoRA name or path)")
    if not isinstance(levels, list) or not levels:
        raise StyleRegistryError(f"{where}: style {name!r}: `levels` must be a non-empty list")
    try:
        weights = tuple(float(level) for level in levels)
    except (TypeError, ValueError):
        raise StyleRegistryError(f"{where}: style {name!r}: levels must be numbers") from None
    dim = entry.get("cross_attention_dim")
    if dim is not None and not isinstance(dim, int):
        raise StyleRegistryError(f"{where}: style {name!r}: cross_attention_dim is an integer")
    return Style(
        name=name,
        lora=lora,
        adapter_name=adapter_name_for(str(entry.get("adapter_name") or name)),
        levels=weights,
        cross_attention_dim=dim,
        description=str(entry.get("description", "")),
    )


def load_styles(path: Path) -> dict[str, Style]:
    """Read a style registry: TOML (`[styles.NAME]` tables) or YAML (`styles:` mapping)."""
    try:
        text = path.read_text()
        if path.suffix in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as exc:  # OSError, TOML and YAML errors alike: the file is unusable
        raise StyleRegistryError(f"style file {path}: {type(exc).__name__}: {exc}") from exc
    styles = data.get("styles", {}) if isinstance(data, dict) else None
    if not isinstance(styles, dict):
        raise StyleRegistryError(f"{path}: expected a `styles` table of name -> style")
    return {str(name): _parse_style(str(name), entry, path) for name, entry in styles.items()}


@dataclass(frozen=True)
class ResolvedLora:
    """One adapter a job activates: which file, under which adapter name, how strong."""

    name: str
    path: Path
    adapter_name: str
    weight: float
    cross_attention_dim: int | None
    field: str  # the request field it came from, for warnings


@dataclass
class LoraLibrary:
    """The LoRA folder, the style registry and the LCM-LoRA, as one lookup."""

    catalog: LoraCatalog
    styles: dict[str, Style] = field(default_factory=dict)
    lcm_lora: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, allow_paths: bool = False) -> LoraLibrary:
        """Build from settings; StyleRegistryError when the style file is unusable."""
        styles = load_styles(settings.styles_file) if settings.styles_file else {}
        catalog = LoraCatalog(settings.lora_path, allow_paths=allow_paths)
        return cls(catalog=catalog, styles=styles, lcm_lora=settings.lcm_lora)

    def find_style(self, request: StyleRequest) -> Style:
        style = self.styles.get(request.name)
        if style is None:
            known = ", ".join(sorted(self.styles)) or "none (no style file configured)"
            raise InvalidJobError(
                f"style.name: unknown style {request.name!r}; known: {known}", field="style.name"
            )
        if request.level > len(style.levels):
            raise InvalidJobError(
                f"style.level: {request.level} is out of range for {style.name!r}: use 0 (off) "
                f"to {len(style.levels)}",
                field="style.level",
            )
        return style

    def resolve(
        self, loras: list[LoraRequest], style: StyleRequest | None, *, lcm: bool
    ) -> list[ResolvedLora]:
        """The adapters a job activates, in request order; InvalidJobError naming the field
        for unknown names, out-of-range levels and duplicates."""
        resolved: list[ResolvedLora] = []
        for index, request in enumerate(loras):
            where = f"loras[{index}].name"
            lora = self.catalog.find(request.name, field=where)
            adapter = adapter_name_for(lora.name)
            resolved.append(self._resolved(lora, adapter, request.weight, where))
        if style is not None:
            found = self.find_style(style)
            if style.level > 0:
                lora = self._operator_lora(found.lora, "style.name")
                weight = found.levels[style.level - 1]
                dim = found.cross_attention_dim or lora.cross_attention_dim
                resolved.append(
                    ResolvedLora(lora.name, lora.path, found.adapter_name, weight, dim, "style")
                )
        if lcm:
            if not self.lcm_lora:
                raise InvalidJobError(
                    "preset: lcm needs an LCM-LoRA; set SDWORKER_LCM_LORA (or serve an LCM "
                    "model with SDWORKER_MODEL_VARIANT=lcm)",
                    field="preset",
                )
            lora = self._operator_lora(self.lcm_lora, "preset")
            resolved.append(self._resolved(lora, adapter_name_for("lcm"), 1.0, "preset"))
        seen: set[object] = set()
        for item in resolved:
            identities = {item.adapter_name, item.path.resolve()}
            if identities & seen:
                raise InvalidJobError(
                    f"{item.field}: LoRA {item.name!r} is asked for twice (by name, path or "
                    "through a style)",
                    field=item.field,
                )
            seen |= identities
        return resolved

    def _operator_lora(self, name: str, field: str) -> LoraFile:
        """A LoRA the operator's configuration names (style file, LCM-LoRA): a path is
        fine there, unlike in a caller's request."""
        path = Path(name).expanduser()
        if path.suffix in LORA_SUFFIXES and path.is_file():
            return inspect_lora(path)
        return self.catalog.find(name, field=field)

    @staticmethod
    def _resolved(lora: LoraFile, adapter: str, weight: float, where: str) -> ResolvedLora:
        return ResolvedLora(lora.name, lora.path, adapter, weight, lora.cross_attention_dim, where)
