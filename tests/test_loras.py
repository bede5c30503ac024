"""The LoRA catalog, header inspection, style registries and GET /v1/loras.

Most files here are written with numpy (a LoRA's header is all these functions read), so
no model is needed; one fixture builds real files with the tiny pipeline to check the
layouts diffusers/PEFT and kohya write.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from sdworker.errors import InvalidJobError
from sdworker.loras import (
    LoraCatalog,
    LoraLibrary,
    StyleRegistryError,
    adapter_name_for,
    inspect_lora,
    load_styles,
)
from sdworker.options import LoraRequest, StyleRequest
from sdworker.settings import Settings

RANK = 4
TOML = """
[styles.glow]
lora = "alpha"
levels = [0.3, 0.5, 1.0]
description = "soft glow"

[styles.sketch]
lora = "kohya"
adapter_name = "pencil.v2"
"""
YAML = """
styles:
  glow:
    lora: alpha
    levels: [0.3, 0.5, 1.0]
    description: soft glow
  sketch:
    lora: kohya
    adapter_name: pencil.v2
"""


def write_lora(path: Path, fmt: str = "peft", dim: int = 96, *, cross: bool = True) -> Path:
    """A LoRA header like diffusers/PEFT ("peft") or kohya/sd-scripts ("kohya") files have:
    one cross-attention to_k pair (down: [rank, dim]) and a self-attention pair."""
    from safetensors.numpy import save_file

    zeros = np.zeros
    tensors: dict[str, np.ndarray] = {}
    if fmt == "peft":
        block = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
        tensors[f"{block}.attn1.to_q.lora_A.weight"] = zeros((RANK, 64), np.float32)
        tensors[f"{block}.attn1.to_q.lora_B.weight"] = zeros((64, RANK), np.float32)
        if cross:
            tensors[f"{block}.attn2.to_k.lora_A.weight"] = zeros((RANK, dim), np.float32)
            tensors[f"{block}.attn2.to_k.lora_B.weight"] = zeros((64, RANK), np.float32)
    elif fmt == "kohya":
        block = "lora_unet_input_blocks_4_1_transformer_blocks_0"
        te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
        tensors[f"{te}.lora_down.weight"] = zeros((RANK, 32), np.float32)
        tensors[f"{te}.lora_up.weight"] = zeros((32, RANK), np.float32)
        if cross:
            tensors[f"{block}_attn2_to_k.lora_down.weight"] = zeros((RANK, dim), np.float32)
            tensors[f"{block}_attn2_to_k.lora_up.weight"] = zeros((64, RANK), np.float32)
            tensors[f"{block}_attn2_to_k.alpha"] = np.array(float(RANK), np.float32)
    else:  # tensors, but nothing a LoRA loader knows
        tensors["some.weight"] = zeros((3, 3), np.float32)
    save_file(tensors, str(path))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """LoRA folder: alpha (PEFT, 96), kohya (kohya, 96), sd15 (PEFT, 768), a broken file,
    files that are not LoRAs, a LoRA in a subfolder; outside.safetensors next to it."""
    loras = tmp_path / "loras"
    (loras / "sub").mkdir(parents=True)
    write_lora(loras / "alpha.safetensors")
    write_lora(loras / "kohya.safetensors", "kohya")
    write_lora(loras / "sd15.safetensors", dim=768)
    write_lora(loras / "sub" / "nested.safetensors")
    (loras / "broken.safetensors").write_bytes(b"this is not a safetensors file")
    (loras / "notes.txt").write_text("not a LoRA")
    write_lora(loras / "old.ckpt")  # right content, wrong suffix: not listed
    write_lora(tmp_path / "outside.safetensors")
    return loras


# -- inspect_lora -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files written by the research builders from the tiny SDXL pipeline (needs torch)."""
    from sdworker.engine.tiny import build_tiny_pipeline
    from tests.support.adapter_builders import (
        build_tiny_lora_for_sd15_like,
        build_tiny_lora_kohya,
        build_tiny_lora_peft,
    )

    pipe = build_tiny_pipeline("tiny-sdxl")
    out = tmp_path_factory.mktemp("built-loras")
    files = {name: out / f"{name}.safetensors" for name in ("peft", "kohya", "sd15")}
    build_tiny_lora_peft(pipe, files["peft"], rank=4)
    build_tiny_lora_kohya(pipe, files["kohya"], rank=8, naming="sgm")
    build_tiny_lora_for_sd15_like(pipe, files["sd15"], rank=2, cross_attention_dim=768)
    return files


