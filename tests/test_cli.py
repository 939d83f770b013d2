"""The command line as a new user meets it: fast help, one-line errors naming the fix, every configuration checked
before the model loads, resumable bench runs, `methods` showing what defaults resolve to, the generated method docs."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vtprune import cli

ROOT = Path(__file__).resolve().parents[1]


def _main(argv: list[str]) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli.main(argv)
    return printed.getvalue()


def test_help_version_and_argument_errors_do_not_import_torch():
    script = ("import sys\nfrom vtprune.cli import main\nfor argv in {argv!r}:\n    try:\n        main(argv)\n"
              "    except SystemExit:\n        pass\nprint('torch imported' if 'torch' in sys.modules else 'no torch')")
    argvs = [["--help"], ["--version"], ["bench", "--help"], ["bench", "--samples", "0"], ["bench", "--budgets", "x"]]
    done = subprocess.run([sys.executable, "-c", script.format(argv=argvs)], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert done.stdout.strip().endswith("no torch")
    assert "vtprune 0.1.0" in done.stdout
    assert "give a whole number >= 1" in done.stderr and "give a count (64) or a share" in done.stderr


def test_bench_help_shows_defaults_but_never_none(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 16)" in text and "(default: likelihood)" in text and "(default: 240;" in text
    assert "--quick" in text and "--fresh" in text and "(default: None)" not in text


@pytest.mark.parametrize("argv,message", [
    (["--methods", "fastvv"], r"--methods: unknown method 'fastvv'; registered methods: atp"),
    (["--methods", "fastv:kep=3"], r"fastv has no parameter 'kep'; its parameters are: keep"),
    (["--methods", "tome", "--budgets", "8", "64"], r"1 configuration\(s\) cannot run on this model \(tome@8: .*use "
                                                    r"keep >= 18\); change --budgets"),
    (["--model", str(ROOT / "no-such-model")], r"--model '.*no-such-model' is not a shipped reference model"),
])
def test_bench_refuses_bad_configurations_before_the_model_loads(monkeypatch, tmp_path, argv, message):
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    with pytest.raises(SystemExit, match=message):
        _main(["bench", *argv, "--out", str(tmp_path), "--no-plots"])
    assert not (tmp_path / "results.jsonl").exists()


def test_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something broke;\nfix it like this")

    monkeypatch.setattr(cli, "_load", broken)
    with pytest.raises(SystemExit) as info:
        cli.main(["show", "--method", "fastv"])
    assert str(info.value) == "vtprune: error: something broke; fix it like this (--debug shows the traceback)"
    with pytest.raises(RuntimeError, match="something broke"):
        cli.main(["show", "--method", "fastv", "--debug"])


def test_bench_streams_results_and_resumes(tmp_path, monkeypatch):
    from vtprune.bench import runner

    argv = ["bench", "--methods", "random", "--budgets", "64", "--samples", "6", "--batch-size", "3", "--no-plots",
            "--out", str(tmp_path)]
    printed = _main(argv)
    assert "each is saved to" in printed
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["options"]["samples"] == 6
    assert [json.loads(line)["label"] for line in lines[1:]] == ["unpruned", "random@64"]
    first = json.loads((tmp_path / "bench.json").read_text())

    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: pytest.fail("a finished configuration ran again"))
    printed = _main(argv)
    assert "resuming: 2 of 2 configurations are already measured" in printed
    again = json.loads((tmp_path / "bench.json").read_text())
    assert [r["correct"] for r in again["results"]] == [r["correct"] for r in first["results"]]
    assert again["reused_configurations"] == 2

    with pytest.raises(SystemExit, match=r"other options \(samples 6 there, 12 now\): pass --fresh"):
        _main([*argv[:-2], "--samples", "12", "--out", str(tmp_path)])


def test_an_interrupted_stream_keeps_what_finished(tmp_path):
    from vtprune.bench.resume import ResultStream

    stream = ResultStream(tmp_path, {"samples": 6})
    stream.add("unpruned", {"accuracy": 0.5, "params": {}})
    with (tmp_path / "results.jsonl").open("a") as file:
        file.write('{"label": "fastv@64", "rec')  # cut off mid-line
    resumed = ResultStream(tmp_path, {"samples": 6})
    assert resumed.done == {"unpruned": {"accuracy": 0.5, "params": {}}}
    resumed.add("fastv@64", {"accuracy": 0.25})
    assert set(ResultStream(tmp_path, {"samples": 6}).done) == {"unpruned", "fastv@64"}
    assert ResultStream(tmp_path, {"samples": 6}, fresh=True).done == {}


def test_methods_shows_defaults_resolved_on_the_model():
    text = _main(["methods"])
    assert "8 decoder layers, 576 visual tokens per image" in text
    block = {line.split()[0]: line for line in text.split("\n") if line and not line.startswith(" ")}
    assert set(block) >= {"fastv", "tome", "pyramiddrop"}
    fastv = text[text.index("\nfastv "):text.index("\nfeather ")]
    assert "layer=1," in fastv and "288 alive after the last layer" in fastv  # K = 2 of 32 -> 1 of 8; ratio 0.5
    tome = text[text.index("\ntome "):text.index("\nuniform ")]
    assert "=None" not in tome and "default ratio" not in text
    # ToMe's own default (r=16 merges in each of the 5 blocks up to the feature block) and what it keeps agree
    assert "r=16," in tome and "schedule=[16, 16, 16, 16, 16]" in tome and "unset: r" not in tome
    assert "496 visual tokens enter the LLM" in tome


def test_method_docs_are_generated_from_the_registry():
    from vtprune.methods import REGISTRY
    from vtprune.methods.docs import methods_markdown

    text = methods_markdown()
    assert (ROOT / "docs" / "methods.md").read_text() == text, \
        "docs/methods.md is stale: run `vtprune methods --docs docs/methods.md`"
    for name, cls in REGISTRY.items():
        assert f"\n## {name}\n" in text and cls.paper in text
    assert "``" not in text and "../shared" not in (ROOT / "README.md").read_text()
    # the docs stand alone: nothing points to notes outside the repository
    assert "card" not in text.replace("model card", "") and "shared/" not in text
