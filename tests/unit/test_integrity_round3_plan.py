"""Issue 24 item 9: ``imagen-pipeline plan`` validates every input, each error one line naming the flag.

Before, 13 of the issue's 24 bad inputs were accepted: a negative price gave a negative cost,
``--steps 0`` negative GPU-hours, ``--scaling-efficiency 0`` silently became 0.9,
``--image-size -256`` printed a complex-valued size and ``--download-cores 0`` died with a
ZeroDivisionError (exit 1). Of the 37 bad inputs below, 28 got through or crashed.
"""

import contextlib
import io
import os
import subprocess
import sys

import pytest

from pipeline import cli, plan

BAD = [
    ["--samples", "0"], ["--samples", "-5"], ["--samples", "abc"],
    ["--mean-tokens", "0"], ["--mean-tokens", "-3"], ["--mean-tokens", "nan"], ["--mean-tokens", "inf"],
    ["--caption-sample", "0"],
    ["--steps", "0"], ["--steps", "-10"], ["--steps", "base64=0"], ["--steps", "foo=10"], ["--steps", "1.5"],
    ["--batch-size", "0"], ["--batch-size", "-8"], ["--batch-size", "sr256=-1"],
    ["--image-size", "-256"], ["--image-size", "0"],
    ["--keep-checkpoints", "-1"], ["--keep-checkpoints", "0"],
    ["--nodes", "0"], ["--nodes", "-2"], ["--gpus-per-node", "0"],
    ["--price-per-gpu-hour", "-2"], ["--price-per-gpu-hour", "nan"], ["--price-per-gpu-hour", "inf"],
    ["--scaling-efficiency", "0"], ["--scaling-efficiency", "-0.5"], ["--scaling-efficiency", "1.5"],
    ["--scaling-efficiency", "nan"],
    ["--download-cores", "0"], ["--download-cores", "-4"],
    ["--calibrate-seconds", "0"], ["--calibrate-batch", "0"],
    ["--presets", "nope"], ["--presets", "base64=sr256"], ["--gpu", "nope"], ["--encoder", "nope"],
]


def _plan(tmp_path, *extra: str) -> tuple[int, list[str], str]:
    """``imagen-pipeline plan`` in-process: (exit code, stderr lines, stdout)."""
    argv = ["plan", "--samples", "1000", "--calibration", str(tmp_path / "none.json"), *extra]
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's errors
            code = e.code
    return code, err.getvalue().strip().splitlines(), out.getvalue()


@pytest.mark.parametrize("extra", BAD, ids=[" ".join(b) for b in BAD])
def test_a_bad_plan_input_is_one_line_naming_its_flag(tmp_path, extra):
    code, lines, out = _plan(tmp_path, *extra)
    assert code == 2 and len(lines) == 1, (code, lines)
    assert lines[0].startswith("imagen-pipeline plan: error: ") and extra[0] in lines[0], lines
    assert "Error:" not in lines[0] and not out  # no exception type, no plan printed


def test_the_issues_cases_print_no_plan_through_the_real_command(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")
    for extra in (["--download-cores", "0"], ["--image-size", "-256"]):
        proc = subprocess.run([exe, "plan", "--samples", "1000", *extra], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "HOME": str(tmp_path)})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and extra[0] in lines[0], proc.stderr
        assert not proc.stdout


def test_plan_inputs_are_checked_for_api_callers_too():
    with pytest.raises(ValueError, match=r"^--scaling-efficiency 0: must be a number > 0 and <= 1$"):
        plan.PlanInputs(samples=10, mean_tokens=5.0, scaling_efficiency=0)
    with pytest.raises(ValueError, match=r"^--price-per-gpu-hour -1.0: must be a number >= 0 \(and 1 more\)$"):
        plan.PlanInputs(samples=10, mean_tokens=5.0, steps={"base64": -1}, price_per_gpu_hour=-1.0)
    with pytest.raises(ValueError, match="--samples"):
        plan.PlanInputs(samples=0, mean_tokens=5.0)  # an empty --url-list counts 0 rows
    with pytest.raises(ValueError, match="--presets sr256=base64"):
        plan.PlanInputs(samples=10, mean_tokens=5.0, presets={"sr256": "base64"})


def test_edge_values_that_are_valid_still_plan(tmp_path):
    code, lines, out = _plan(tmp_path, "--scaling-efficiency", "1", "--price-per-gpu-hour", "0",
                             "--nodes", "2", "--steps", "base64=10", "--keep-checkpoints", "1")
    assert code == 0 and not lines, lines
    assert "cost $0" in out
