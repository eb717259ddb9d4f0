#!/usr/bin/env bash
# Download the wheels that scripts/device_benchmark.sh installs on a lent GPU machine (no network there).
#
# The GPU image (Python 3.12, x86-64) already holds torch, timm, numpy, scipy, scikit-image, tifffile,
# tensorboard, huggingface-hub, pillow, tqdm, packaging, typing-extensions; it lacks MONAI, pytorch-ignite
# and nibabel.  Their own requirements (numpy, torch, packaging, typing-extensions; importlib-resources
# only below Python 3.12) are all on the image, so their wheels alone are enough.  timm travels too, at our
# pinned version: the registry's model ids and kwargs are checked against it, and the image's may differ.
#
# Run from the repository root:   bash scripts/fetch_device_wheels.sh
# Then carry the folder:          run(..., carry=[".whl"])
# The folder .whl/ is ignored through .git/info/exclude (added here if missing): never commit wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pin() { sed -n "s/^$1==\([^ #]*\).*/\1/p" requirements.txt; }
MONAI=$(pin monai); IGNITE=$(pin pytorch-ignite); NIBABEL=$(pin nibabel); TIMM=$(pin timm)
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl "monai==$MONAI" "pytorch-ignite==$IGNITE" "nibabel==$NIBABEL" "timm==$TIMM"
ls -l .whl
du -ch .whl/*.whl | tail -1
for w in .whl/*.whl; do echo "== $w"; unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true; done
