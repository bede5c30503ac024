"""Prompt weighting syntax: the AUTOMATIC1111 form `(word:1.3)` translated to compel's
`(word)1.3`, and a syntax check that points at the position of a mistake.

Written by hand because compel's own parser is lenient by design: an unclosed `(` or a
blend with a wrong number of weights silently becomes literal text, so a user would
get an unweighted image and no error. No torch here: the API checks prompts too.
"""

from __future__ import annotations

import re

from sdworker.errors import InvalidJobError

_A1111_WEIGHT = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$")
_CALL = re.compile(r"\.(blend|and|add)\(")
_WITH_LORA = re.compile(r"\bwithLora\(", re.IGNORECASE)
_NUMBER = re.compile(r"^\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*$")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def to_compel(text: str) -> str:
    """Rewrite every balanced `(... :number)` group as `(...)number` (nesting works);
    escaped parentheses `\\(` `\\)` and unbalanced ones stay as they are."""
    out: list[str] = []
    opened: list[int] = []  # indexes in `out` of the unclosed "("
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            out.append(text[index : index + 2])
            index += 2
            continue
        if char == "(":
            opened.append(len(out))
            out.append("(")
        elif char == ")" and opened:
            start = opened.pop()
            inner = "".join(out[start + 1 :])
            match = _A1111_WEIGHT.search(inner)
            if match:
                del out[start:]
                out.append(f"({inner[: match.start()]}){float(match.group(1)):g}")
            else:
                out.append(")")
        else:
            out.append(char)
        index += 1
    return "".join(out)


class PromptSyntaxError(InvalidJobError):
    """A weighting mistake in a prompt, with its 0-based character position."""

    def __init__(self, field: str, position: int, message: str, text: str) -> None:
        excerpt = text[max(0, position - 12) : position + 12]
        super().__init__(
            f"{field}: {message} at character {position + 1} (near {excerpt!r})", field=field
        )
        self.position = position


def _pairs(text: str, field: str, *, quotes: bool = True) -> dict[int, int]:
    """Matching parentheses (open index -> close index); errors at the first unmatched.
    Parentheses inside "quoted" prompts of a blend are text; a lone quote (an inch
    mark: `a 12" pizza`) is text too, so then quotes are not treated as strings."""
    pairs: dict[int, int] = {}
    opened: list[int] = []
    in_quote = False
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"' and quotes:
            in_quote = not in_quote
        elif char == "(" and not in_quote:
            opened.append(index)
        elif char == ")" and not in_quote:
            if not opened:
                raise PromptSyntaxError(field, index, "')' without a matching '('", text)
            pairs[opened.pop()] = index
        index += 1
    if in_quote:
        return _pairs(text, field, quotes=False)
    if opened:
        raise PromptSyntaxError(field, opened[-1], "'(' is never closed", text)
    return pairs


def _check_call(text: str, field: str, match: re.Match[str], pairs: dict[int, int]) -> None:
    """`("a", "b").blend(0.7, 0.3)`: numeric weights, one per prompt of the tuple."""
    open_at = match.end() - 1
    arguments = text[open_at + 1 : pairs[open_at]]
    weights = [part for part in arguments.split(",") if part.strip()]
    if match.group(1) == "blend" and weights and weights[-1].strip() == "no_normalize":
        weights = weights[:-1]
    offset = open_at + 1
    for part in arguments.split(","):
        if part.strip() and part.strip() != "no_normalize" and not _NUMBER.match(part):
            where = offset + len(part) - len(part.lstrip())
            raise PromptSyntaxError(field, where, f"weight {part.strip()!r} is not a number", text)
        offset += len(part) + 1
    tuple_close = match.start() - 1
    tuple_open = next((o for o, c in pairs.items() if c == tuple_close), None)
    if tuple_open is None:
        raise PromptSyntaxError(
            field, match.start(), f'.{match.group(1)}() must follow a ("...", "...") group', text
        )
    prompts = len(_QUOTED.findall(text[tuple_open:tuple_close]))
    # .blend() needs a weight per prompt; .and() takes none or one per prompt.
    if prompts and len(weights) != prompts and (match.group(1) == "blend" or weights):
        raise PromptSyntaxError(
            field,
            match.start(),
            f".{match.group(1)}() has {len(weights)} weight(s) for {prompts} prompt(s)",
            text,
        )
    after = pairs[open_at] + 1
    if tuple_open == 0 and text[after:].strip():
        # compel reads a whole-prompt blend/and or nothing: trailing text would be lost.
        trailing = after + len(text[after:]) - len(text[after:].lstrip())
        raise PromptSyntaxError(
            field, trailing, f"text after .{match.group(1)}() is not allowed", text
        )


def check_weighting_syntax(text: str, field: str) -> None:
    """Raise PromptSyntaxError (a 422 naming the field and position) for unbalanced
    parentheses and malformed .blend()/.and() calls."""
    pairs = _pairs(text, field)
    lora = _WITH_LORA.search(text)
    if lora:
        raise PromptSyntaxError(
            field, lora.start(), "withLora() is not supported; use the loras field", text
        )
    for match in _CALL.finditer(text):
        _check_call(text, field, match, pairs)
