"""Tiny, download-free stand-ins for production models, for tests and the CPU smoke test.

``build_tiny_t5`` writes a randomly initialised T5 encoder and a matching tokenizer into a
directory laid out exactly like a hub checkpoint, so the production code path
(``AutoTokenizer.from_pretrained(dir)`` / ``T5EncoderModel.from_pretrained(dir)``, the path
``google/t5-v1_1-xxl`` takes) runs offline with ``HF_HUB_OFFLINE=1``::

    python -m pipeline.dev.tinymodels /tmp/tiny-t5          # prints the directory

The tokenizer is :func:`imagen.tiny_tokenizer.build_tiny_tokenizer` (the planner measures token
lengths with it too). Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import sys

from imagen.tiny_tokenizer import build_tiny_tokenizer, default_corpus


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
