#!/usr/bin/env bash
# One command for a lent GPU: the test suite on CUDA jax, then bench_encoder's 32 x 30 s and 64 x 30 s cases for
# both model families, fp32 and bf16, each beside CUDA torch, and one table of RTFx (seconds of audio per second).
#
#   bash scripts/gpu_check.sh                 # suite + benchmarks; results under ${OUT:-gpu_results}
#   SKIP_TESTS=1 bash scripts/gpu_check.sh    # benchmarks only
#   LAYERS=2 CASES=32x30s bash scripts/gpu_check.sh   # a quick smoke run
#
# Installs into .venv-gpu (jax with the CUDA 12 plugin; the pinned torch is a CUDA build). Nothing here is run
# by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
CASES=${CASES:-32x30s,64x30s}
mkdir -p "$OUT"
VENV=${VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -c .ci/constraints.txt -e '.[test,cuda12]'
fi
PY="$VENV/bin/python"
{ nvidia-smi -L || true; "$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices()); \
print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"; } | tee "$OUT/devices.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  # xdist workers share the GPU (conftest turns off preallocation); the exit status is kept, the run goes on
  set +e
  "$PY" -m pytest -n "${WORKERS:-4}" -q -p no:cacheprovider tests 2>&1 | tail -n 40 | tee "$OUT/tests.txt"
  echo "pytest exit status ${PIPESTATUS[0]}" | tee -a "$OUT/tests.txt"
  set -e
fi
layers=()
[ -n "${LAYERS:-}" ] && layers=(--layers "$LAYERS")
for model in granite-speech speech5; do
  for dtype in float32 bfloat16; do
    name="$model-$dtype"
    "$PY" benchmarks/bench_encoder.py --model "$model" --cases "$CASES" --runs "${RUNS:-3}" "${layers[@]}" \
      --torch-device cuda --torch-dtype "$dtype" --jax-dtype "$dtype" --json "$OUT/$name.json" 2>&1 \
      | tee "$OUT/$name.txt" || echo "$name failed" | tee -a "$OUT/$name.txt"
  done
done
"$PY" benchmarks/bench_generate.py --torch-device cuda --cases "${GEN_CASES:-10s,8x30s}" --new-tokens 32 \
  2>&1 | tee "$OUT/generate.txt" || echo "bench_generate failed" | tee -a "$OUT/generate.txt"
"$PY" - "$OUT" <<'PY' | tee "$OUT/table.md"
import glob, json, os, sys
out = sys.argv[1]
print("| model | dtype | case | torch s | jax s | speed-up | torch RTFx | jax RTFx |")
print("|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    model, dtype = os.path.basename(path)[:-5].rsplit("-", 1)
    results = json.load(open(path)).get("results", {})
    for case, sides in results.items():
        t, j = sides.get("torch", {}), sides.get("jax", {})
        if "median_s" not in t or "median_s" not in j:
            print(f"| {model} | {dtype} | {case} | error | error | | | |")
            continue
        a = j["audio_s"]
        print(f"| {model} | {dtype} | {case} | {t['median_s']:.3f} | {j['median_s']:.3f} | "
              f"{t['median_s'] / j['median_s']:.2f}x | {a / t['median_s']:.0f} | {a / j['median_s']:.0f} |")
PY
