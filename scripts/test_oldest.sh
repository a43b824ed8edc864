#!/usr/bin/env bash
# The oldest versions kdfast claims to work with: installs the floors of pyproject.toml (torch in
# dependencies, transformers and accelerate in the hf extra), exactly, in their own environment
# (.venv-oldest; KDFAST_OLDEST_VENV selects another), and runs a short subset of the tests on them:
# the core loss against the float64 reference (float32, every backend), the custom op under
# torch.compile, and the Hugging Face integration. .ci/run runs it after `make test`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${KDFAST_OLDEST_VENV:-$ROOT/.venv-oldest}
cd "$ROOT"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# name==floor for each floor tested here, as pyproject.toml states it
PINS=$(python - <<'EOF'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
pins = {}
for requirement in project["dependencies"] + project["optional-dependencies"]["hf"]:
    match = re.fullmatch(r"(torch|transformers|accelerate)>=([0-9.]+)", requirement.replace(" ", ""))
    if match:
        pins[match[1]] = f"{match[1]}=={match[2]}"
if len(pins) != 3:
    raise SystemExit(f"scripts/test_oldest.sh: expected floors 'torch>=', 'transformers>=', 'accelerate>=' "
                     f"in pyproject.toml, found {sorted(pins.values())}")
print(" ".join(pins[name] for name in ("torch", "transformers", "accelerate")))
EOF
)
read -r TORCH_PIN HF_PINS <<<"$PINS"
# Reinstall only when the packaging or this script changed.
STAMP="$VENV/.kdfast-install-stamp"
WANT=$(cat pyproject.toml setup.py scripts/test_oldest.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    python -m pip install --quiet --disable-pip-version-check "$TORCH_PIN"  # first, as scripts/env.sh does
    # shellcheck disable=SC2086
    python -m pip install --quiet --disable-pip-version-check -e ".[test,triton,hf]" "$TORCH_PIN" $HF_PINS
    echo "$WANT" > "$STAMP"
fi
python - <<'EOF'
import platform
from importlib.metadata import version

names = ("torch", "transformers", "accelerate", "triton")
print("oldest versions:", f"python {platform.python_version()},", ", ".join(f"{n} {version(n)}" for n in names))
EOF
python -m pytest -q tests/loss/test_correctness.py tests/loss/test_compile_and_shapes.py tests/integrations/test_hf.py \
    -k "float32 or not test_matches_reference" "$@"
