"""Tampered and wrong inputs through `imagen-pipeline`: each gives exactly one line on stderr
that names the file, a non-zero exit and no traceback; ``-v`` adds the traceback.

The cases run in one fresh interpreter (the CLI's ``main()`` per case, with file descriptor 2
redirected to a file per case, so logging, warnings and C-level output count too): one
process start instead of one per case. Two cases also run through the installed
``imagen-pipeline`` entry point."""

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from imagen.checkpoint import save_weights
from imagen.config import preset
from imagen.text import T5TextEncoder
from imagen.unet import UNet
from pipeline.data.download import RESERVED_COLUMNS

BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")

# Runs every case in this one process: argv lists in, [(exit code, stderr), ...] out.
DRIVER = r"""
import json, os, sys, tempfile
from pipeline.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        out.append((code, err.read().decode(errors="replace")))
print(json.dumps(out))
"""


def make_stage(path, encoder_dir, stage="base64", **metadata) -> str:
    cfg = preset("tiny", stage)
    torch.manual_seed(0)
    state = UNet(cfg.unet).state_dict()
    save_weights(path, state, cfg, ema=state, metadata={
        "encoder_id": T5TextEncoder(encoder_dir).encoder_id, "encoder_name": encoder_dir, "step": 1,
        **metadata})
    return path


def tampered(good: str, dst: str, edit=None, **files: bytes) -> str:
    """A copy of checkpoint ``good``: ``edit`` changes its config.json (a dict) in place;
    ``files`` (name with "." as "_", e.g. model_safetensors) replace files' bytes."""
    shutil.copytree(good, dst)
    path = os.path.join(dst, "config.json")
    if edit is not None:
        with open(path) as f:
            doc = json.load(f)
        edit(doc)
        with open(path, "w") as f:
            json.dump(doc, f)
    for name, data in files.items():
        with open(os.path.join(dst, name.replace("_", ".")), "wb") as f:
            f.write(data)
    return dst


def write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_encoder_dir):
    t = tmp_path_factory.mktemp("bad")
    good = make_stage(str(t / "good"), tiny_encoder_dir)
    d = {"good": good, "out": str(t / "out")}
    with open(os.path.join(good, "model.safetensors"), "rb") as f:
        weights = f.read()
    d["garbage_weights"] = tampered(good, str(t / "garbage"), ema_safetensors=b"\x00garbage, not safetensors" * 4)
    d["truncated_weights"] = tampered(good, str(t / "truncated"), model_safetensors=weights[:5000])
    d["not_json"] = tampered(good, str(t / "notjson"), config_json=b'{"stage": ')

    def wrong_type(doc):
        doc["image_size"] = "big"

    def no_unet(doc):
        del doc["unet"]

    def zero_heads(doc):
        doc["unet"]["head_dim"] = 0

    def other_width(doc):
        doc["unet"]["channels"] = 48

    def hub_encoder(doc):
        doc["metadata"]["encoder_name"] = "someone/t5-planted"
        doc["metadata"]["encoder_id"] = "someone/t5-planted@main"

    for name, edit in (("wrong_type", wrong_type), ("no_unet", no_unet), ("zero_heads", zero_heads),
                       ("other_width", other_width), ("hub_encoder", hub_encoder)):
        d[name] = tampered(good, str(t / name), edit)
    os.makedirs(t / "empty")
    d["empty"] = str(t / "empty")
    (t / "model").mkdir()
    write(str(t / "model" / "MLmodel"), b"flavors: [not, a, mapping")
    d["bad_mlmodel"] = str(t / "model")
    os.makedirs(t / "emb")
    write(str(t / "emb" / "000000.parquet"), b"PAR1 not parquet at all PAR1")
    d["bad_embeddings"] = str(t / "emb")
    os.makedirs(t / "filtered")
    (t / "filtered" / "manifest.json").write_text("{}")  # train names its data by the manifest's hash
    d["filtered"] = str(t / "filtered")
    write(str(t / "urls.parquet"), b"url,caption\nhttp://127.0.0.1:9/x.png,a\n")
    d["urls_not_parquet"] = str(t / "urls.parquet")
    pd.DataFrame({"link": ["http://127.0.0.1:9/x.png"], "caption": ["a"]}).to_parquet(t / "nourl.parquet")
    d["urls_no_url_column"] = str(t / "nourl.parquet")
    d["missing"] = str(t / "does-not-exist")
    return d


