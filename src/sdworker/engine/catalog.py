"""What models this machine has: built-in tiny models, the model root, the hub cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdworker.engine.models import SINGLE_FILE_SUFFIXES, folder_family, single_file_family
from sdworker.engine.tiny import TINY_MODELS, tiny_family
from sdworker.errors import ModelLoadError
from sdworker.settings import Settings


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str
    family: str
    location: str


def _family_or_problem(path: Path) -> str:
    try:
        return folder_family(path) if path.is_dir() else single_file_family(path)
    except ModelLoadError as exc:
        return f"unusable: {exc.message}"


def _root_entries(root: Path) -> list[ModelEntry]:
    entries = []
    for path in sorted(root.expanduser().iterdir()):
        if path.is_dir() and (path / "model_index.json").is_file():
            entries.append(ModelEntry(path.name, "folder", _family_or_problem(path), str(path)))
        elif path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
            entries.append(
                ModelEntry(path.name, "single_file", _family_or_problem(path), str(path))
            )
    return entries


def _hub_entries() -> list[ModelEntry]:
    """Diffusers repos already in the Hugging Face cache (usable with HF_HUB_OFFLINE=1)."""
    try:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
    except Exception:  # no cache folder yet, or an unreadable one: nothing to list
        return []
    entries = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        for revision in repo.revisions:
            index = next((f for f in revision.files if f.file_name == "model_index.json"), None)
            if index is not None:
                family = _family_or_problem(index.file_path.parent)
                entries.append(ModelEntry(repo.repo_id, "hub", family, str(repo.repo_path)))
                break
    return entries


def list_models(settings: Settings) -> list[ModelEntry]:
    """Every model `--model` / SDWORKER_MODEL could name right now, with its family."""
    entries = [ModelEntry(name, "tiny", tiny_family(name), "built-in") for name in TINY_MODELS]
    if settings.model_root is not None and settings.model_root.expanduser().is_dir():
        entries.extend(_root_entries(settings.model_root))
    entries.extend(_hub_entries())
    return entries
