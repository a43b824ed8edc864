# Sourced by the Makefile's targets: makes .venv once (torch, kdfast and its extras), then activates it.
# On a machine without torch it installs the CPU build torch==2.13.0; a torch already in the
# venv (for example a CUDA build) is kept. KDFAST_VENV selects another environment.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${KDFAST_VENV:-$ROOT/.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
# Reinstall kdfast and its extras only when the packaging changed.
STAMP="$VENV/.kdfast-install-stamp"
WANT=$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    python -m pip install --quiet --disable-pip-version-check -e "$ROOT[test,triton,demo,hf,bench,trl]"
    echo "$WANT" > "$STAMP"
fi
cd "$ROOT"