@pytest.mark.parametrize(
    ("name", "fmt", "dim", "rank", "family"),
    [
        ("peft", "diffusers", 96, 4, "tiny-sdxl"),
        ("kohya", "kohya", 96, 8, "tiny-sdxl"),
        ("sd15", "diffusers", 768, 2, "sd15"),
    ],
)
def test_inspect_lora_reads_builder_files(
    built_files: dict[str, Path], name: str, fmt: str, dim: int, rank: int, family: str
) -> None:
    lora = inspect_lora(built_files[name])
    assert (lora.name, lora.format, lora.cross_attention_dim, lora.rank) == (name, fmt, dim, rank)
    assert lora.family == family
    assert lora.describe()["family"] == family
    assert lora.size_bytes == built_files[name].stat().st_size


@pytest.mark.parametrize(
    ("dim", "family"),
    [
        (768, "sd15"),
        (1024, "sd21"),
        (2048, "sdxl"),
        (1280, "sdxl-refiner"),
        (96, "tiny-sdxl"),
        (64, "tiny-sdxl-refiner"),
        (512, "unknown"),
    ],
)
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_family_follows_the_cross_attention_width(
    tmp_path: Path, fmt: str, dim: int, family: str
) -> None:
    lora = inspect_lora(write_lora(tmp_path / "x.safetensors", fmt, dim), "x")
    assert lora.format == ("kohya" if fmt == "kohya" else "diffusers")
    assert (lora.cross_attention_dim, lora.family, lora.rank) == (dim, family, RANK)


