#!/usr/bin/env bash
# The GPU check in one command: the GPU tests, the HVP cost table and the GPU benchmark table, each
# step under its own time limit, every table and log written to one folder.
#
#   bash benchmarks/gpu_check.sh                  # on a machine with a CUDA GPU (about 8 minutes on an H200)
#   bash benchmarks/gpu_check.sh --cpu-smoke      # the same steps on the CPU at tiny sizes (2-3 minutes)
#   bash benchmarks/gpu_check.sh --only bench     # some steps: a comma list of tests, hvp, bench
#
# Output: ${OUT:-benchmarks/gpu-results}/ gets env.txt (machine, versions), tests.log, hvp.md and
# hvp.log (benchmarks/hvp_backends.py), bench.md and bench.log (benchmarks/run.py), and summary.txt
# (each step's exit status and time, and every VERDICT line). Seven files: what the device tool
# brings back from $OUT (at most eight).
#
# The package is used from this checkout (PYTHONPATH), not installed. Wheels in .whl/ (the
# benchmark-only baselines, fetched by benchmarks/fetch_gpu_wheels.sh where there is a network) are
# installed first into a temporary folder; GPU_CHECK_EXTRA_WHEELS names a second folder of wheels
# (here: the baselines' dependencies that the GPU image has and this machine lacks).
#
# Time limits (seconds; the benchmark also stops itself a little before its limit, keeping what it
# measured): GPU_CHECK_TESTS_S (80), GPU_CHECK_HVP_S (110), GPU_CHECK_BENCH_S (260);
# GPU_CHECK_BENCH_ARGS and GPU_CHECK_HVP_ARGS are appended to those steps' commands.
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
smoke=0
only="tests,hvp,bench"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) smoke=1 ;;
    --only) only="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
out="${OUT:-$root/benchmarks/gpu-results}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
summary="$out/summary.txt"
: > "$summary"
script_start=$(date +%s)

if [ "$smoke" = 1 ]; then
  tests_s="${GPU_CHECK_TESTS_S:-60}"; hvp_s="${GPU_CHECK_HVP_S:-100}"; bench_s="${GPU_CHECK_BENCH_S:-130}"
  tests_args=(-m gpu -q -x)
  hvp_args=(--quick --threads 1 --workloads transformer,resnet --repeats 1 --entry-cap 30)
  bench_args=(--quick --threads 1 --workloads transformer,resnet --k 3,1 --reference best
              --methods auto,curvlinops,thick_restart,block_lanczos,lanczos,pyhessian)
else
  tests_s="${GPU_CHECK_TESTS_S:-80}"; hvp_s="${GPU_CHECK_HVP_S:-110}"; bench_s="${GPU_CHECK_BENCH_S:-260}"
  tests_args=(-m gpu -q --durations=5)
  # ResNet-18 at 512 images here (per-vector costs do not depend on the count; the solves use 1024)
  hvp_args=(--device cuda --gpu-sized --workloads resnet,transformer --resnet-samples 512 --repeats 3 --entry-cap 25)
  # The targets' cases first: the rounds run auto and curvlinops on every case before the candidates.
  bench_args=(--device cuda --gpu-sized --workloads transformer,mlp,cnn,resnet --k 10,1 --resnet-samples 1024
              --methods auto,curvlinops,thick_restart,block_lanczos,lanczos,pyhessian)
fi
# Caps, in multiples of auto's time on the same case, that still decide every verdict: a candidate
# stopped at 2x cannot be 10% faster than auto, curvlinops stopped at 4.5x shows auto under 0.25x of
# it, and the slow baselines only need to be shown slower than auto.
bench_args+=(--cap-factor 2 --curvlinops-cap-factor 4.5 --slow-cap-factor 1 --budget $((bench_s - 25)))
# shellcheck disable=SC2206
hvp_args+=(${GPU_CHECK_HVP_ARGS:-})
# shellcheck disable=SC2206
bench_args+=(${GPU_CHECK_BENCH_ARGS:-})

# -- wheels and environment ------------------------------------------------------------------------
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
wheels=()
for w in "$root"/.whl/*.whl ${GPU_CHECK_EXTRA_WHEELS:+"$GPU_CHECK_EXTRA_WHEELS"/*.whl}; do
  [ -f "$w" ] && wheels+=("$w")
done
if [ ${#wheels[@]} -gt 0 ]; then
  echo "== installing ${#wheels[@]} wheel(s) into $site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}" \
    || echo "!! wheel install failed: the baselines will be skipped"
fi
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo 'no git') $(git -C "$root" status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" - <<'PY'
import importlib, importlib.metadata, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda available {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
for module, dist in (("numpy", "numpy"), ("scipy", "scipy"), ("tqdm", "tqdm"), ("sklearn", "scikit-learn"),
                     ("pytest", "pytest"), ("curvlinops", "curvlinops-for-pytorch"), ("pyhessian", "pyhessian")):
    try:
        importlib.import_module(module)
        print(f"{module} {importlib.metadata.version(dist)}")
    except Exception as exc:
        print(f"{module} NOT IMPORTABLE ({type(exc).__name__}: {exc})")
import hessian_eigenthings
print("hessian_eigenthings from", hessian_eigenthings.__file__)
PY
} 2>&1 | tee "$out/env.txt"

# -- the steps -----------------------------------------------------------------------------------------
step() {  # step NAME SECONDS LOG COMMAND...
  local name="$1" seconds="$2" log="$3"
  shift 3
  case ",$only," in *",$name,"*) ;; *) return 0 ;; esac
  echo "== $name (at most $seconds s): $*"
  local start rc
  start=$(date +%s)
  timeout -k 10 "$seconds" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - start ))
  local state="exit $rc"
  [ "$rc" = 124 ] && state="stopped at its limit of $seconds s"
  echo "== $name: $state after $took s" | tee -a "$summary"
}

step tests "$tests_s" "$out/tests.log" "$python" -u -m pytest "${tests_args[@]}" -p no:cacheprovider
step hvp "$hvp_s" "$out/hvp.log" "$python" -u benchmarks/hvp_backends.py "${hvp_args[@]}" --markdown "$out/hvp.md"
step bench "$bench_s" "$out/bench.log" "$python" -u benchmarks/run.py "${bench_args[@]}" --markdown "$out/bench.md"

{
  echo "== verdicts"
  cat "$out"/hvp.log "$out"/bench.log 2>/dev/null | grep '^VERDICT' | sort -u
  echo "== whole check: $(( $(date +%s) - script_start )) s; tables in $out"
} | tee -a "$summary"
