"""The README's Python example for the shipped model runs as written and gives a sensible answer."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_reference_example_runs_and_answers(capsys):
    text = README.read_text()
    block = re.search(r"From Python, the shipped model.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    question, answer = printed.rsplit(" -> ", 1)
    from vtprune import reference

    sample = reference.sample(3)
    assert question == sample.question
    assert answer.strip() in sample.choices  # one of the question's answers, and generation stopped after it


def test_readme_commands_install_what_they_run():
    """Line 3 (the main job) installs the bench extra; line 4 (CI's test command) the test extra, which carries the
    bench's packages too; both extras exist in pyproject.toml, and the declared license ships as LICENSE."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    lines = README.read_text().splitlines()
    assert lines[2] == 'pip install torch==2.13.0 -e ".[bench]" && vtprune bench'
    assert lines[3].startswith('pip install torch==2.13.0 -e ".[test]" && python -m pytest')
    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"matplotlib", "tqdm"} <= set(extras["bench"]) <= set(extras["test"])
    assert not {"matplotlib", "tqdm"} & set(project["dependencies"])  # the library itself does not need them
    assert project["license"]["text"] == "Apache-2.0"
    assert "Apache License" in (README.parent / "LICENSE").read_text().split("\n", 3)[1]
