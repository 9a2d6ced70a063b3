"""infra/demo.py's options that need no training: --seeds checks, --score-only finds the
cascade an earlier run trained (one final checkpoint per stage) or says what to run first."""

from __future__ import annotations

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "infra", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_only_finds_one_final_checkpoint_per_stage(demo, tmp_path):
    made = []
    for stage in demo.STAGES:
        final = tmp_path / "data" / "checkpoints" / stage / "tiny-abc" / "final"
        final.mkdir(parents=True)
        made.append(str(final))
    (tmp_path / "data" / "checkpoints" / demo.STAGES[0] / "tiny-abc" / "step-00000050").mkdir()
    assert demo.trained_checkpoints(str(tmp_path)) == made


def test_score_only_without_a_trained_demo_says_what_to_run(demo, tmp_path):
    with pytest.raises(SystemExit, match=r"expected one trained base64 .* found 0; run `python infra/demo.py"):
        demo.trained_checkpoints(str(tmp_path))


def test_score_only_refuses_to_guess_between_two_trained_runs(demo, tmp_path):
    for run in ("tiny-a", "tiny-b"):
        (tmp_path / "data" / "checkpoints" / "base64" / run / "final").mkdir(parents=True)
    with pytest.raises(SystemExit, match="expected one trained base64 .* found 2"):
        demo.trained_checkpoints(str(tmp_path))


def test_too_few_seeds_for_the_grid_is_a_usage_error(demo, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["demo.py", "--score-only", "--seeds", str(demo.GRID_SEEDS - 1)])
    with pytest.raises(SystemExit) as exit_:
        demo.main()
    assert exit_.value.code == 2
    assert f"--seeds must be at least {demo.GRID_SEEDS}" in capsys.readouterr().err
