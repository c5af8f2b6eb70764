#!/usr/bin/env bash
# Creates or updates the virtual environment at <project root>/.venv with fvlm and its dependencies.
#
# Idempotent: the install runs only when pyproject.toml or requirements/*.txt changed since the last
# successful install (a hash is kept in .venv/.fvlm-install-hash), and pip reinstalls nothing that is
# already satisfied. On machines without an NVIDIA GPU (or with FVLM_CPU=1) torch is pinned to the CPU
# build (requirements/cpu.txt); GPU users get the CUDA build pip chooses.
#
# Environment: PYTHON (interpreter for a new venv, default python3), FVLM_CPU=1 (force the CPU pin),
# FVLM_EXTRAS (extras to install, default "dev,segment").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
python="${PYTHON:-python3}"
extras="${FVLM_EXTRAS:-dev,segment}"

if [ ! -x "$venv/bin/python" ]; then
    echo "fvlm: creating virtual environment $venv" >&2
    "$python" -m venv "$venv"
fi

constraints=(-c requirements/constraints.txt)
target=cpu
if [ "${FVLM_CPU:-0}" != 1 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    target=gpu
else
    constraints+=(-c requirements/cpu.txt)
fi

want="$(cat pyproject.toml requirements/*.txt | sha256sum | cut -d' ' -f1)-$target-$extras"
stamp="$venv/.fvlm-install-hash"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import pipelines.cli" 2>/dev/null; then
    exit 0
fi

echo "fvlm: installing into $venv ($target, extras: $extras)" >&2
export PIP_DISABLE_PIP_VERSION_CHECK=1
# On CPU install the pinned CPU torch first, so that no dependency resolves torch to a CUDA build.
if [ "$target" = cpu ]; then
    "$venv/bin/python" -m pip install -q "${constraints[@]}" torch
fi
"$venv/bin/python" -m pip install -q "${constraints[@]}" -e ".[$extras]"
echo "$want" > "$stamp"
