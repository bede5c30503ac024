"""Prompt weighting syntax without torch: the A1111 -> compel rewrite, the syntax check
(field and 1-based character position), the check in plan_generation, and the 422 of the
in-process API for a malformed weighted prompt."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sdworker.errors import InvalidJobError
from sdworker.families import SDXL
from sdworker.jobs import JobSpec
from sdworker.planning import GenerationPlan, plan_generation
from sdworker.prompt_syntax import PromptSyntaxError, check_weighting_syntax, to_compel

# ----------------------------------------------------------------------------- to_compel


@pytest.mark.parametrize(
    ("a1111", "compel"),
    [
        ("a (cat:1.3) on a mat", "a (cat)1.3 on a mat"),
        ("(cat:1.5)", "(cat)1.5"),
        ("(red cat:0.7) and (dog:2)", "(red cat)0.7 and (dog)2"),
        ("(cat: 1.5 )", "(cat)1.5"),  # spaces around the number
        ("(cat:.5)", "(cat)0.5"),
        ("(cat:1.30)", "(cat)1.3"),  # the number is normalised by float() and :g
        ("(cat:-1)", "(cat)-1"),
        ("((a:1.2) b:0.5)", "((a)1.2 b)0.5"),  # nested: inner group first, then outer
        ("a ((cat:1.2):1.3)", "a ((cat)1.2)1.3"),
        ("(a)(b:2)", "(a)(b)2"),  # a group without a weight stays
        # compel's own syntax passes through untouched
        ("a (cat)1.3 on a mat", "a (cat)1.3 on a mat"),
        ("a cat++ on a mat--", "a cat++ on a mat--"),
        ('("a cat", "a dog").blend(0.5, 0.5)', '("a cat", "a dog").blend(0.5, 0.5)'),
        # not weights: left as they are
        ("ratio 16:9", "ratio 16:9"),  # a colon outside parentheses
        ("(c:d)", "(c:d)"),  # non-numeric after the colon
        ("(time 12:30 pm)", "(time 12:30 pm)"),  # the number is not at the end
        ("a \\(cat:1.3\\)", "a \\(cat:1.3\\)"),  # escaped parentheses are literal
        ("a (cat:1.3", "a (cat:1.3"),  # unbalanced: left alone
        ("a cat:1.3)", "a cat:1.3)"),
        ("", ""),
    ],
)
def test_to_compel_rewrites_only_balanced_numeric_groups(a1111: str, compel: str) -> None:
    assert to_compel(a1111) == compel


def test_to_compel_keeps_escapes_inside_a_weighted_group() -> None:
    assert to_compel("(a \\(big\\) cat:1.2)") == "(a \\(big\\) cat)1.2"


# --------------------------------------------------------------- check_weighting_syntax


def _error(text: str, field: str = "prompt") -> PromptSyntaxError:
    with pytest.raises(PromptSyntaxError) as caught:
        check_weighting_syntax(text, field)
    return caught.value


@pytest.mark.parametrize(
    ("text", "position", "words"),
    [
        ("a (cat:1.3", 2, ["never closed"]),  # the unclosed "("
        ("a cat)", 5, ["without a matching"]),  # the stray ")"
        ("(a) (b", 4, ["never closed"]),
        ("((a:1.2)", 0, ["never closed"]),  # the outer "(" is the unclosed one
        ('("a", "b").blend(0.5)', 10, ["1 weight(s) for 2 prompt(s)"]),  # the ".blend"
        ('("a", "b", "c").blend(1, 1)', 15, ["2 weight(s) for 3 prompt(s)"]),
        ('("a", "b").blend()', 10, ["0 weight(s) for 2 prompt(s)"]),
        ('("a", "b").blend(x, 1)', 17, ["'x' is not a number"]),  # the "x"
        ('("a","b").and(foo)', 14, ["'foo' is not a number"]),
        ("a cat.and()", 5, ['must follow a ("...", "...") group']),
    ],
)
def test_syntax_errors_name_the_field_and_the_offending_character(
    text: str, position: int, words: list[str]
) -> None:
    error = _error(text, "negative_prompt")
    assert isinstance(error, InvalidJobError)
    assert error.field == "negative_prompt"
    assert error.position == position
    assert error.message.startswith("negative_prompt: ")
    assert f"at character {position + 1} " in error.message  # 1-based for people
    for word in words:
        assert word in error.message, error.message


def test_a_bad_second_weight_points_at_the_weight_not_the_space_before_it() -> None:
    text = '("a", "b").blend(1, x)'
    assert text[20] == "x"
    assert _error(text).position == 20


def test_a_lone_quote_does_not_hide_an_unclosed_parenthesis() -> None:
    text = 'a 12" pizza, (cheesy:1.3'
    assert _error(text).position == text.index("(")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a cat on a mat",
        "a (cat:1.3) on a mat",
        "a (cat)1.3 on a mat, cat++ dog--",
        "((a:1.2) b:0.5)",
        "a \\(cat\\) on a mat",  # escaped parentheses need no partner
        "a \\(cat",
        "a cat\\)",
        "ratio 16:9, (c:d)",
        '("a cat", "a dog").blend(0.5, 0.5)',
        '("a cat", "a dog").blend(1, 1, no_normalize)',
        '("a (b", "c").blend(1, 1)',  # parentheses inside quotes are text
        '("a cat", "a dog").and()',
        '("a cat", "a dog").and(1, 0.5)',
        "cat.swap(dog)",
    ],
)
def test_valid_prompts_pass(text: str) -> None:
    check_weighting_syntax(text, "prompt")


def test_the_excerpt_in_the_message_shows_the_mistake() -> None:
    text = "a beautiful landscape, mountains, (sunset:1.2, lake"
    error = _error(text)
    assert error.position == text.index("(sunset")
    assert "(sunset" in error.message


# ------------------------------------------------------------------- plan_generation


def _plan(**fields: Any) -> GenerationPlan:
    spec = JobSpec(**({"size": "64x64", "steps": 2} | fields))
    return plan_generation(spec, SDXL, max_num_images=4)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": "a (cat:1.3", "prompt_weighting": True}, "prompt"),
        ({"prompt": "a (cat:1.3", "compel_enabled": True}, "prompt"),
        (
            {"prompt": "a cat", "negative_prompt": "blurry)", "prompt_weighting": True},
            "negative_prompt",
        ),
        ({"prompt": "a cat", "compel_weights": "(detailed:1.2"}, "compel_weights"),
        ({"prompt": '("a", "b").blend(0.5)', "prompt_weighting": True}, "prompt"),
    ],
)
def test_plan_refuses_bad_syntax_when_weighting_is_on(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidJobError) as caught:
        _plan(**fields)
    assert caught.value.field == field
    assert caught.value.message.startswith(f"{field}: ")
    assert "character" in caught.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "a (cat:1.3"},
        {"prompt": "a cat)", "negative_prompt": "blurry (("},
        {"prompt": '("a", "b").blend(0.5)'},
        {"prompt": "a (cat:1.3", "compel_enabled": False},
    ],
)
def test_plan_accepts_any_parentheses_when_weighting_is_off(fields: dict[str, Any]) -> None:
    plan = _plan(**fields)
    assert plan.prompt_weighting is False
    assert plan.prompt == fields["prompt"]  # literal text, unchanged


def test_compel_weights_are_appended_and_turn_weighting_on() -> None:
    plan = _plan(prompt="a cat", compel_weights=" (detailed:1.2) ")
    assert plan.prompt_weighting is True
    assert plan.prompt == "a cat, (detailed:1.2)"
    assert _plan(prompt="", compel_weights="(detailed:1.2)").prompt == "(detailed:1.2)"


# --------------------------------------------------------------------------- the API


@pytest.fixture
def client(tmp_path: Path, cache_dir: Path) -> Iterator[TestClient]:
    from sdworker.api.app import create_app
    from sdworker.settings import Settings

    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        cache_dir=cache_dir,
        model="tiny-sdxl",
        device="cpu",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


TINY = {"size": "64x64", "steps": 2}


def test_api_refuses_a_malformed_weighted_prompt_with_a_422(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs", json={**TINY, "prompt": "a (cat:1.3", "prompt_weighting": True}
    )
    assert response.status_code == 422, response.text
    body = response.json()
    [entry] = body["detail"]
    assert entry["loc"] == ["body", "prompt"]
    assert entry["msg"].startswith("prompt: ")
    assert "character 3" in entry["msg"]
    assert body["error"]["code"] == "invalid_request"
    assert client.get("/v1/jobs").json()["jobs"] == []  # nothing was queued


def test_api_accepts_the_same_prompt_with_weighting_off(client: TestClient) -> None:
    response = client.post("/v1/jobs", json={**TINY, "prompt": "a (cat:1.3"})
    assert response.status_code == 202, response.text
