#!/usr/bin/env bash
# The Python packages that the GPU image lacks and scripts/device_check.sh uses (TRL for its GKDTrainer
# step), as wheels in .whl/ (git-ignored), for the image's Python 3.12 on x86-64. Run here, where pip can
# download; then name .whl in the device run's `carry`. device_check.sh installs them into a folder of its
# own (pip --target, no index) when it finds them, and skips the TRL step when it does not.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# TRL 1.16 and what of its requirements the image does not hold (datasets and its dill / multiprocess).
PACKAGES=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)  # the versions tested here
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${PACKAGES[@]}"
ls -l .whl
