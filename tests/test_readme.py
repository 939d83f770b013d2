"""The README's Python example for the shipped model runs as written and gives a sensible answer."""
from __future__ import annotations

import re
from pathlib import Path

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
