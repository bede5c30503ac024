"""Tokenizers of the tiny models, made on this machine: nothing to download.

CLIP's BPE files are shipped (configs/clip-tokenizer). T5 and UMT5 use SentencePiece
Unigram vocabularies of 32k and 256k pieces that cannot be shipped or fetched here, so
the tiny ones get a small hand-written Unigram vocabulary with T5's layout instead:
``<pad>``=0, ``</s>``=1, ``<unk>``=2, the pieces, then ``<extra_id_N>`` sentinels in reverse
order at the end. It is built from constants, so the ids are the same on every machine,
and a folder saved from it reloads with ``from_pretrained`` like any T5 tokenizer.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

CLIP_TOKENIZER_DIR = Path(__file__).parent / "configs" / "clip-tokenizer"

T5_PAD_ID = 0
T5_EOS_ID = 1
T5_UNK_ID = 2
_EXTRA_IDS = 100

# Words that prompts of tests and demos use, so they encode as one piece each. Any other
# ASCII text still encodes (as shorter pieces down to single characters); the rest is <unk>.
_WORD_TEXT = """
a an the of and or in on at by for to from with without into over under near above is are
no not very more less best high low new old big small large tiny little photo photograph
picture image painting drawing sketch render illustration portrait landscape still life
close up view shot scene style art artwork digital oil watercolor anime cartoon cinematic
realistic detailed quality masterpiece sharp focus blurry lighting light dark night day
morning evening sunset sunrise sun moon sky star stars cloud clouds rain snow fog storm
water sea ocean lake river beach mountain mountains forest tree trees flower flowers grass
field garden park city street road house building castle room window door table chair bed
car bike boat ship train plane man woman person people child girl boy face eyes hair hand
hands smile cat cats dog dogs bird birds horse fish lion tiger bear fox wolf rabbit monkey
astronaut robot dragon knight king queen wizard riding running walking sitting standing
flying dancing eating playing holding wearing looking red orange yellow green blue purple
pink brown black white gray grey gold silver color colors colorful bright warm cold soft
golden glowing neon vintage modern ugly bad worst deformed distorted lowres watermark text
logo signature cropped frame frames video motion camera slow fast moving
"""
_WORDS = _WORD_TEXT.split()
_SUFFIXES = ("s", "es", "ed", "ing", "er", "est", "ly", "y", "'s")


def _t5_pieces() -> list[tuple[str, float]]:
    """T5's vocabulary layout with a tiny, fixed set of pieces.

    Unigram picks the segmentation with the highest total score, so whole words (-6)
    beat a word plus suffix (-13), which beats spelling letter by letter (-9 each).
    """
    scores: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -4.0}
    # setdefault: a piece met twice ("▁a" is a word and a letter) keeps its first score.
    for word in _WORDS:
        scores.setdefault(f"▁{word}", -6.0)
    for suffix in _SUFFIXES:
        scores.setdefault(suffix, -7.0)
    for char in string.ascii_letters + string.digits:
        scores.setdefault(f"▁{char}", -8.0)
    for char in string.ascii_letters + string.digits + string.punctuation:
        scores.setdefault(char, -9.0)
    for i in reversed(range(_EXTRA_IDS)):
        scores[f"<extra_id_{i}>"] = 0.0
    return list(scores.items())


def _t5_backend() -> Any:
    """A `tokenizers` pipeline equal to the one transformers' T5 tokenizer builds.

    It must be equal: transformers 5 rebuilds the pipeline from the saved vocabulary when
    a folder is reloaded, and the in-memory and reloaded tokenizers must give the same ids.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    backend = Tokenizer(Unigram(_t5_pieces(), unk_id=T5_UNK_ID, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"],
        pair=["$A", "</s>", "$B", "</s>"],
        special_tokens=[("</s>", T5_EOS_ID)],
    )
    return backend


def _t5_like(model_max_length: int) -> Any:
    from transformers import T5TokenizerFast

    return T5TokenizerFast(
        tokenizer_object=_t5_backend(),
        extra_ids=_EXTRA_IDS,
        model_max_length=model_max_length,
    )


def t5_tokenizer() -> Any:
    """The tiny SD3's third tokenizer (T5 v1.1's layout; SD3 encodes up to 256 tokens)."""
    return _t5_like(model_max_length=256)


def umt5_tokenizer() -> Any:
    """The tiny Wan's tokenizer: UMT5's is a T5 tokenizer with a bigger vocabulary and
    pad id 0, so the tiny one shares the T5 pieces (Wan encodes up to 512 tokens)."""
    return _t5_like(model_max_length=512)


def clip_tokenizers() -> tuple[Any, Any]:
    """SDXL's two CLIP tokenizers from the shipped BPE files (they differ only in padding)."""
    from transformers import CLIPTokenizer

    first = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))
    second = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), pad_token="!")
    return first, second
