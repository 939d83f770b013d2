"""Results streamed to disk as each bench configuration finishes, so an interrupted ``vtprune bench`` resumes.

``results.jsonl`` in the output folder: a header line with the options that decide every configuration's numbers
(model, questions, scoring, dtype, ...), then one line per finished configuration. A rerun with the same options
skips the configurations already there; with other options it is refused before the model loads, naming the fix.
Methods and budgets are not options: a rerun with other ones reuses the configurations the two runs share.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILENAME = "results.jsonl"


class OptionsDiffer(ValueError):
    """The output folder holds results of a run with other options."""


class ResultStream:
    """The finished configurations of a bench run (``done``: label -> record) and where new ones go (``add``)."""

    def __init__(self, folder: Path, options: dict[str, Any], fresh: bool = False) -> None:
        self.path = Path(folder) / FILENAME
        self.options = json.loads(json.dumps(options))  # as it reads back from disk
        self.done: dict[str, dict[str, Any]] = {}
        # a new file is started by the first finished configuration, so a run that fails before measuring anything
        # (a model that does not load) leaves no file, and --fresh discards old results only once it has new ones
        self._started = self.path.exists() and not fresh
        if self._started:
            self._read()

    def _read(self) -> None:
        text = self.path.read_text()
        if not text.endswith("\n"):  # cut short mid-line: later lines must start on a line of their own
            with self.path.open("a") as stream:
                stream.write("\n")
        lines = text.splitlines()
        try:
            saved = json.loads(lines[0])["options"]
        except (IndexError, KeyError, TypeError, json.JSONDecodeError):
            raise OptionsDiffer(f"{self.path} is not a vtprune results file; pass --fresh to replace it, or --out DIR "
                                "to write elsewhere") from None
        differ = {key: (saved.get(key), value) for key, value in self.options.items() if saved.get(key) != value}
        if differ:
            listed = "; ".join(f"{key} {then!r} there, {now!r} now" for key, (then, now) in differ.items())
            raise OptionsDiffer(f"{self.path} holds results of a run with other options ({listed}): pass --fresh to "
                                f"discard them, or --out DIR to keep them and write elsewhere")
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interruption: measured again
                continue
            self.done[record["label"]] = record["record"]

    def add(self, label: str, record: dict[str, Any]) -> None:
        """Append one finished configuration and push it to disk before the next one starts."""
        if not self._started:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"options": self.options}) + "\n")
            self._started = True
        with self.path.open("a") as stream:
            stream.write(json.dumps({"label": label, "record": record}) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        self.done[label] = json.loads(json.dumps(record))
