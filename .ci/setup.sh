#!/usr/bin/env bash
# Idempotent environment setup behind `make setup` (and so `make lab` / `make test`).
#   1. system packages ffmpeg, fluidsynth, fluid-soundfont-gm (apt, when missing and root)
#   2. a virtual environment in .venv
#   3. torch first, pinned (TORCH_VERSION), so nothing later pulls a multi-GB build
#   4. torchaudio, repaired when its compiled libs cannot load beside a CPU torch
#   5. the package itself: pip install -e ".[dev]"
# A second run with nothing changed only checks and returns in a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCHAUDIO_VERSION=${TORCHAUDIO_VERSION:-2.11.0}
SOUNDFONT=/usr/share/sounds/sf2/FluidR3_GM.sf2
say() { printf '[setup] %s\n' "$*"; }

# 1. system packages -------------------------------------------------------------------
missing=()
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
command -v fluidsynth >/dev/null 2>&1 || missing+=(fluidsynth)
[ -f "$SOUNDFONT" ] || missing+=(fluid-soundfont-gm)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing system packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        say "WARNING: missing system packages: ${missing[*]}"
        say "  Debian/Ubuntu: sudo apt-get install ffmpeg fluidsynth fluid-soundfont-gm"
        say "  macOS:         brew install ffmpeg fluid-synth  (and set MUSICGEN_LITE_SOUNDFONT to a GM .sf2)"
        say "  Without FluidSynth the data falls back to a small built-in synthesizer."
    fi
fi

# 2. virtual environment -----------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=(pip_quiet "$PY" -m pip install --disable-pip-version-check -q)
# pip warns once per package about find-links folders that do not exist on this machine: noise.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

stamp="$VENV/.musicgen-lite-setup"
want="$(cat pyproject.toml .ci/setup.sh .ci/repair_torchaudio.py | sha256sum | cut -c1-16) torch=$TORCH_VERSION"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$PY" -c "import torch, torchaudio, transformers, musicgen_lite" >/dev/null 2>&1; then
    say "environment up to date ($VENV)"
    exit 0
fi

# 3. torch, pinned and first ---------------------------------------------------------------
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" >/dev/null 2>&1; then
    say "installing torch==$TORCH_VERSION"
    "${PIP[@]}" "torch==$TORCH_VERSION"
fi

# 4. torchaudio: install without letting it choose another torch, then make it importable -
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchaudio') is None)"; then
    say "installing torchaudio==$TORCHAUDIO_VERSION (--no-deps: keeps the pinned torch)"
    "${PIP[@]}" --no-deps "torchaudio==$TORCHAUDIO_VERSION"
fi
"$PY" .ci/repair_torchaudio.py

# 5. the package and its dependencies ------------------------------------------------------
say "installing musicgen-lite and its dependencies (pip install -e .[dev])"
"${PIP[@]}" -e ".[dev]"
"$PY" .ci/repair_torchaudio.py --quiet
"$PY" -c "import torch, torchaudio, transformers, librosa, musicgen_lite; print('[setup] ok: torch', torch.__version__, '| torchaudio', torchaudio.__version__, '| transformers', transformers.__version__)"
echo "$want" > "$stamp"
