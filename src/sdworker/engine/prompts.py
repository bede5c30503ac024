"""Prompt encoding with compel: weighting syntax, and prompts past CLIP's 77 tokens in
chunks of 75 instead of diffusers' silent truncation.

A prompt with weighting off that fits one chunk is left to diffusers (its images stay
bit-identical to plain diffusers); everything else becomes prompt embeddings that are
equal to diffusers' own for the same plain text (penultimate hidden states of both
encoders, pooled output of the second).
"""

from __future__ import annotations

from typing import Any

import torch

from sdworker.prompt_syntax import PromptSyntaxError, to_compel

CHUNK_TOKENS = 75  # CLIP's 77 minus the begin and end tokens


def _as_list(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _plain_texts(node: Any) -> list[str]:
    """The literal text of a parsed compel prompt (weights and syntax removed)."""
    from compel.prompt_parser import CrossAttentionControlSubstitute, FlattenedPrompt, Fragment

    if isinstance(node, Fragment):
        return [node.text]
    if isinstance(node, CrossAttentionControlSubstitute):
        return [text for fragment in node.original for text in _plain_texts(fragment)]
    if isinstance(node, FlattenedPrompt):
        return [text for child in node.children for text in _plain_texts(child)]
    return []


class PromptEncoder:
    """Turns a call's prompt texts into embeddings for one SDXL pipeline (base: two text
    encoders; refiner: the second only)."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self._compels: list[Any] | None = None

    def _compel_list(self) -> list[Any]:
        if self._compels is None:
            from compel import Compel, ReturnedEmbeddingsType

            pairs = [
                (self._pipe.tokenizer, self._pipe.text_encoder),
                (self._pipe.tokenizer_2, self._pipe.text_encoder_2),
            ]
            self._compels = [
                Compel(
                    tokenizer=tokenizer,
                    text_encoder=encoder,
                    returned_embeddings_type=(
                        ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
                    ),
                    truncate_long_prompts=False,
                    # Pooled embeddings are computed below from the parsed text: compel's
                    # own pools the raw string, syntax included, and breaks on weighted .and().
                    requires_pooled=False,
                )
                for tokenizer, encoder in pairs
                if tokenizer is not None and encoder is not None
            ]
        return self._compels

    def token_count(self, text: str, *, weighting: bool, field: str = "prompt") -> int:
        """Tokens of what is encoded (begin/end tokens not counted; syntax not counted)."""
        tokenizer = self._pipe.tokenizer_2
        parts = [text]
        if weighting:
            conjunction = self._parse(text, field)
            parts = [" ".join(_plain_texts(p)) for p in self._flat_prompts(conjunction)]
        counts = [
            len(
                tokenizer(part, add_special_tokens=False, truncation=False, verbose=False)[
                    "input_ids"
                ]
            )
            for part in parts
        ]
        return max(counts, default=0)

    def encode(self, texts: dict[str, Any], *, weighting: bool) -> tuple[dict[str, Any], list[str]]:
        """Call arguments replacing `prompt`/`negative_prompt` (empty when diffusers' own
        encoding is exact), and notes for the job result."""
        prompts = _as_list(texts["prompt"]) or [""]
        negatives = _as_list(texts.get("negative_prompt"))
        longest = self._longest(prompts, negatives or [], weighting)
        if not weighting and longest <= CHUNK_TOKENS:
            return {}, []
        embeds = self._embeddings(prompts, negatives, weighting)
        notes = []
        if longest > CHUNK_TOKENS:
            # compel ends a chunk at a sentence end when it can: count what it made.
            chunks = embeds["prompt_embeds"].shape[1] // (CHUNK_TOKENS + 2)
            notes.append(
                f"prompt of {longest} tokens encoded in {chunks} chunks of up to "
                f"{CHUNK_TOKENS}, not truncated (the pooled embedding, by CLIP's design, sees "
                f"the first {CHUNK_TOKENS})"
            )
        return {"prompt": None, "negative_prompt": None, **embeds}, notes

    def _longest(self, prompts: list[str], negatives: list[str], weighting: bool) -> int:
        counts = [self.token_count(text, weighting=weighting) for text in prompts]
        counts += [
            self.token_count(text, weighting=weighting, field="negative_prompt")
            for text in negatives
        ]
        return max(counts, default=0)

    def sequence_length(self, texts: dict[str, Any], *, weighting: bool) -> int:
        """The embedding length a call's texts get (77 per chunk); batches of jobs whose
        lengths differ would pad the shorter ones and change their images."""
        prompts = _as_list(texts["prompt"]) or [""]
        negatives = _as_list(texts.get("negative_prompt")) or []
        if not weighting and self._longest(prompts, negatives, weighting) <= CHUNK_TOKENS:
            return CHUNK_TOKENS + 2
        return int(
            self._embeddings(prompts, negatives or None, weighting)["prompt_embeds"].shape[1]
        )

    @staticmethod
    def _parse(text: str, field: str) -> Any:
        from compel.prompt_parser import PromptParser

        translated = to_compel(text)
        try:
            return PromptParser().parse_conjunction(translated)
        except Exception as exc:  # pyparsing and compel errors: the check in planning missed it
            # pyparsing's position holds only where the A1111 rewrite changed nothing.
            position = getattr(exc, "loc", 0) if translated == text else 0
            raise PromptSyntaxError(field, position, f"cannot parse it ({exc})", text) from exc

    @staticmethod
    def _flat_prompts(conjunction: Any) -> list[Any]:
        from compel.prompt_parser import Blend

        flat: list[Any] = []
        for prompt in conjunction.prompts:
            flat.extend(prompt.prompts if isinstance(prompt, Blend) else [prompt])
        return flat

    def _pooled(self, provider: Any, conjunction: Any, device: torch.device) -> torch.Tensor:
        """Pooled embedding of the parsed text: a blend blends the pooled embeddings."""
        from compel.prompt_parser import Blend

        if len(conjunction.prompts) == 1 and isinstance(conjunction.prompts[0], Blend):
            blend = conjunction.prompts[0]
            each = torch.cat(
                [
                    provider.get_pooled_embeddings([" ".join(_plain_texts(p))], device=device)
                    for p in blend.prompts
                ]
            )
            weights = torch.tensor(blend.weights, dtype=each.dtype, device=each.device)
            if blend.normalize_weights:
                weights = weights / weights.sum()
            return (each * weights[:, None]).sum(0, keepdim=True)
        texts = [t for p in self._flat_prompts(conjunction) for t in _plain_texts(p) if t]
        pooled: torch.Tensor = provider.get_pooled_embeddings([" ".join(texts)], device=device)
        return pooled

    @torch.no_grad()
    def _embeddings(
        self, prompts: list[str], negatives: list[str] | None, weighting: bool
    ) -> dict[str, torch.Tensor]:
        compels = self._compel_list()
        providers = [compel.conditioning_provider for compel in compels]
        pooled_provider = providers[-1]  # SDXL pools the second encoder's output
        device = pooled_provider.text_encoder.device
        if negatives is not None and len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        zero_negative = negatives is None and bool(
            getattr(self._pipe.config, "force_zeros_for_empty_prompt", False)
        )
        texts = [*prompts, *(negatives if negatives is not None else [""] * len(prompts))]
        if zero_negative:
            texts = list(prompts)
        per_encoder: list[list[torch.Tensor]] = [[] for _ in compels]
        pooled: list[torch.Tensor] = []
        for row, text in enumerate(texts):
            if weighting:
                conjunction = self._parse(
                    text, "prompt" if row < len(prompts) else "negative_prompt"
                )
                for index, compel in enumerate(compels):
                    cond, _ = compel.build_conditioning_tensor_for_conjunction(conjunction)
                    per_encoder[index].append(cond if cond.dim() == 3 else cond.unsqueeze(0))
                pooled.append(self._pooled(pooled_provider, conjunction, device))
            else:
                # One fragment of weight 1: chunked, with parentheses kept as literal text.
                for index, provider in enumerate(providers):
                    per_encoder[index].append(
                        provider.get_embeddings_for_weighted_prompt_fragments(
                            text_batch=[[text]], fragment_weights_batch=[[1.0]], device=device
                        )
                    )
                pooled.append(pooled_provider.get_pooled_embeddings([text], device=device))
        length = max(t.shape[1] for rows in per_encoder for t in rows)
        padded = [
            torch.cat([_pad(t, length, provider.empty_z) for t in rows])
            for provider, rows in zip(providers, per_encoder, strict=True)
        ]
        embeds = torch.cat(padded, dim=-1)
        pooled_all = torch.cat(pooled)
        count = len(prompts)
        out = {"prompt_embeds": embeds[:count], "pooled_prompt_embeds": pooled_all[:count]}
        if zero_negative:  # diffusers' SDXL default for a missing negative prompt
            out["negative_prompt_embeds"] = torch.zeros_like(out["prompt_embeds"])
            out["negative_pooled_prompt_embeds"] = torch.zeros_like(out["pooled_prompt_embeds"])
        else:
            out["negative_prompt_embeds"] = embeds[count:]
            out["negative_pooled_prompt_embeds"] = pooled_all[count:]
        return out


def _pad(cond: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """Pad to `length` tokens with the encoding of "" (compel's own padding)."""
    missing = length - cond.shape[1]
    if missing == 0:
        return cond
    chunk = empty.shape[1]
    filler = empty.to(cond).repeat(cond.shape[0], missing // chunk, 1)
    return torch.cat([cond, filler], dim=1)


class PlainPrompts:
    """Prompt handling of the families without compel support here (SD 1.x/2.x, SD3,
    Wan): the pipeline encodes the text itself. CLIP-only families read the first 77
    tokens; a longer prompt gets a note instead of silent truncation."""

    def __init__(self, pipe: Any, family: str) -> None:
        self._pipe = pipe
        self._family = family

    def encode(self, texts: dict[str, Any], *, weighting: bool) -> tuple[dict[str, Any], list[str]]:
        tokenizer = getattr(self._pipe, "tokenizer", None)
        if self._family not in ("sd15", "sd21") or tokenizer is None:
            return {}, []  # SD3 and Wan read long prompts with their T5/UMT5 encoder
        texts_in = [
            *(_as_list(texts["prompt"]) or []),
            *(_as_list(texts.get("negative_prompt")) or []),
        ]
        longest = max(
            (
                len(
                    tokenizer(t, add_special_tokens=False, truncation=False, verbose=False)[
                        "input_ids"
                    ]
                )
                for t in texts_in
            ),
            default=0,
        )
        if longest <= CHUNK_TOKENS:
            return {}, []
        return {}, [
            f"prompt of {longest} tokens: {self._family} models read the first {CHUNK_TOKENS} "
            "(chunked long prompts are SDXL-only)"
        ]

    def sequence_length(self, texts: dict[str, Any], *, weighting: bool) -> int:
        return CHUNK_TOKENS + 2  # always padded to one length: batching is safe
