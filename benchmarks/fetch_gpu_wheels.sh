#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh installs on a GPU machine without network access:
# the benchmark-only baselines (curvlinops and PyHessian) and the packages they need that the
# machine's image lacks (backpack-for-pytorch, einconv, unfoldNd). Its image has torch 2.11,
# torchvision, numpy, scipy, tqdm, einops, opt-einsum, linear-operator, scikit-learn and pytest.
#
#   bash benchmarks/fetch_gpu_wheels.sh          # into .whl/ at the repository root (git-ignored)
#
# Python 3.12, manylinux x86_64 (the GPU machine), whatever this machine is. No dependencies are
# resolved (--no-deps): every wheel needed is named here, one version each.
set -euo pipefail

root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
dest="$root/.whl"
exclude="$(git -C "$root" rev-parse --git-path info/exclude)"
case "$exclude" in /*) ;; *) exclude="$root/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")" "$dest"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"

python="${PYTHON:-python3}"
wheels=(
  curvlinops-for-pytorch==3.0.1
  backpack-for-pytorch==1.7.1
  einconv==0.1.0
  unfoldNd==0.2.3
  pyhessian==0.1
)
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$dest" "${wheels[@]}"
echo "wheels in $dest:"
ls -1 "$dest"
du -sh "$dest"
