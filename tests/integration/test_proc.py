"""pipeline.proc.run_streaming with real child processes: output streamed line by line, a
failure raised with the last lines, and every process under the child killed when we stop."""

from __future__ import annotations

import sys
import time

import pytest

from pipeline.proc import command_name, run_streaming


def test_streams_every_line_and_fails_with_the_last_ones(capsys):
    code = "import sys\nfor i in range(50): print('line', i)\nprint('boom', file=sys.stderr)\nsys.exit(3)"
    with pytest.raises(RuntimeError, match=r"exited with code 3; last output:\nline 46\n(.|\n)*boom$") as err:
        run_streaming([sys.executable, "-c", code], tail=5)
    assert "line 45" not in str(err.value)
    assert "line 0\n" in capsys.readouterr().out  # streamed, not only the tail


def test_returns_the_last_lines_and_sets_env():
    code = "import os\nfor i in range(3): print(i)\nprint(os.environ['PROC_TEST'])"
    assert run_streaming([sys.executable, "-c", code], env={"PROC_TEST": "yes"}, tail=2) == ["2", "yes"]


def test_names_a_module_by_its_module():
    assert command_name([sys.executable, "-m", "pipeline.train", "--stage", "base64"]) == "pipeline.train"
    assert command_name(["torchrun", "--standalone"]) == "torchrun"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")  # a zombie is dead, only unreaped
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("own_session", [False, True])
def test_an_interrupt_kills_every_process_under_the_child(monkeypatch, own_session):
    """What a task timeout does to torchrun: its workers die with it, those in the agent's
    process group and those in a session of their own (torchrun starts workers that way)."""
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            f"start_new_session={own_session})\n"
            "print(p.pid, flush=True)\ntime.sleep(60)")
    seen: list[str] = []

    class Interrupting:
        def write(self, line: str) -> None:
            seen.append(line)
            raise KeyboardInterrupt

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Interrupting())
    with pytest.raises(KeyboardInterrupt):
        run_streaming([sys.executable, "-c", code])
    grandchild = int(seen[0])
    deadline = time.monotonic() + 10
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(grandchild)
