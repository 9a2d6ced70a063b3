"""A tiny, download-free T5 tokenizer: the tokenizer of the tiny text encoder.

``pipeline.dev.tinymodels.build_tiny_t5`` saves it beside a random tiny T5 encoder, and the
planner (``imagen-pipeline plan --encoder tiny``) measures caption token lengths with it, so it
lives below both (the planner never imports the dev tools)::

    from imagen.tiny_tokenizer import build_tiny_tokenizer
    ids = build_tiny_tokenizer()(["a red circle"], truncation=True, max_length=128)["input_ids"]

The tokenizer is a unigram model (T5's tokenizer type) counted from a small corpus and
handed to ``T5Tokenizer(vocab=[(piece, score), ...])``, the ``tokenizers``-backed class:
in transformers 5 ``T5TokenizerFast(vocab_file=...)`` silently ignores the file (a vocab of
4 where every token is unknown). Deterministic in the corpus; transformers is imported only
when a tokenizer is built.
"""

from __future__ import annotations

import math
import string
from collections import Counter

# Colour/shape captions match the synthetic tiny dataset; the general English words give
# real captions (and prompts typed at a smoke test) word pieces instead of single letters
# (the embedding and loader benches draw their synthetic captions from them too).
_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "white", "black")
_SHAPES = ("circle", "square", "triangle", "star", "rectangle", "dot", "line")
ENGLISH_WORDS = (
    "a photo of the cat dog person man woman child car house tree street city beach sea "
    "mountain sky sun flower field room table chair food plate water bird horse bicycle "
    "painting drawing picture image close up view with and in at by near under over small "
    "large big little old new young beautiful happy sitting standing walking running "
    "holding looking next to front back top bottom left right light dark bright night day "
    "an is are two three many some very this that it its on of for from into centered plain "
    "simple"
)


def default_corpus() -> list[str]:
    """Captions used to train the tiny tokenizer when none are given."""
    corpus = [
        f"a {colour} {shape} on a {bg} background"
        for colour in _COLOURS
        for shape in _SHAPES
        for bg in ("white", "black", "light gray")
    ]
    words = ENGLISH_WORDS.split()
    # Sentences of 8 words so SentencePiece sees the words in context, not as one line.
    corpus += [" ".join(words[i : i + 8]) for i in range(0, len(words), 8)]
    return corpus


def unigram_vocab(corpus: list[str], vocab_size: int) -> list[tuple[str, float]]:
    """A unigram vocabulary (piece, log-probability) counted from ``corpus``.

    Whole words become pieces scored by their log frequency; every printable ASCII
    character is a fallback piece scored far below any word, so the Viterbi split picks
    whole words when it can and spells anything else. (SentencePiece's unigram trainer on
    a corpus this small prunes to near character level: "red" -> "re", "d".)
    """
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # T5 ids 0, 1, 2
    chars = ["\u2581", *(c for c in string.printable if not c.isspace())]
    budget = vocab_size - len(specials) - len(chars)
    if budget < 1:
        raise ValueError(f"vocab_size must be > {len(specials) + len(chars)}, got {vocab_size}")
    counts = Counter("\u2581" + word for line in corpus for word in line.split())
    total = sum(counts.values()) or 1
    words = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:budget]
    floor = math.log(1 / total) - 10.0  # below every word: letters only as a fallback
    pieces = [(w, math.log(n / total)) for w, n in words]
    pieces += [(c, floor) for c in chars if c not in dict(pieces)]
    return specials + pieces


def build_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 256):
    """A T5 tokenizer (pad=0, eos=1, unk=2) built from ``corpus``; needs no download."""
    from transformers import T5Tokenizer

    vocab = unigram_vocab(list(corpus or default_corpus()), vocab_size)
    # extra_ids=0: sentinel tokens are for span corruption, which an encoder never sees.
    return T5Tokenizer(vocab=vocab, extra_ids=0)
