"""The WebDataset shard format's one owner (pipeline.data.shards): the key rule, safe names, the
tail check, exact-name reads (and the loader's use of them), byte-identical writing, and shards
on a remote (fsspec ``memory://``) root read through pipeline.storage.

    python -m pytest tests/unit/test_shards.py -q
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import storage
from pipeline.data import shards
from pipeline.data.embeddings import build_table, write_table


@dataclass
class FakeSample:
    """What ShardWriter reads of a filter Sample."""

    key: str
    image_bytes: bytes
    caption: str = "a caption"
    ext: str = "png"
    meta: dict = field(default_factory=dict)


def png(i: int, side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side + i, side), (10 * i, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def samples(n: int = 3) -> list[FakeSample]:
    return [FakeSample(f"{i:06d}", png(i), f" caption {i} ", meta={"url": f"http://x/{i}", "b": 1, "a": i})
            for i in range(n)]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def rename_in_place(path: Path, old: str, new: str) -> None:
    """Rename member ``old`` to ``new`` in its ustar header (checksum redone): same size, same
    offsets, only the name differs: the rewrite a size check cannot see."""
    raw = bytearray(path.read_bytes())
    at = raw.index(old.encode().ljust(100, b"\0"))
    block = raw[at:at + 512]
    block[0:100] = new.encode().ljust(100, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    raw[at:at + 512] = block
    path.write_bytes(bytes(raw))


# --- names --------------------------------------------------------------------------------------

def test_the_key_is_everything_before_the_first_dot_and_the_extension_keeps_its_spelling():
    assert shards.split_key("000001.png") == ("000001", "png")
    assert shards.split_key("000001.PNG") == ("000001", "PNG")  # no image: KINDS is exact
    assert shards.split_key("000001.seg.png") == ("000001", "seg.png")
    assert shards.split_key("dir/000001.png") == ("dir/000001", "png")
    assert shards.split_key("noext") == ("noext", "")
    assert shards.member_name(*shards.split_key("000001.json")) == "000001.json"
    assert shards.KINDS["jpeg"] == "image" and shards.KINDS["txt"] == "txt" and "PNG" not in shards.KINDS


@pytest.mark.parametrize("name", ["../000001.png", "/abs/000001.png", "dir/000001.png", "a\\b.png", "noext",
                                  ".png", "000001.", "key with space.png", "k\n.png", "x" * 64 + ".yyyyyyyyyyyyyyyy" * 3])
def test_unsafe_member_names(name):
    assert not shards.is_safe_member(name)


def test_safe_member_names_and_plain_keys():
    assert shards.is_safe_member("000000001.jpg") and shards.is_safe_member("a_b-c.tar.json")
    assert shards.is_plain_key("000000001") and not shards.is_plain_key("../x")
    assert not shards.is_plain_key(12) and not shards.is_plain_key("")


# --- the tail check -----------------------------------------------------------------------------

def test_a_good_tar_scans_whole_and_hashes_every_byte(tmp_path):
    path = tmp_path / "000000.tar"
    write_tar(path, [("000000.png", png(0)), ("000000.txt", b"hi"), ("000001.png", png(1))])
    scan = shards.TarScan(str(path))
    members = list(scan)
    assert [(m.key, m.ext) for m in members] == [("000000", "png"), ("000000", "txt"), ("000001", "png")]
    assert scan.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and scan.size == path.stat().st_size
    seeked = shards.TarScan(str(path), hashed=False)
    assert list(seeked) == members and seeked.sha256 == "" and seeked.size == scan.size


def test_a_truncated_tar_is_damaged_not_shorter(tmp_path):
    path = tmp_path / "000000.tar"
    write_tar(path, [(f"{i:06d}.png", png(i)) for i in range(3)])
    data = path.read_bytes()
    cut = data.index(b"000002.png")  # the third header: the tar ends there, mid-archive
    path.write_bytes(data[:cut + 100])
    with pytest.raises(shards.ShardDamaged, match=r"it is cut short \(\d+ bytes; its last member ends at byte "
                                                  r"\d+\), after 2 members"):
        list(shards.TarScan(str(path)))


def test_a_corrupt_header_mid_tar_is_damaged_naming_the_byte(tmp_path):
    path = tmp_path / "000000.tar"
    write_tar(path, [(f"{i:06d}.png", png(i)) for i in range(3)])
    raw = bytearray(path.read_bytes())
    at = raw.index(b"000001.png")
    raw[at + 148] ^= 0x7F  # its checksum: tarfile stops here in silence
    path.write_bytes(bytes(raw))
    with tarfile.open(path) as tar:
        assert len(tar.getmembers()) == 1  # what a reader without the check would get
    with pytest.raises(shards.ShardDamaged, match=rf"a corrupt tar header at byte {at} of {len(raw)} ends the "
                                                  r"archive early, after 1 members"):
        list(shards.TarScan(str(path), hashed=False))
    with pytest.raises(shards.ShardDamaged, match="after 1 members"):
        list(shards.iter_samples(str(path)))


def test_not_a_tar_is_damaged(tmp_path):
    path = tmp_path / "000000.tar"
    path.write_bytes(b"")
    with pytest.raises(shards.ShardDamaged, match="it is not a readable tar"):
        list(shards.TarScan(str(path)))


# --- reads at a known offset --------------------------------------------------------------------

def test_read_at_matches_the_name_in_the_header_exactly(tmp_path):
    """The loader used to accept any header name that the expected name starts or ends with."""
    path = tmp_path / "000000.tar"
    write_tar(path, [("000001.pn", b"a" * 10), ("1.png", b"b" * 10), ("000001.png", b"c" * 10),
                     ("000001.txt", b"caption")])
    at = {m.name: m for m in shards.TarScan(str(path))}
    with open(path, "rb") as f:
        for wrong in ("000001.pn", "1.png"):
            assert shards.read_at(f, at[wrong].offset, "000001.png", 10) is None
        assert shards.read_at(f, at["000001.png"].offset, "000001.png", 10) == b"c" * 10
        assert shards.read_at(f, at["000001.png"].offset, "000001.pn", 10) is None
        assert shards.read_at(f, at["000001.png"].offset, "1.png", 10) is None
        assert shards.read_after(f, at["000001.png"].offset, 10, "000001.txt") == b"caption"
        assert shards.read_after(f, at["000001.png"].offset, 10, "000001.tx") is None
        assert shards.read_after(f, at["000001.txt"].offset, 7, "000002.txt") is None  # the archive's end


def test_the_loader_skips_an_image_whose_header_names_another_member(tmp_path, caplog):
    """A member renamed in place (same size and offsets, so the recorded index is trusted): the
    old loose check served ``0.png``'s bytes for ``000000.png``; the exact one re-indexes the tar,
    where that key has no image any more, and the image is never handed out."""
    from pipeline.data.loader import Shard, TrainDataConfig, _ShardReader

    path = tmp_path / "000000.tar"
    write_tar(path, [m for i in range(3) for m in ((f"{i:06d}.png", png(i)), (f"{i:06d}.txt", b"c"))])
    scan = shards.TarScan(str(path))
    images = {m.key: m for m in scan if m.ext == "png"}
    keys = sorted(images)
    where = [("png", images[k].offset, images[k].size, 8) for k in keys]
    digests = [hashlib.sha256(png(i)).digest() for i in range(3)]
    meta = {"encoder_id": "t5-test", "dim": 4, "max_length": 8, "num_samples": 3, "tar_samples": 3,
            "source_size": scan.size}
    table = build_table(keys, np.ones(3, np.int64), np.zeros((3, 4), np.float16), where, digests, meta)
    parquet = str(tmp_path / "000000.parquet")
    write_table(table, parquet)
    for old, new in (("000000.png", "0.png"), ("000001.png", "000001.pn")):
        rename_in_place(path, old, new)
    cfg = TrainDataConfig(data=str(tmp_path), embeddings=str(tmp_path), image_size=8)
    identity = {"encoder_id": "t5-test", "dim": 4, "max_length": 8}  # what discover() reads from the footers
    reader = _ShardReader(Shard(str(path), parquet, 3), cfg, identity)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
            assert reader.read_image(2) == png(2)
            assert reader.read_image(0) is None and reader.read_image(1) is None
        assert "re-indexing the tar" in caplog.text and reader.scanned
    finally:
        reader.close()


# --- writing and whole samples ------------------------------------------------------------------

def test_the_writer_is_deterministic_and_its_samples_read_back(tmp_path):
    for out in ("a", "b"):
        with shards.ShardWriter(str(tmp_path / out)) as writer:
            for sample in samples():
                writer.write(sample, "000000.tar")
    first = (tmp_path / "a" / "000000.tar").read_bytes()
    assert first == (tmp_path / "b" / "000000.tar").read_bytes()
    got = list(shards.iter_samples(str(tmp_path / "a" / "000000.tar")))
    assert [k for k, _ in got] == ["000000", "000001", "000002"]
    assert got[1][1] == {"png": png(1), "txt": b"caption 1", "json": b'{"a": 1, "b": 1, "url": "http://x/1"}'}
    names = [m.name for m in shards.TarScan(str(tmp_path / "a" / "000000.tar"))]
    assert names[:3] == ["000000.png", "000000.txt", "000000.json"]  # the caption right after the image


def test_a_failed_write_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError), shards.ShardWriter(str(tmp_path)) as writer:
        writer.write(samples(1)[0], "000000.tar")
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_iter_samples_keeps_the_first_member_of_each_extension(tmp_path):
    path = tmp_path / "000000.tar"
    write_tar(path, [("k1.png", b"1"), ("k1.png", b"2"), ("k1.txt", b"t"), ("k2.jpg", b"3"), ("k1.json", b"{}")])
    assert list(shards.iter_samples(str(path))) == [("k1", {"png": b"1", "txt": b"t"}), ("k2", {"jpg": b"3"}),
                                                    ("k1", {"json": b"{}"})]


# --- a remote root ------------------------------------------------------------------------------

@pytest.fixture
def memory_root():
    root = f"memory://shards-{uuid.uuid4().hex[:8]}"
    yield root
    storage.rmtree(root)


def test_a_remote_root_reads_like_a_local_one(memory_root, tmp_path):
    with shards.ShardWriter(memory_root) as writer:
        for sample in samples():
            writer.write(sample, "000000.tar")
    with shards.ShardWriter(str(tmp_path)) as writer:
        for sample in samples():
            writer.write(sample, "000000.tar")
    uri = storage.join(memory_root, "000000.tar")
    local = (tmp_path / "000000.tar").read_bytes()
    assert storage.read_bytes(uri) == local
    assert shards.file_sha256(uri) == hashlib.sha256(local).hexdigest()
    scan = shards.TarScan(uri)
    members = {m.name: m for m in scan}
    assert scan.sha256 == hashlib.sha256(local).hexdigest()
    with storage.open(uri, "rb") as f:
        image = members["000001.png"]
        assert shards.read_at(f, image.offset, "000001.png", image.size) == png(1)
        assert shards.read_after(f, image.offset, image.size, "000001.txt") == b"caption 1"
    assert [k for k, _ in shards.iter_samples(uri)] == ["000000", "000001", "000002"]


def test_evaluation_references_read_a_remote_folder(memory_root):
    from pipeline.release.eval_data import load_references

    with shards.ShardWriter(storage.join(memory_root, "shards")) as writer:
        for sample in samples(2):
            writer.write(sample, "000000.tar")
    images, captions = load_references(storage.join(memory_root, "shards"), limit=2)
    assert images.shape == (2, 8, 8, 3) and captions == ["caption 0", "caption 1"]
    storage.write_bytes(storage.join(memory_root, "imgs", "a.png"), png(3, side=12))
    storage.write_bytes(storage.join(memory_root, "imgs", "a.txt"), b"a picture\n")
    images, captions = load_references(storage.join(memory_root, "imgs"), limit=4)
    assert images.shape == (1, 12, 12, 3) and captions == ["a picture"]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_references(storage.join(memory_root, "nothing"), limit=1)
