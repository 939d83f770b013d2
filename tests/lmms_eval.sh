#!/usr/bin/env bash
# The lmms-eval plug-in's tests in their own environment: a virtualenv that sees the installed vtprune, torch and
# transformers, plus lmms-eval. lmms-eval is installed --no-deps with the packages its evaluation path imports,
# because its full dependency list pulls torchvision, which has no CPU build on the package index this CI uses.
# (With a CUDA torch, `pip install "vtprune[lmms-eval]"` is the whole installation.)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-lmms-eval
[ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q --no-deps "lmms-eval==0.7.3"
"$venv/bin/pip" install -q accelerate loguru sacrebleu evaluate pytz tenacity pytablewriter
"$venv/bin/python" -m pytest -q tests/test_lmms_eval.py "$@"
