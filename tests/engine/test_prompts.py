"""Prompt weighting and long prompts (engine/prompts.py) on the tiny model.

Against plain diffusers with the same seed: weighting off and a prompt of one chunk is
diffusers' own encoding (identical pixels); weighting on without syntax gives compel
embeddings equal to diffusers' (max |diff| <= 1). Weights, blends and prompts past 75
tokens change the image; a job in a batch equals the job alone (max |diff| <= 2).

Weights change the tiny model's pixels only a little (one token of 77 is rescaled), so
those tests compare the returned latents, which show any change of the conditioning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdworker.engine.engine import Cancelled, Engine, EngineResult
from sdworker.engine.prompts import PromptEncoder
from sdworker.errors import InvalidJobError
from sdworker.jobs import JobSpec, batch_key_of
from sdworker.prompt_syntax import PromptSyntaxError, check_weighting_syntax
from tests.conftest import max_pixel_difference

SIZE = 64
STEPS = 2
SEED = 7
GUIDANCE = 5.0
PROMPT = "a cat on a mat"

# One CLIP token each; 20 words, repeated to any length.
WORDS = [
    *("red", "blue", "green", "yellow", "black", "white", "small", "large", "old", "new"),
    *("tall", "short", "bright", "dark", "soft", "hard", "warm", "cold", "quiet", "loud"),
]


def words(count: int, *, late: str | None = None, at: int = 100) -> str:
    """`count` one-token words; `late` replaces word `at` (past the first chunk)."""
    chosen = [WORDS[i % len(WORDS)] for i in range(count)]
    if late is not None:
        chosen[at] = late
    return " ".join(chosen)


LONG = words(120)
LONG_CHANGED = words(120, late="cat")  # only word 100 differs


def _spec(**fields: Any) -> JobSpec:
    base: dict[str, Any] = {
        "prompt": PROMPT,
        "width": SIZE,
        "height": SIZE,
        "steps": STEPS,
        "seed": SEED,
        "scheduler": "euler",  # the tiny model's own scheduler, as plain diffusers uses it
        "guidance_scale": GUIDANCE,
        "return_latents": True,
    }
    return JobSpec(**(base | fields))


def _run(engine: Engine, **fields: Any) -> EngineResult:
    outcome = engine.run(_spec(**fields))
    assert isinstance(outcome, EngineResult)
    return outcome


def _latents(result: EngineResult) -> np.ndarray:
    assert result.latents is not None
    return np.frombuffer(result.latents.data, dtype=np.float16).astype(np.float32)


def _latent_distance(a: EngineResult, b: EngineResult) -> float:
    return float(np.abs(_latents(a) - _latents(b)).max())


def _chunk_notes(result: EngineResult) -> list[str]:
    return [w for w in result.warnings if "chunks" in w]


@pytest.fixture(scope="module")
def pipe(tiny_folder: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def encoder(pipe: Any) -> PromptEncoder:
    return PromptEncoder(pipe)


def _diffusers(pipe: Any, prompt: str, negative: str | None = None) -> Any:
    """Plain diffusers, the same call the engine makes for _spec()."""
    return pipe(
        prompt=prompt,
        negative_prompt=negative,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images[0]


def test_the_long_prompt_has_120_tokens(encoder: PromptEncoder) -> None:
    """The premise of the long-prompt tests."""
    assert encoder.token_count(LONG, weighting=False) == 120
    assert encoder.token_count(LONG_CHANGED, weighting=True) == 120
    assert encoder.token_count(words(75), weighting=False) == 75


# ------------------------------------------------------------- equal to plain diffusers


def test_weighting_off_short_prompt_is_plain_diffusers(engine: Engine, pipe: Any) -> None:
    result = _run(engine)
    assert max_pixel_difference(result.images[0], _diffusers(pipe, PROMPT)) == 0
    assert _chunk_notes(result) == []


@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_weighting_on_without_syntax_equals_plain_diffusers(
    engine: Engine, pipe: Any, negative: str | None
) -> None:
    """compel's embeddings equal diffusers' (and None keeps SDXL's zero negative)."""
    result = _run(engine, prompt_weighting=True, negative_prompt=negative)
    assert max_pixel_difference(result.images[0], _diffusers(pipe, PROMPT, negative)) <= 1
    assert _chunk_notes(result) == []


def test_short_texts_encode_like_diffusers(encoder: PromptEncoder, pipe: Any) -> None:
    ours, notes = encoder.encode({"prompt": PROMPT, "negative_prompt": "blurry"}, weighting=True)
    assert notes == []
    theirs = pipe.encode_prompt(
        PROMPT,
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt="blurry",
    )
    names = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    for name, expected in zip(names, theirs, strict=True):
        assert torch.equal(ours[name], expected), name
    assert ours["prompt"] is None and ours["negative_prompt"] is None


def test_a_missing_negative_is_zero_embeddings(encoder: PromptEncoder, pipe: Any) -> None:
    """tiny-sdxl has force_zeros_for_empty_prompt, as SDXL base: None means zeros, for a
    long prompt too (where diffusers' own default cannot be used)."""
    assert pipe.config.force_zeros_for_empty_prompt
    for prompt in (PROMPT, LONG):
        embeds, _ = encoder.encode({"prompt": prompt, "negative_prompt": None}, weighting=True)
        negative = embeds["negative_prompt_embeds"]
        assert negative.shape == embeds["prompt_embeds"].shape
        assert not negative.any() and not embeds["negative_pooled_prompt_embeds"].any()
        assert embeds["prompt_embeds"].any()


# -------------------------------------------------------------------- weights change it


@pytest.fixture(scope="module")
def plain(engine: Engine) -> EngineResult:
    return _run(engine, prompt_weighting=True)


def test_a1111_weight_changes_the_conditioning_and_nothing_else(
    engine: Engine, plain: EngineResult
) -> None:
    weighted = _run(engine, prompt="a (cat:1.5) on a mat", prompt_weighting=True)
    native = _run(engine, prompt="a (cat)1.5 on a mat", prompt_weighting=True)
    literal = _run(engine, prompt="a (cat:1.5) on a mat")  # weighting off
    again = _run(engine, prompt="a (cat:1.5) on a mat", prompt_weighting=True)
    assert _latent_distance(weighted, again) == 0  # runs are deterministic
    assert _latent_distance(weighted, native) == 0  # (cat:1.5) is compel's (cat)1.5
    assert _latent_distance(weighted, plain) > 0  # the weight did something
    # ...by rescaling "cat": much closer to the plain prompt than the literal text,
    # whose extra tokens "(", ":", "1.5", ")" change the whole sentence.
    assert _latent_distance(literal, plain) > 10 * _latent_distance(weighted, plain)
    assert max_pixel_difference(literal.images[0], plain.images[0]) > 0
    assert max_pixel_difference(literal.images[0], weighted.images[0]) > 0


@pytest.mark.parametrize("prompt", ["a cat++ on a mat", "a cat-- on a mat", "a (cat:0.5) on a mat"])
def test_up_and_down_weights_change_the_image(
    engine: Engine, plain: EngineResult, prompt: str
) -> None:
    assert _latent_distance(_run(engine, prompt=prompt, prompt_weighting=True), plain) > 0


def test_a_large_weight_changes_the_pixels(engine: Engine, plain: EngineResult) -> None:
    heavy = _run(engine, prompt="a (cat:3) on a mat", prompt_weighting=True)
    assert max_pixel_difference(heavy.images[0], plain.images[0]) > 0


def test_blend_mixes_the_two_prompts(engine: Engine) -> None:
    cat = _run(engine, prompt="a cat", prompt_weighting=True)
    dog = _run(engine, prompt="a dog", prompt_weighting=True)
    half = _run(engine, prompt='("a cat", "a dog").blend(0.5, 0.5)', prompt_weighting=True)
    assert len(half.images) == 1 and half.images[0].size == (SIZE, SIZE)
    assert _latent_distance(half, cat) > 0 and _latent_distance(half, dog) > 0
    only_cat = _run(engine, prompt='("a cat", "a dog").blend(1, 0)', prompt_weighting=True)
    assert _latent_distance(only_cat, cat) <= 1e-2  # pooled blended too, not the raw text


def test_and_runs(engine: Engine, plain: EngineResult) -> None:
    both = _run(engine, prompt='("a cat", "on a mat").and()', prompt_weighting=True)
    assert len(both.images) == 1 and _latent_distance(both, plain) > 0


def test_compel_weights_are_the_prompt_with_the_terms_appended(
    engine: Engine, plain: EngineResult
) -> None:
    legacy = _run(engine, compel_enabled=True, compel_weights="(detailed:1.2)")
    native = _run(engine, prompt=f"{PROMPT}, (detailed:1.2)", prompt_weighting=True)
    assert _latent_distance(legacy, native) == 0
    assert legacy.images[0].tobytes() == native.images[0].tobytes()
    assert _latent_distance(legacy, plain) > 0
    # compel_weights alone turn weighting on: the same image
    alone = _run(engine, compel_weights="(detailed:1.2)")
    assert _latent_distance(alone, native) == 0


# ----------------------------------------------------------------------- long prompts


def test_plain_diffusers_truncates_a_long_prompt(pipe: Any) -> None:
    """The premise of the next test: word 100 changes nothing in plain diffusers."""
    assert max_pixel_difference(_diffusers(pipe, LONG), _diffusers(pipe, LONG_CHANGED)) == 0


@pytest.mark.parametrize("weighting", [False, True])
def test_a_long_prompt_is_not_truncated(engine: Engine, weighting: bool) -> None:
    first = _run(engine, prompt=LONG, prompt_weighting=weighting)
    second = _run(engine, prompt=LONG_CHANGED, prompt_weighting=weighting)
    assert max_pixel_difference(first.images[0], second.images[0]) > 0
    [note] = _chunk_notes(first)
    assert "120 tokens" in note and "2 chunks" in note and "not truncated" in note


def test_a_75_token_prompt_gets_no_chunk_note(engine: Engine) -> None:
    result = _run(engine, prompt=words(75), prompt_weighting=True)
    assert _chunk_notes(result) == []


@pytest.mark.parametrize("weighting", [False, True])
def test_long_prompt_embeddings_are_chunked(encoder: PromptEncoder, weighting: bool) -> None:
    first, notes = encoder.encode({"prompt": LONG, "negative_prompt": None}, weighting=weighting)
    second, _ = encoder.encode(
        {"prompt": LONG_CHANGED, "negative_prompt": None}, weighting=weighting
    )
    assert first["prompt_embeds"].shape[1] == 154  # 2 chunks of 77
    assert torch.equal(first["prompt_embeds"][:, :77], second["prompt_embeds"][:, :77])
    assert not torch.equal(first["prompt_embeds"][:, 77:], second["prompt_embeds"][:, 77:])
    # The pooled embedding sees the first chunk only (CLIP), as diffusers' does.
    assert torch.equal(first["pooled_prompt_embeds"], second["pooled_prompt_embeds"])
    assert len(notes) == 1 and "120 tokens" in notes[0]


def test_one_chunk_boundary(encoder: PromptEncoder) -> None:
    assert encoder.encode({"prompt": words(75), "negative_prompt": None}, weighting=False) == (
        {},
        [],
    )
    embeds, notes = encoder.encode({"prompt": words(75), "negative_prompt": None}, weighting=True)
    assert embeds["prompt_embeds"].shape[1] == 77 and notes == []
    embeds, notes = encoder.encode({"prompt": words(76), "negative_prompt": None}, weighting=False)
    assert embeds["prompt_embeds"].shape[1] == 154 and "76 tokens" in notes[0]


def test_the_chunk_note_counts_the_chunks_encoded(encoder: PromptEncoder) -> None:
    prompt = "a cat. " + words(130)  # compel splits after "a cat." first
    embeds, [note] = encoder.encode({"prompt": prompt, "negative_prompt": None}, weighting=False)
    chunks = embeds["prompt_embeds"].shape[1] // 77
    assert chunks == 3
    assert f"{chunks} chunks" in note, note


# --------------------------------------------------------------------- negative prompts


def test_a_long_negative_with_a_long_prompt(engine: Engine, encoder: PromptEncoder) -> None:
    embeds, _ = encoder.encode({"prompt": LONG, "negative_prompt": LONG}, weighting=False)
    assert embeds["prompt_embeds"].shape == embeds["negative_prompt_embeds"].shape
    assert embeds["negative_prompt_embeds"].shape[1] == 154
    first = _run(engine, prompt=LONG, negative_prompt=words(120, late="dog"))
    second = _run(engine, prompt=LONG, negative_prompt=words(120, late="cat"))
    assert max_pixel_difference(first.images[0], second.images[0]) > 0  # not truncated
    assert len(_chunk_notes(first)) == 1


@pytest.mark.parametrize("weighting", [False, True])
def test_a_long_negative_with_a_short_prompt(
    engine: Engine, encoder: PromptEncoder, weighting: bool
) -> None:
    embeds, notes = encoder.encode({"prompt": PROMPT, "negative_prompt": LONG}, weighting=weighting)
    # The short one is padded to the long one's length with the encoding of "".
    assert embeds["prompt_embeds"].shape[1] == embeds["negative_prompt_embeds"].shape[1] == 154
    assert len(notes) == 1
    first = _run(engine, negative_prompt=LONG, prompt_weighting=weighting)
    second = _run(engine, negative_prompt=LONG_CHANGED, prompt_weighting=weighting)
    assert _latent_distance(first, second) > 0


# ---------------------------------------------------------------------------- batches


def _batch(engine: Engine, specs: list[JobSpec]) -> list[EngineResult]:
    assert len({batch_key_of(spec) for spec in specs}) == 1  # a batch the worker would form
    outcome = engine.run_batch(specs)
    assert not isinstance(outcome, Cancelled)
    return outcome


def _alone(engine: Engine, spec: JobSpec) -> EngineResult:
    outcome = engine.run(spec)
    assert isinstance(outcome, EngineResult)
    return outcome


@pytest.mark.parametrize("weighting", [False, True])
def test_a_long_and_a_short_prompt_in_a_batch_equal_each_alone(
    engine: Engine, weighting: bool
) -> None:
    specs = [
        _spec(prompt=LONG, seed=11, prompt_weighting=weighting),
        _spec(prompt="a red fox in snow", seed=12, prompt_weighting=weighting),
    ]
    results = _batch(engine, specs)
    for spec, result in zip(specs, results, strict=True):
        alone = _alone(engine, spec)
        assert max_pixel_difference(result.images[0], alone.images[0]) <= 2
        assert result.seeds == alone.seeds
    assert _chunk_notes(results[0]) and not _chunk_notes(results[1])


def test_a_batch_run_one_by_one_reports_progress_that_only_grows(engine: Engine) -> None:
    specs = [_spec(prompt=LONG, seed=11), _spec(prompt="a red fox in snow", seed=12)]
    seen: list[tuple[int, int]] = []
    outcome = engine.run_batch(specs, on_step=lambda step, total: seen.append((step, total)))
    assert not isinstance(outcome, Cancelled) and len(outcome) == 2
    steps = [step for step, _ in seen]
    assert steps == list(range(1, len(seen) + 1))  # counts on across the two jobs
    assert {total for _, total in seen} == {len(seen)}  # one total for the whole batch


@pytest.mark.parametrize(
    "prompts",
    [
        ["a (cat:1.4) on a mat", "a dog-- in the (snow:1.2)"],
        [LONG, LONG_CHANGED],  # equal lengths: one call, and the late words still count
    ],
    ids=["short-weighted", "two-long"],
)
def test_prompts_of_equal_length_share_a_call_and_equal_each_alone(
    engine: Engine, prompts: list[str]
) -> None:
    specs = [
        _spec(prompt=prompt, seed=20 + i, prompt_weighting=True) for i, prompt in enumerate(prompts)
    ]
    results = _batch(engine, specs)
    assert [r.batch_jobs for r in results] == [2, 2]
    for spec, result in zip(specs, results, strict=True):
        assert max_pixel_difference(result.images[0], _alone(engine, spec).images[0]) <= 2


# -------------------------------------------- what the encoder refuses, planning refuses


REFUSED_LATE = [
    pytest.param('("a cat", "a dog").and(1)', id="and-1-weight-for-2"),
    pytest.param('("a cat", "a dog").and(1, 0.5, 2)', id="and-3-weights-for-2"),
    pytest.param('("a cat", "a dog").blend(0.5, 0.5) extra', id="text-after-blend"),
]


@pytest.mark.parametrize("prompt", REFUSED_LATE)
def test_the_encoder_refuses_these_prompts(encoder: PromptEncoder, prompt: str) -> None:
    with pytest.raises(PromptSyntaxError):
        encoder.encode({"prompt": prompt, "negative_prompt": None}, weighting=True)


@pytest.mark.parametrize("prompt", REFUSED_LATE)
def test_the_syntax_check_refuses_what_the_encoder_refuses(prompt: str) -> None:
    with pytest.raises(PromptSyntaxError):
        check_weighting_syntax(prompt, "prompt")


def test_an_encoder_refusal_names_the_field_and_position(engine: Engine) -> None:
    negative = '("a", "b").blend(0.5, 0.5) extra'
    with pytest.raises(PromptSyntaxError) as caught:
        engine.run(_spec(negative_prompt=negative, prompt_weighting=True))
    assert caught.value.field == "negative_prompt"
    assert caught.value.position == negative.index("extra")


def test_a_prompt_of_only_lora_syntax_is_no_internal_error(engine: Engine) -> None:
    try:
        result = _run(engine, prompt="withLora(x, 0.5)", prompt_weighting=True)
    except InvalidJobError:
        return
    assert len(result.images) == 1
