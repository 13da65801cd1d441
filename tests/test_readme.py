"""The README's two commands (non-negotiable 1): one installs and runs the main job on a shipped
model, one runs the tests, and `.ci/run` runs exactly that test command. Docs edited by script
once cut the README to its last 80 lines; nothing else would notice."""

from __future__ import annotations

import re
import shlex

from conftest import REPO


def fenced_commands_after(text: str, heading: str) -> list[str]:
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```\n(.*?)```", section, re.S)]


def test_the_readme_opens_with_the_project_and_its_two_commands() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("# onnxcompress\n")
    run, tests = fenced_commands_after(readme, "## Two commands")
    install, _, job = run.partition(" && ")
    assert install == "pip install -e ."
    words = shlex.split(job)
    assert words[0] == "onnxcompress" and (REPO / words[1]).is_file() and words[1].startswith("models/")
    for flag in ("--feeds", "--labels", "--calib"):
        assert (REPO / words[words.index(flag) + 1]).is_file()
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert tests == "pip install -e '.[dev]' && python -m pytest"
    assert tests in ci
