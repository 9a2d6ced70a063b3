"""pipeline.data.shards reads plain headers itself (``_plain_header``) and hands every other header
to Python's tarfile: what it yields, hashes, reads and refuses must be exactly what tarfile alone
gives, for good shards and for every damaged or odd one. Each case runs twice, once as shipped and
once with the plain path switched off (every header goes to tarfile, the code before it existed),
and the two answers must be equal: members, their data, the hash, the error and its message.

    python -m pytest tests/unit/test_shards_plain.py -q
"""

from __future__ import annotations

import io
import random
import tarfile
import time

import pytest

from pipeline.data import shards


def _webdataset_tar(n: int = 6, seed: int = 0) -> bytes:
    """A shard as img2dataset writes one: webdataset's TarWriter (tarfile, PAX, a float mtime:
    a pax header before every member), KEY.png/.txt/.json of various sizes."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(n):
            for ext, size in (("png", rng.randrange(0, 3000)), ("txt", rng.randrange(0, 40)), ("json", 512)):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size, info.mtime, info.mode = size, time.time(), 0o444
                info.uname = info.gname = "bigdata"
                tar.addfile(info, io.BytesIO(bytes(rng.randrange(256) for _ in range(size))))
    return buf.getvalue()


def _written_tar() -> bytes:
    """A shard as ShardWriter writes one (no pax headers)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(4):
            for ext in ("png", "txt", "json"):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                data = bytes([i]) * (100 * i + 7)
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _odd_tar(global_header: bool = True) -> bytes:
    """Plain members around ones only tarfile reads: a directory, a symlink, a pax path (long and
    non-ASCII names), a global pax header (first, or none: tarfile then takes over mid-file), a
    file of type AREGTYPE."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"} if global_header else None) as tar:
        def add(name, data=b"x", **attrs):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for k, v in attrs.items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)

        add("000000001.png", b"png bytes")
        add("dir", type=tarfile.DIRTYPE, size=0)
        add("000000001.lnk", b"", type=tarfile.SYMTYPE, linkname="000000001.png", size=0)
        add("0" * 150 + ".png", b"long name")
        add("000000002.p\u00e9g", b"non-ascii name")
        add("000000003.png", b"old style", type=tarfile.AREGTYPE)
        add("000000004.png", b"after the odd ones")
    return buf.getvalue()


def _gnu_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in ("000000001.png", "1" * 120 + ".png", "000000002.png"):
            info = tarfile.TarInfo(name)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"abcde"))
    return buf.getvalue()


def _outcome(path, hashed: bool) -> tuple:
    scan = shards.TarScan(str(path), hashed=hashed)
    seen = []
    try:
        for m in scan:
            seen.append((m, scan.read() if m.isfile else None))
    except shards.ShardDamaged as err:
        return seen, type(err).__name__, str(err), err.members, scan.count
    return seen, scan.sha256, scan.size, scan.count


def _both(path, hashed: bool, monkeypatch) -> tuple[tuple, tuple]:
    fast = _outcome(path, hashed)
    with monkeypatch.context() as m:
        m.setattr(shards, "_plain_header", lambda block: None)  # every header to tarfile, as before
        plain = _outcome(path, hashed)
    return fast, plain


def _cases() -> dict[str, bytes]:
    web, written, odd = _webdataset_tar(), _written_tar(), _odd_tar()
    rng = random.Random(1)
    cases = {"webdataset": web, "written": written, "odd": odd, "gnu": _gnu_tar(), "empty": b"",
             "zeros": bytes(10240), "not_a_tar": b"hello world" * 100, "odd_then_plain": odd + web,
             "plain_then_odd": _odd_tar(global_header=False)}
    mid = cases["plain_then_odd"]
    for cut in range(1024, len(mid), 256):
        cases[f"plain_then_odd_cut_at_{cut}"] = mid[:cut]
    for cut in sorted({*range(0, len(web), 509), *range(0, 4096, 97), len(web) - 1024, len(web) - 10240}):
        cases[f"cut_at_{cut}"] = web[:cut]
    for i in range(120):  # one byte changed anywhere in the first few members' headers and data
        at = rng.randrange(0, 6000)
        cases[f"flip_{at}_{i}"] = web[:at] + bytes([(web[at] + rng.randrange(1, 256)) % 256]) + web[at + 1:]
    pax_at = 512  # the first pax header's records
    cases["pax_wrong_length"] = web[:pax_at] + web[pax_at:pax_at + 30].replace(b"28 mtime", b"29 mtime") + \
        web[pax_at + 30:]
    cases["pax_padding_not_zero"] = web[:pax_at + 100] + b"x" + web[pax_at + 101:]
    cases["garbage_after_the_end"] = web + b"\x01" * 100
    return cases


CASES = _cases()


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed", "seeked"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_plain_path_answers_as_tarfile_alone(name, hashed, tmp_path, monkeypatch):
    path = tmp_path / "00000.tar"
    path.write_bytes(CASES[name])
    fast, plain = _both(path, hashed, monkeypatch)
    assert fast == plain


def test_the_good_shards_take_the_plain_path_all_the_way(tmp_path, monkeypatch):
    """Not a vacuous equality: img2dataset's and ShardWriter's shards never reach tarfile."""
    for name in ("webdataset", "written"):
        path = tmp_path / f"{name}.tar"
        path.write_bytes(CASES[name])
        with monkeypatch.context() as m:
            m.setattr(shards.tarfile, "open", lambda *a, **k: pytest.fail("tarfile was asked"))
            for hashed in (True, False):
                members = list(shards.TarScan(str(path), hashed=hashed))
                assert len(members) == (18 if name == "webdataset" else 12)


@pytest.mark.parametrize("name", ["webdataset", "written", "odd", "gnu"])
def test_read_at_and_read_after_answer_as_tarfile_alone(name, tmp_path, monkeypatch):
    path = tmp_path / "00000.tar"
    path.write_bytes(CASES[name])
    with tarfile.open(path) as tar:
        infos = tar.getmembers()
    names = [i.name for i in infos] + ["000000000.png", "././@PaxHeader", "nothing"]

    def answers():
        out = []
        with open(path, "rb") as f:
            for info in infos:
                for n in names:
                    out.append(shards.read_at(f, info.offset_data, n, info.size))
                    out.append(shards.read_after(f, info.offset_data, info.size, n))
        return out

    fast = answers()
    with monkeypatch.context() as m:
        m.setattr(shards, "_plain_header", lambda block: None)
        assert answers() == fast
    assert any(a is not None for a in fast)


def _tarfile_written(samples) -> bytes:
    """What ShardWriter wrote when it wrote through tarfile (its code before the plain writer)."""
    import json

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for s in samples:
            for name, data in ((f"{s.key}.{s.ext}", s.image_bytes), (f"{s.key}.txt", s.caption.strip().encode()),
                               (f"{s.key}.json", json.dumps(s.meta, sort_keys=True).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("n", [0, 1, 7, 40])
def test_the_writer_writes_what_tarfile_wrote(n, tmp_path):
    from tests.unit.test_shards import FakeSample

    rng = random.Random(n)
    keys = [f"{i:09d}" for i in range(n)]
    if n > 5:
        keys[3], keys[4] = "k" * 64, "\u00e9t\u00e9"  # the longest safe key; a name only a pax header holds
    samples = [FakeSample(k, bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 511, 512, 513, 3000]))),
                          caption=f" caption {i} \u00e9 ", meta={"i": i, "url": f"http://x/{i}"})
               for i, k in enumerate(keys)]
    with shards.ShardWriter(str(tmp_path)) as writer:
        for s in samples:
            writer.write(s, "000000.tar")
    if n:
        assert (tmp_path / "000000.tar").read_bytes() == _tarfile_written(samples)
    assert shards._file_header_agrees()
