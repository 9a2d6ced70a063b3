"""Tiny T5 build/reload (pipeline.dev.tinymodels), the frozen encoder, the one encoder identity
rule and the one way to open an encoder (imagen.text).

HF_HUB_OFFLINE=1 python -m pytest tests/unit/test_text.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from imagen.text import (
    T5TextEncoder,
    TextEncoder,
    open_encoder,
    same_encoder,
    same_recorded_encoder,
)
from pipeline.dev.tinymodels import build_tiny_t5

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CAPTIONS = [
    "a red circle on a white background",
    "a blue square on a black background",
    "a photo of a dog on the beach",
]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> str:
    return build_tiny_t5(str(tmp_path_factory.mktemp("t5") / "tiny-t5"))


@pytest.fixture(scope="module")
def encoder(t5_dir) -> T5TextEncoder:
    return T5TextEncoder(t5_dir, max_length=32, device="cpu").load()


def test_tiny_t5_reloads_offline_with_t5_layout(t5_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    names = set(os.listdir(t5_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    tok = AutoTokenizer.from_pretrained(t5_dir)
    model = T5EncoderModel.from_pretrained(t5_dir)
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 1)
    assert model.config.d_model == 32 and model.config.num_layers == 2
    assert model.config.vocab_size == len(tok)
    ids = tok(CAPTIONS).input_ids
    assert all(seq[-1] == 1 for seq in ids)  # T5 appends </s>
    assert len({tuple(seq) for seq in ids}) == len(CAPTIONS)
    # Real word pieces, not a vocab of 4 where everything is <unk> (the v5 vocab_file trap).
    assert len(tok) > 100
    assert tok.unk_token_id not in ids[0]
    assert tok.decode(ids[0], skip_special_tokens=True) == CAPTIONS[0]
    assert len(ids[0]) == 8  # known words are one piece each, plus </s>
    unseen = tok("Zebra-42!").input_ids  # spelled from character pieces, never <unk>
    assert unseen[-1] == 1 and tok.unk_token_id not in unseen


def test_tiny_t5_is_deterministic(tmp_path, t5_dir):
    again = build_tiny_t5(str(tmp_path / "again"))
    other = build_tiny_t5(str(tmp_path / "other"), seed=1)
    read = Path.read_bytes
    for name in ("tokenizer.json", "model.safetensors"):
        assert read(Path(again) / name) == read(Path(t5_dir) / name), name
    assert read(Path(other) / "model.safetensors") != read(Path(t5_dir) / "model.safetensors")
    assert json.loads(read(Path(other) / "tokenizer.json")) == json.loads(
        read(Path(t5_dir) / "tokenizer.json")
    )


def test_encode_shapes_mask_and_padding(encoder):
    emb, mask = encoder.encode(CAPTIONS)
    lengths = encoder.token_lengths(CAPTIONS)
    assert emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert emb.shape == (3, max(lengths), 32) and mask.shape == (3, max(lengths))
    assert mask.sum(1).tolist() == lengths
    assert not emb[~mask].any()  # padded positions are zeroed
    assert emb[mask].abs().mean() > 0.1
    assert isinstance(encoder, TextEncoder) and encoder.dim == 32


def test_different_captions_different_embeddings(encoder):
    emb, mask = encoder.encode(CAPTIONS[:2])
    n = int(mask.sum(1).min())
    assert (emb[0, :n] - emb[1, :n]).abs().max() > 1e-2


def test_padding_does_not_change_embeddings(encoder):
    alone, mask_alone = encoder.encode(["a dog"])
    batched, mask = encoder.encode(["a dog", CAPTIONS[2]])
    n = int(mask_alone.sum())
    assert int(mask[0].sum()) == n and batched.shape[1] > n
    torch.testing.assert_close(batched[0, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_truncation_and_frozen_weights(t5_dir, encoder):
    short = T5TextEncoder(t5_dir, max_length=4, device="cpu")
    emb, mask = short.encode([CAPTIONS[0]])
    assert emb.shape == (1, 4, 32) and mask.all()
    assert not any(p.requires_grad for p in encoder._model.parameters())
    assert not encoder._model.training
    # Outputs are ordinary tensors: a trainable layer on top can backpropagate.
    layer = torch.nn.Linear(32, 1)
    emb, _ = encoder.encode(CAPTIONS[:1])
    layer(emb).sum().backward()
    assert layer.weight.grad is not None


def test_encoder_id_tracks_weights_not_location(tmp_path, t5_dir):
    same = build_tiny_t5(str(tmp_path / "a" / "tiny-t5"))
    changed = build_tiny_t5(str(tmp_path / "b" / "tiny-t5"), seed=7)
    ref = T5TextEncoder(t5_dir).encoder_id
    assert ref.startswith("tiny-t5@sha256:") and len(ref.split(":")[-1]) == 16
    assert T5TextEncoder(same).encoder_id == ref
    assert T5TextEncoder(changed).encoder_id != ref
    assert (
        T5TextEncoder("google/t5-v1_1-xxl", revision="abc").encoder_id == "google/t5-v1_1-xxl@abc"
    )


def test_registry_builds_t5(t5_dir):
    assert isinstance(open_encoder(f"t5:{t5_dir}"), T5TextEncoder)
    assert open_encoder(t5_dir, max_length=8).max_length == 8


def test_encode_ids_is_encode_without_retokenizing(encoder):
    ids = encoder.token_ids(CAPTIONS)
    assert [len(x) for x in ids] == encoder.token_lengths(CAPTIONS)
    assert all(x[-1] == 1 for x in ids)  # </s>
    hidden, mask = encoder.encode_ids(ids)
    emb, mask_text = encoder.encode(CAPTIONS)
    assert torch.equal(mask, mask_text) and mask.sum(1).tolist() == [len(x) for x in ids]
    torch.testing.assert_close(hidden[mask], emb[mask_text], rtol=0, atol=0)
    for bad in ([], [[1], []]):
        with pytest.raises(ValueError, match="at least one caption"):
            encoder.encode_ids(bad)


HUB = "google/t5-v1_1-xxl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def test_local_ids_compare_by_content_hash():
    assert same_encoder("tiny-t5@sha256:abc", "copied-t5@sha256:abc")
    assert not same_encoder("tiny-t5@sha256:abc", "tiny-t5@sha256:abd")
    assert not same_encoder("tiny-t5@sha256:abc", f"tiny-t5@{COMMIT}")  # local vs hub: never
    assert not same_encoder(f"tiny-t5@{COMMIT}", "tiny-t5@sha256:abc")


def test_a_recorded_commit_needs_that_commit():
    assert same_encoder(f"{HUB}@{COMMIT}", f"{HUB}@{COMMIT}")
    assert same_encoder(f"{HUB}@{COMMIT}", f"{HUB}@{COMMIT[:7]}")  # an abbreviated commit is that commit
    assert not same_encoder(f"{HUB}@{COMMIT}", f"{HUB}@{OTHER}")
    assert not same_encoder(f"{HUB}@{COMMIT}", f"{HUB}@main")  # main may load other weights
    assert not same_encoder(f"{HUB}@{COMMIT}", f"google/t5-v1_1-xl@{COMMIT}")


def test_an_unpinned_record_checks_the_name_only():
    # t5@main was recorded where the hub cache was empty: the name is all there is to check
    assert same_encoder(f"{HUB}@main", f"{HUB}@{COMMIT}")
    assert same_encoder(f"{HUB}@main", f"{HUB}@main")
    assert not same_encoder(f"{HUB}@main", "google/t5-v1_1-xl@main")


def test_unknown_ids_match_only_unknown():
    assert same_encoder(None, None)
    assert not same_encoder(f"{HUB}@main", None) and not same_encoder(None, f"{HUB}@main")
    assert not same_encoder("no-at-sign", "other") and same_encoder("no-at-sign", "no-at-sign")


def test_two_recorded_ids_trust_no_unpinned_ref_in_either_order():
    assert not same_recorded_encoder(f"{HUB}@main", f"{HUB}@{COMMIT}")
    assert not same_recorded_encoder(f"{HUB}@{COMMIT}", f"{HUB}@main")
    assert not same_recorded_encoder(f"{HUB}@main", f"{HUB}@v1.0")
    assert same_recorded_encoder(f"{HUB}@main", f"{HUB}@main")
    assert same_recorded_encoder(f"{HUB}@{COMMIT}", f"{HUB}@{COMMIT[:10]}")
    assert same_recorded_encoder("a@sha256:abc", "b@sha256:abc") and same_recorded_encoder(None, None)


def test_open_encoder_pins_a_hub_name_to_the_recorded_commit(t5_dir):
    enc = open_encoder(HUB, trained_on=f"{HUB}@{COMMIT}")  # offline: nothing is fetched or loaded
    assert enc.revision == COMMIT and enc.encoder_id == f"{HUB}@{COMMIT}"
    assert same_encoder(f"{HUB}@{COMMIT}", enc.encoder_id)
    assert open_encoder(HUB, trained_on=f"{HUB}@main").revision is None  # nothing to pin to
    assert open_encoder(HUB, trained_on=f"other/t5@{COMMIT}").revision is None
    assert open_encoder(HUB, trained_on=f"{HUB}@{COMMIT}", revision="v1").revision == "v1"  # asked for
    assert open_encoder(t5_dir, trained_on=f"{HUB}@{COMMIT}").revision is None  # a local directory


def test_cascade_checks_stages_and_encoder_with_the_rule():
    from imagen.cascade import check_encoders

    class Given:
        encoder_id = f"{HUB}@main"

    with pytest.raises(ValueError, match="the encoder given is google/t5-v1_1-xxl@main"):
        check_encoders(["base64"], [f"{HUB}@{COMMIT}"], Given())
    Given.encoder_id = f"{HUB}@{COMMIT}"
    assert check_encoders(["base64", "sr256"], [f"{HUB}@{COMMIT}", None], Given()) == f"{HUB}@{COMMIT}"
    with pytest.raises(ValueError, match="train every stage on the same encoder"):
        check_encoders(["base64", "sr256"], [f"{HUB}@{COMMIT}", f"{HUB}@main"])


def _encoder_openings(tree) -> list[tuple[int, str]]:
    """(line, what) for each call that builds a T5 encoder, or its tokenizer, from a string."""
    import ast

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "T5TextEncoder":
            found.append((node.lineno, "T5TextEncoder("))
        elif isinstance(f, ast.Attribute) and f.attr == "from_pretrained" and isinstance(f.value, ast.Name) \
                and f.value.id in ("AutoTokenizer", "T5EncoderModel", "T5TokenizerFast"):
            found.append((node.lineno, f"{f.value.id}.from_pretrained("))
        elif isinstance(f, ast.Subscript) and isinstance(f.value, ast.Name) and f.value.id == "TEXT_ENCODERS":
            found.append((node.lineno, "TEXT_ENCODERS[...]("))
    return found


def test_every_encoder_is_opened_through_open_encoder():
    """Only imagen/text.py builds a T5 encoder from a string; the embed step, training, register,
    evaluate, sample, the demo and the benchmarks call open_encoder (tests may build one
    directly). pipeline/plan.py loads a tokenizer alone, offline, to count caption tokens: it
    never makes an embedding."""
    import ast

    root = Path(__file__).resolve().parents[2]
    allowed = {"imagen/text.py": None, "pipeline/plan.py": {"AutoTokenizer.from_pretrained("}}
    found = []
    for folder in ("imagen", "pipeline", "dags", "infra", "bench"):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for line, what in _encoder_openings(ast.parse(path.read_text(), rel)):
                if rel in allowed and (allowed[rel] is None or what in allowed[rel]):
                    continue
                found.append(f"{rel}:{line}: {what}")
    assert not found, "open text encoders with imagen.text.open_encoder:\n" + "\n".join(found)
    # the check itself sees what it looks for
    assert [w for _, w in _encoder_openings(ast.parse("T5TextEncoder('x')\nTEXT_ENCODERS['t5']('x')"))] == \
        ["T5TextEncoder(", "TEXT_ENCODERS[...]("]


def test_tiny_t5_feed_forward_width(tmp_path):
    from transformers import T5Config

    path = build_tiny_t5(str(tmp_path / "ff"), d_model=16, num_layers=1, d_ff=48)
    config = T5Config.from_pretrained(path)
    assert (config.d_model, config.d_ff, config.num_layers) == (16, 48, 1)