def cases(d):
    """(argv, a path the error line must name), one per kind of bad input."""
    out = ["--output", d["out"]]
    sample = ["sample", "a red circle", "--no-progress", *out, "--steps", "1", "--model"]
    evaluate = ["evaluate", "--steps", "1", *out, "--checkpoint"]
    return [
        ([*sample, d["garbage_weights"]], os.path.join(d["garbage_weights"], "ema.safetensors")),
        ([*evaluate, d["garbage_weights"]], os.path.join(d["garbage_weights"], "ema.safetensors")),
        (["register", "--checkpoint", d["truncated_weights"]],
         os.path.join(d["truncated_weights"], "model.safetensors")),
        ([*sample, d["not_json"]], os.path.join(d["not_json"], "config.json")),
        (["register", "--checkpoint", d["not_json"]], os.path.join(d["not_json"], "config.json")),
        ([*sample, d["wrong_type"]], os.path.join(d["wrong_type"], "config.json")),
        ([*evaluate, d["no_unet"]], os.path.join(d["no_unet"], "config.json")),
        ([*sample, d["zero_heads"]], os.path.join(d["zero_heads"], "config.json")),
        ([*sample, d["other_width"]], os.path.join(d["other_width"], "ema.safetensors")),
        ([*sample, d["hub_encoder"]], "--encoder someone/t5-planted"),
        ([*evaluate, d["hub_encoder"]], "--encoder someone/t5-planted"),
        ([*sample, d["empty"]], d["empty"]),
        ([*evaluate, d["empty"]], os.path.join(d["empty"], "config.json")),
        ([*sample, d["bad_mlmodel"]], os.path.join(d["bad_mlmodel"], "MLmodel")),
        ([*sample, d["missing"]], d["missing"]),
        ([*sample, d["good"], "--image", d["missing"]], d["missing"]),
        ([*evaluate, d["good"], "--attributes", d["missing"]], d["missing"]),
        (["train", "--stage", "base64", "--preset", "tiny", "--data", d["filtered"], "--embeddings", d["bad_embeddings"],
          "--checkpoint-dir", d["out"]], os.path.join(d["bad_embeddings"], "000000.parquet")),
        (["train", "--stage", "base64", "--preset", "tiny", "--data", d["filtered"], "--embeddings", d["missing"],
          "--checkpoint-dir", d["out"]], d["missing"]),
        (["download", "--url-list", d["urls_not_parquet"], *out], d["urls_not_parquet"]),
        (["download", "--url-list", d["urls_no_url_column"], *out], d["urls_no_url_column"]),
        (["download", "--url-list", d["missing"] + ".parquet", *out], d["missing"] + ".parquet"),
    ]


def run_driver(argvs):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_bad_input_is_one_line_naming_the_file(inputs):
    table = cases(inputs)
    results = run_driver([argv for argv, _ in table])
    failures = []
    for (argv, named), (code, err) in zip(table, results, strict=True):
        lines = [line for line in err.splitlines() if line.strip()]
        ok = (code not in (0, None) and len(lines) == 1 and "Traceback" not in err
              and lines[0].startswith(f"imagen-pipeline {argv[0]}: error: ") and named in lines[0])
        if not ok:
            failures.append(f"{argv}\n  exit {code}, stderr:\n{err}")
    assert not failures, "\n".join(failures)


def test_entry_point_gives_one_line_and_traceback_with_verbose(inputs):
    argv = ["sample", "x", "--model", inputs["wrong_type"], "--output", inputs["out"]]
    proc = subprocess.run([BIN, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"imagen-pipeline sample: error: {os.path.join(inputs['wrong_type'], 'config.json')}: image_size is "
        "'big', expected int: fix it or restore config.json from the training run"]
    proc = subprocess.run([BIN, "-v", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("imagen-pipeline sample: error: ")


def test_unexpected_errors_are_one_line_with_their_type(capsys, monkeypatch):
    from pipeline import cli

    def boom(_):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(cli.VERBS, "sample", boom)
    assert cli.main(["sample", "x", "--model", "m", "--output", "o"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "imagen-pipeline sample: error: ZeroDivisionError: division by zero (run with -v for the traceback)"]
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "x", "--steps", "many", "--model", "m", "--output", "o"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "imagen-pipeline sample: error: argument --steps: invalid int value: 'many' "
        "(see imagen-pipeline sample --help)"]


def test_reserved_extra_column_is_one_line_before_any_download(tmp_path):
    """Issue 28 item 6: `--extra-columns width height` (columns img2dataset writes itself) is one
    line naming the column, before img2dataset starts: no traceback, once or twice."""
    urls = tmp_path / "urls.parquet"
    pd.DataFrame({"url": ["http://127.0.0.1:9/x.png"], "caption": ["a red circle"], "width": [640],
                  "height": [480]}).to_parquet(urls)
    out = tmp_path / "raw"
    proc = subprocess.run([BIN, "download", "--url-list", str(urls), "--output", str(out), "--allow-private-networks",
                           "--extra-columns", "width", "height"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "imagen-pipeline download: error: --extra-columns 'width' is a column img2dataset writes itself "
        f"(reserved: {', '.join(RESERVED_COLUMNS)}); rename that column in the URL list, or leave it out"]
    assert {"width", "height", "url", "retry_of"} <= set(RESERVED_COLUMNS)
    assert not out.exists() or not any(out.iterdir())  # nothing fetched, nothing written
