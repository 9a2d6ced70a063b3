"""The flags users type (README, scripts) keep their names and defaults now that ``download``
and ``filter`` generate theirs from ``DownloadConfig`` and ``FilterConfig``: each verb's whole
option set is snapshotted here, and the choices come from their owners. ``--help`` imports no
torch."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from imagen.config import STAGES
from imagen.samplers import SAMPLER_NAMES
from pipeline import cli
from pipeline.data import spark
from pipeline.data.download import ENCODE_FORMATS, INPUT_FORMATS, RESIZE_MODES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# flag -> its default, as parsed (taken before the flags were generated; the differences are
# marked: same meaning, the value now lands in the config field's name)
DOWNLOAD = {
    "--url-list": None, "--output": None, "--input-format": None, "--stages": list(STAGES), "--preset": None,
    "--image-size": None, "--resize-mode": None, "--url-col": "url", "--caption-col": "caption",
    "--extra-columns": None,  # dest: save_additional_columns (was extra_columns)
    "--processes": 1, "--threads": 8, "--timeout": 10, "--retries": 0,
    "--samples-per-shard": 10000,  # dest: number_sample_per_shard (was samples_per_shard)
    "--encode-format": "png", "--max-pixels": 64_000_000, "--max-bytes": 32 * 1024 * 1024,
    "--progress-every": 10.0,  # issue 28: a line while a shard downloads
    "--per-host-connections": 4, "--per-host-rate": 5.0, "--per-host-burst": 10,  # issue 27: politeness
    "--no-robots-txt": True,  # dest: robots_txt, turned off by the flag
    "--distributor": "multiprocessing", "--spark-master": None, "--spark-conf": None,
    "--allow-private-networks": False, "--allow-host": None,
}
FILTER = {
    "--input": None, "--output": None, "--min-caption-chars": 3, "--max-caption-chars": 512,
    "--languages": (),  # was None; both mean "no language filter"
    "--min-language-confidence": 0.5, "--stages": list(STAGES), "--preset": None, "--min-side": None,
    "--max-aspect": 2.0, "--max-pixels": 64_000_000,
    "--blank-tolerance": 2,  # issue 28: the blank-image reject
    "--no-dedup": True, "--no-near-dedup": True,  # dest: dedup / near_dedup, turned off by the flag
    "--near-dup-distance": 6, "--scorer": None, "--val-fraction": 0.05, "--val-max": 10_000,
    "--samples-per-shard": 1000, "--workers": 1,
}


def verb_parser(verb: str) -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[verb]


def flags(verb: str) -> dict[str, object]:
    return {a.option_strings[0]: a.default for a in verb_parser(verb)._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)}


def test_download_flags_keep_their_names_and_defaults():
    assert flags("download") == DOWNLOAD


def test_filter_flags_keep_their_names_and_defaults():
    assert flags("filter") == FILTER


def test_choices_come_from_their_owners():
    def choices(verb: str, flag: str):
        return next(a.choices for a in verb_parser(verb)._actions if flag in a.option_strings)

    assert choices("download", "--input-format") == INPUT_FORMATS
    assert choices("download", "--resize-mode") == RESIZE_MODES and "border" not in RESIZE_MODES
    assert choices("download", "--encode-format") == ENCODE_FORMATS == ("png", "jpg", "webp")
    assert choices("download", "--distributor") == spark.DISTRIBUTORS
    assert tuple(choices("sample", "--sampler")) == SAMPLER_NAMES


def test_generated_flags_parse_into_the_configs(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("pipeline.data.download.download", lambda url_list, output, **kw: seen.update(kw) or {})
    assert cli.main(["download", "--url-list", "u.csv", "--output", str(tmp_path / "raw"), "--extra-columns", "a", "b",
                     "--samples-per-shard", "7", "--caption-col", "", "--timeout", "2.5"]) == 0
    assert (seen["save_additional_columns"], seen["number_sample_per_shard"]) == (["a", "b"], 7)
    assert seen["caption_col"] is None and seen["timeout"] == 2.5 and seen["stages"] == tuple(STAGES)
    seen.clear()
    assert cli.main(["download", "--url-list", "u.csv", "--output", str(tmp_path / "raw2"), "--per-host-connections",
                     "0", "--per-host-rate", "0.5", "--per-host-burst", "2", "--no-robots-txt"]) == 0
    assert (seen["per_host_connections"], seen["per_host_rate"], seen["per_host_burst"], seen["robots_txt"]) == (
        0, 0.5, 2, False)

    captured = {}

    def filter_shards(input, output, config=None, samples_per_shard=1000, workers=1):  # the step's signature
        captured["cfg"] = config
        return {"kept": 0}

    monkeypatch.setattr("pipeline.data.filters.filter_shards", filter_shards)
    monkeypatch.setattr("pipeline.data.filters.format_reject_table", lambda manifest: "")
    assert cli.main(["filter", "--input", "i", "--output", str(tmp_path / "filtered"), "--no-dedup", "--languages", "en,de",
                     "--min-side", "32", "--val-fraction", "0"]) == 0
    cfg = captured["cfg"]
    assert (cfg.dedup, cfg.near_dedup, cfg.languages, cfg.min_side, cfg.val_fraction) == (
        False, True, ("en", "de"), 32, 0)


def test_help_imports_no_torch():
    code = ("import sys; from pipeline import cli; cli.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}).stdout
    assert out.strip() == "[]"