def test_a_lora_without_cross_attention_layers_has_no_family(tmp_path: Path) -> None:
    lora = inspect_lora(write_lora(tmp_path / "x.safetensors", cross=False))
    assert lora.format == "diffusers"
    assert (lora.cross_attention_dim, lora.family, lora.rank) == (None, None, None)
    assert inspect_lora(write_lora(tmp_path / "y.safetensors", "other")).format == "unknown"


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a safetensors file",
        b"",
        (10**9).to_bytes(8, "little") + b"{",  # a header length past the end of the file
        (2).to_bytes(8, "little") + b"[]",  # a header that is JSON but not a table
    ],
    ids=["text", "empty", "truncated", "bad-header"],
)
def test_a_file_that_is_not_safetensors_is_an_invalid_job(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(InvalidJobError) as caught:
        inspect_lora(path)
    assert caught.value.field == "loras"
    assert "broken.safetensors" in caught.value.message


# -- the catalog ------------------------------------------------------------------------


def test_the_catalog_lists_lora_files_by_name_and_leaves_unreadable_ones_out(
    folder: Path,
) -> None:
    catalog = LoraCatalog(folder)
    assert catalog.names() == ["alpha", "broken", "kohya", "sd15", "sub/nested"]
    assert [lora.name for lora in catalog.list()] == ["alpha", "kohya", "sd15", "sub/nested"]
    with pytest.raises(InvalidJobError, match=r"broken\.safetensors"):
        catalog.find("broken", field="loras[0].name")
    assert catalog.find("alpha.safetensors", field="x").path == folder / "alpha.safetensors"


def test_the_catalog_rereads_a_file_that_changed(folder: Path) -> None:
    catalog = LoraCatalog(folder)
    assert catalog.find("alpha", field="x").cross_attention_dim == 96
    write_lora(folder / "alpha.safetensors", "kohya", 2048)
    changed = catalog.find("alpha", field="x")
    assert (changed.format, changed.family) == ("kohya", "sdxl")


@pytest.mark.parametrize(
    "name",
    [
        "../outside",
        "../outside.safetensors",
        "sub/../../outside",
        "./alpha/../../outside",
        "OUTSIDE",  # absolute path of an existing LoRA outside the folder, filled in below
        "/etc/passwd",
        "~/outside.safetensors",
        "..\\outside",
        "notes.txt",
        "old.ckpt",
        "old",
        "",
    ],
)
def test_an_api_catalog_knows_only_names_inside_its_folder(folder: Path, name: str) -> None:
    outside = folder.parent / "outside.safetensors"
    name = str(outside) if name == "OUTSIDE" else name
    catalog = LoraCatalog(folder, allow_paths=False)
    with pytest.raises(InvalidJobError) as caught:
        catalog.find(name, field="loras[0].name")
    assert caught.value.field == "loras[0].name"
    assert "unknown LoRA" in caught.value.message
    assert "alpha, broken, kohya, sd15, sub/nested" in caught.value.message


def test_a_trusted_catalog_takes_paths_and_an_api_catalog_names_in_subfolders(
    folder: Path,
) -> None:
    outside = folder.parent / "outside.safetensors"
    assert LoraCatalog(folder, allow_paths=True).find(str(outside), field="x").path == outside
    nested = LoraCatalog(folder).find("sub/nested", field="x")
    assert nested.path == folder / "sub" / "nested.safetensors"


def test_a_catalog_without_a_folder_says_so(tmp_path: Path) -> None:
    for catalog in (LoraCatalog(None), LoraCatalog(tmp_path / "missing")):
        assert catalog.names() == [] and catalog.list() == []
        with pytest.raises(InvalidJobError, match="known: none"):
            catalog.find("alpha", field="loras[0].name")


def test_adapter_names_are_peft_safe_and_prefixed() -> None:
    assert adapter_name_for("alpha") == "sdw-alpha"
    assert adapter_name_for("sub/my.lora-v2") == "sdw-sub_my_lora_v2"
    assert adapter_name_for("1") == "sdw-1"


# -- style registries -------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "text"), [(".toml", TOML), (".yaml", YAML), (".yml", YAML)])
def test_toml_and_yaml_registries_read_the_same(tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"styles{suffix}"
    path.write_text(text)
    styles = load_styles(path)
    assert sorted(styles) == ["glow", "sketch"]
    glow, sketch = styles["glow"], styles["sketch"]
    assert (glow.lora, glow.adapter_name, glow.levels) == ("alpha", "sdw-glow", (0.3, 0.5, 1.0))
    assert glow.description == "soft glow"
    assert (sketch.lora, sketch.adapter_name, sketch.levels) == ("kohya", "sdw-pencil_v2", (1.0,))


@pytest.mark.parametrize(
    ("suffix", "text", "words"),
    [
        (".toml", "[styles.glow]\nlevels = [0.5]\n", ["glow", "needs `lora`"]),
        (".yaml", "styles:\n  glow:\n    levels: [0.5]\n", ["glow", "needs `lora`"]),
        (".toml", '[styles.glow]\nlora = ""\n', ["glow", "lora"]),
        (".toml", '[styles.glow]\nlora = "alpha"\nlevels = []\n', ["glow", "non-empty"]),
        (".yaml", "styles:\n  glow: {lora: alpha, levels: []}\n", ["glow", "non-empty"]),
        (".toml", '[styles.glow]\nlora = "alpha"\nlevels = 0.5\n', ["glow", "levels"]),
        (".toml", '[styles.glow]\nlora = "alpha"\nlevels = ["x"]\n', ["glow", "numbers"]),
        (
            ".toml",
            '[styles.glow]\nlora = "alpha"\ncross_attention_dim = "big"\n',
            ["glow", "cross_attention_dim"],
        ),
        (".yaml", "styles:\n  glow: alpha\n", ["glow", "table/mapping"]),
        (".yaml", "styles: [glow]\n", ["`styles`"]),
        (".yaml", "- glow\n", ["`styles`"]),
        (".toml", "[styles.glow\nlora = 1\n", ["style file", "TOMLDecodeError"]),
        (".yaml", "styles:\n  glow: {lora: [\n", ["style file", "Error"]),
    ],
)
def test_a_malformed_registry_names_the_file_and_the_style(
    tmp_path: Path, suffix: str, text: str, words: list[str]
) -> None:
    path = tmp_path / f"styles{suffix}"
    path.write_text(text)
    with pytest.raises(StyleRegistryError) as caught:
        load_styles(path)
    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_a_missing_registry_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(StyleRegistryError, match=r"nowhere\.toml"):
        load_styles(path)


def library(folder: Path, styles_text: str = TOML) -> LoraLibrary:
    styles = folder.parent / "styles.toml"
    styles.write_text(styles_text)
    return LoraLibrary.from_settings(Settings(_env_file=None, lora_dir=folder, styles_file=styles))


def test_a_style_resolves_to_its_lora_at_the_level_weight(folder: Path) -> None:
    lib = library(folder)
    (resolved,) = lib.resolve([], StyleRequest(name="glow", level=2), lcm=False)
    assert (resolved.name, resolved.weight, resolved.adapter_name) == ("alpha", 0.5, "sdw-glow")
    assert (resolved.path, resolved.cross_attention_dim) == (folder / "alpha.safetensors", 96)
    assert lib.resolve([], StyleRequest(name="glow", level=0), lcm=False) == []
    with pytest.raises(InvalidJobError) as caught:
        lib.resolve([], StyleRequest(name="glow", level=4), lcm=False)
    assert caught.value.field == "style.level"
    both = lib.resolve(
        [LoraRequest(name="kohya", weight=-1.5)], StyleRequest(name="glow"), lcm=False
    )
    assert [(item.name, item.weight, item.field) for item in both] == [
        ("kohya", -1.5, "loras[0].name"),
        ("alpha", 0.3, "style"),
    ]


def test_a_style_whose_lora_is_missing_is_refused_naming_the_style(folder: Path) -> None:
    lib = library(folder, '[styles.ghost]\nlora = "gone"\n')
    with pytest.raises(InvalidJobError) as caught:
        lib.resolve([], StyleRequest(name="ghost"), lcm=False)
    assert caught.value.field == "style.name"
    assert "'gone'" in caught.value.message


def test_a_style_may_name_its_lora_by_path_but_a_request_may_not(folder: Path) -> None:
    """The style file is the operator's: a path is fine there, also on the service, whose
    catalog refuses paths in requests."""
    outside = folder.parent / "outside.safetensors"
    lib = library(folder, f'[styles.far]\nlora = "{outside}"\nlevels = [0.4]\n')
    (resolved,) = lib.resolve([], StyleRequest(name="far"), lcm=False)
    assert (resolved.path, resolved.weight, resolved.field) == (outside, 0.4, "style")
    with pytest.raises(InvalidJobError) as caught:
        lib.resolve([LoraRequest(name=str(outside))], None, lcm=False)
    assert caught.value.field == "loras[0].name"


def test_the_same_lora_twice_is_refused_naming_the_second(folder: Path) -> None:
    lib = library(folder)
    twice = [LoraRequest(name="alpha"), LoraRequest(name="kohya"), LoraRequest(name="alpha")]
    with pytest.raises(InvalidJobError) as caught:
        lib.resolve(twice, None, lcm=False)
    assert caught.value.field == "loras[2].name"
    assert "'alpha'" in caught.value.message and "twice" in caught.value.message


def test_the_same_lora_file_under_two_spellings_is_refused(folder: Path) -> None:
    lib = library(folder)
    spellings = [LoraRequest(name="alpha"), LoraRequest(name="alpha.safetensors")]
    with pytest.raises(InvalidJobError) as caught:
        lib.resolve(spellings, None, lcm=False)
    assert caught.value.field == "loras[1].name"


# -- the API ----------------------------------------------------------------------------


@pytest.fixture
def client(tmp_path: Path, folder: Path, cache_dir: Path) -> Iterator[TestClient]:
    from sdworker.api.app import create_app

    styles = tmp_path / "styles.yaml"
    styles.write_text(YAML)
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        cache_dir=cache_dir,
        model="tiny-sdxl",
        device="cpu",
        lora_dir=folder,
        styles_file=styles,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


JOB: dict[str, Any] = {"prompt": "a fox", "size": "64x64", "steps": 2}


def test_get_loras_lists_files_with_format_and_family_and_the_styles(
    client: TestClient, folder: Path
) -> None:
    response = client.get("/v1/loras")
    assert response.status_code == 200, response.text
    body = response.json()
    assert "folder" not in body and str(folder) not in response.text  # no server paths
    listed = {lora["name"]: lora for lora in body["loras"]}
    assert sorted(listed) == ["alpha", "kohya", "sd15", "sub/nested"]  # broken is left out
    assert listed["alpha"] | {"size_bytes": 0} == {
        "name": "alpha",
        "format": "diffusers",
        "family": "tiny-sdxl",
        "cross_attention_dim": 96,
        "rank": RANK,
        "size_bytes": 0,
    }
    assert (listed["kohya"]["format"], listed["kohya"]["family"]) == ("kohya", "tiny-sdxl")
    assert (listed["sd15"]["family"], listed["sd15"]["cross_attention_dim"]) == ("sd15", 768)
    styles = {style["name"]: style for style in body["styles"]}
    assert sorted(styles) == ["glow", "sketch"]
    assert styles["glow"]["lora"] == "alpha"
    assert styles["glow"]["levels"] == [0.3, 0.5, 1.0]
    assert styles["sketch"]["adapter_name"] == "sdw-pencil_v2"


def error_of(response: Any) -> tuple[list[Any], str]:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    return detail[0]["loc"], detail[0]["msg"]


def test_a_job_naming_an_unknown_lora_is_a_422_listing_the_known_ones(
    client: TestClient,
) -> None:
    loc, message = error_of(client.post("/v1/jobs", json={**JOB, "loras": [{"name": "gamma"}]}))
    assert loc == ["body", "loras[0].name"]
    assert "'gamma'" in message
    for known in ("alpha", "kohya", "sd15", "sub/nested"):
        assert known in message
    escape = client.post("/v1/jobs", json={**JOB, "loras": [{"name": "../outside"}]})
    assert error_of(escape)[0] == ["body", "loras[0].name"]
    broken = client.post("/v1/jobs", json={**JOB, "loras": [{"name": "broken"}]})
    assert "broken.safetensors" in error_of(broken)[1]
    assert client.get("/v1/jobs").json()["jobs"] == []  # nothing was queued


def test_a_style_level_out_of_range_is_a_422_naming_style_level(client: TestClient) -> None:
    too_high = client.post("/v1/jobs", json={**JOB, "style": {"name": "glow", "level": 4}})
    loc, message = error_of(too_high)
    assert loc == ["body", "style.level"]
    assert "'glow'" in message and "3" in message
    unknown = client.post("/v1/jobs", json={**JOB, "style": {"name": "neon"}})
    loc, message = error_of(unknown)
    assert loc == ["body", "style.name"]
    assert "glow" in message and "sketch" in message
    twice = client.post(
        "/v1/jobs", json={**JOB, "loras": [{"name": "alpha"}, {"name": "alpha", "weight": 0.5}]}
    )
    assert "twice" in error_of(twice)[1]
    assert client.get("/v1/jobs").json()["jobs"] == []
    accepted = client.post(
        "/v1/jobs",
        json={**JOB, "loras": [{"name": "kohya", "weight": 0.8}], "style": {"name": "glow"}},
    )
    assert accepted.status_code == 202, accepted.text
