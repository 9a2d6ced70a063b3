"""Tiny, download-free stand-ins for production models, for tests and the CPU smoke test.

``build_tiny_t5`` writes a randomly initialised T5 encoder and a matching tokenizer into a
directory laid out exactly like a hub checkpoint, so the production code path
(``AutoTokenizer.from_pretrained(dir)`` / ``T5EncoderModel.from_pretrained(dir)``, the path
``google/t5-v1_1-xxl`` takes) runs offline with ``HF_HUB_OFFLINE=1``::

    python -m pipeline.dev.tinymodels /tmp/tiny-t5          # prints the directory

The tokenizer is a unigram model (T5's tokenizer type) counted from a small corpus and
handed to ``T5Tokenizer(vocab=[(piece, score), ...])``, the ``tokenizers``-backed class:
in transformers 5 ``T5TokenizerFast(vocab_file=...)`` silently ignores the file (a vocab of
4 where every token is unknown). Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import math
import string
import sys
from collections import Counter

# Colour/shape captions match the synthetic tiny dataset; the general English words give
# real captions (and prompts typed at a smoke test) word pieces instead of single letters.
_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "white", "black")
_SHAPES = ("circle", "square", "triangle", "star", "rectangle", "dot", "line")
_ENGLISH = (
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
    words = _ENGLISH.split()
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


def build_tiny_t5(
    output_dir: str,
    captions: list[str] | None = None,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    vocab_size: int = 256,
    seed: int = 0,
    d_ff: int | None = None,
) -> str:
    """Save a random tiny T5 encoder + tokenizer into ``output_dir`` and return the path.

    Args:
        output_dir: directory to create (local path); loadable with ``from_pretrained``.
        captions: tokenizer training corpus, added to the default colour/shape/English
            corpus (so the tokenizer covers the dataset it will embed).
        d_model: hidden width; this is the embedding dim ``D`` the U-Net cross-attends to.
        num_layers: encoder blocks.
        num_heads: attention heads (``d_kv = d_model // num_heads``).
        vocab_size: tokenizer size cap (98 character/special pieces plus the most frequent
            words); the model's embedding table is sized to the tokenizer actually built.
        seed: seeds the weights; the tokenizer is deterministic in the corpus alone.
        d_ff: feed-forward width (default ``2 * d_model``); T5-small-sized benchmarks use
            ``d_model=512, num_layers=6, num_heads=8, d_ff=2048``.
    """
    import torch
    from transformers import T5Config, T5EncoderModel

    if d_model % num_heads:
        raise ValueError(f"d_model {d_model} must be divisible by num_heads {num_heads}")
    tokenizer = build_tiny_tokenizer(default_corpus() + list(captions or []), vocab_size)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff or 2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",  # T5 v1.1, like google/t5-v1_1-xxl
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m pipeline.dev.tinymodels OUTPUT_DIR")
    print(build_tiny_t5(args[0]))


if __name__ == "__main__":
    main()
