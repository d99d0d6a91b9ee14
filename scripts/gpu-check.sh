#!/usr/bin/env bash
# Check elmforest on a CUDA machine that has no network, in under 8 minutes.
#
#   scripts/gpu-check.sh [WHEELS]      # WHEELS: a folder of wheels from scripts/gpu-wheels.sh
#                                      # (default shared/wheels)
#
# The machine must already have a CUDA build of torch. Steps, each under `timeout`; a failed step
# does not stop the later ones, and the exit status is 1 if any failed:
#
#   1. install  (90 s)  pip install --no-index --find-links WHEELS --no-deps -e .  over the machine's
#                       own torch, then only the missing dependencies (pydantic, pydantic-core,
#                       typing-inspection, annotated-types, ...) from WHEELS; torch must be unchanged
#   2. tests    (90 s)  pytest -m gpu tests/test_gpu.py (CUDA training in bf16 with fused AdamW and
#                       SDPA; ensemble scoring on CUDA = CPU)
#   3. bench   (180 s)  python bench/gpu.py --no-compile: 125M training tokens/s and MFU, ensemble
#                       scoring k = 1, 4, 8, averaging time; appended to bench/results.md
#   4. study   (120 s)  elmforest run recipes/paper-125m.yaml: the 125M model, 8 experts, 16 steps
#                       of 4096 tokens on a synthetic corpus (tests/paperdata.py), context 256
#
# Logs, bench/results.md and the study's results.json/report.md land in LOGS: $OUT when set,
# else /tmp/elmforest-gpu-check. Environment:
#   PYTHON      interpreter with the CUDA torch (default python3)
#   VENV        where to install. Default "auto": into PYTHON's own environment when it is a venv
#               or conda environment, else (a system Python, often PEP 668-protected) into a venv
#               made with --system-site-packages (so it sees the machine's torch) at
#               ${TMPDIR:-/tmp}/elmforest-gpu-venv. "" forces PYTHON's environment; a path, that venv.
#   BENCH_ARGS  arguments for bench/gpu.py (default --no-compile; "" adds the torch.compile row)
#   STEPS       which steps to run (default "install tests bench study"), e.g. STEPS=bench to rerun one
#   ALLOW_CPU   1: accept a CPU build of torch in the install step (to try that step without a GPU)
set -uo pipefail

cd "$(dirname "$0")/.."
WHEELS=$(realpath -m "${1:-shared/wheels}")
LOGS=${OUT:-/tmp/elmforest-gpu-check}
PY=${PYTHON:-python3}
BENCH_ARGS=${BENCH_ARGS---no-compile}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/elmforest-gpu-check.XXXXXX")
mkdir -p "$LOGS"
echo "== gpu-check $(date -u +%FT%TZ) on $(hostname)" >>"$LOGS/summary.txt"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
failed=()

step() {  # step NAME SECONDS FUNCTION: run the function in a bash under timeout, log to LOGS/NAME.log
    local name=$1 seconds=$2 fn=$3 start rc
    echo "== $name (limit ${seconds}s)"
    start=$(date +%s)
    timeout --kill-after=10 "$seconds" bash -c "$fn" >"$LOGS/$name.log" 2>&1
    rc=$?
    tail -n 25 "$LOGS/$name.log"
    echo "== $name: exit $rc after $(( $(date +%s) - start ))s$([ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$LOGS/summary.txt"
    [ $rc -eq 0 ] || failed+=("$name")
}

install() {
    if [ -n "$VENV" ]; then
        if [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"; then
            PY="$VENV/bin/python"
        else  # no venv module (Debian without python3-venv): install into the system Python after all
            echo "cannot create $VENV; installing into $PY's environment"
            export PIP_BREAK_SYSTEM_PACKAGES=1
        fi
    fi
    local before after reqs
    before=$("$PY" -c 'import torch; print(torch.__version__)') || { echo "no torch for $PY"; return 1; }
    "$PY" -c 'import torch, sys; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available()); sys.exit(0 if torch.version.cuda else 1)' \
        || [ "${ALLOW_CPU:-0}" = 1 ] || { echo "this torch is not a CUDA build"; return 1; }
    [ -d "$WHEELS" ] || { echo "no wheels folder $WHEELS (make it with scripts/gpu-wheels.sh)"; return 1; }
    # The build backend (setuptools) comes from WHEELS too: --no-index reaches the isolated build.
    "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps -e . || return 1
    # elmforest's own requirements (now in its metadata), torch left to the machine; pip installs
    # only those not already satisfied, from WHEELS only.
    reqs=$("$PY" -c '
import importlib.metadata as md, re
for r in md.requires("elmforest") or []:
    if "extra ==" not in r and not re.match(r"torch\b", r):
        print(r)') || return 1
    mapfile -t reqs <<<"$reqs"
    "$PY" -m pip install --no-index --find-links "$WHEELS" "${reqs[@]}" "pytest>=7.4" || return 1
    after=$("$PY" -c 'import torch; print(torch.__version__)')
    [ "$before" = "$after" ] || { echo "torch changed: $before -> $after"; return 1; }
    "$PY" -c 'import elmforest, pydantic, transformers; print("elmforest from", elmforest.__file__)' || return 1
}

gpu_tests() {
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible")' || return 1
    "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_gpu.py
}

bench() {
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    "$PY" bench/gpu.py $BENCH_ARGS || return 1
    cp bench/results.md "$LOGS/results.md"
}

study() {
    local out="$WORK/run"
    "$PY" tests/paperdata.py "$WORK/corpus" 400 || return 1
    "$PY" -m elmforest.cli run recipes/paper-125m.yaml --no-progress \
        --set corpus="$WORK/corpus" --set 'novel_domains=[dialogue]' \
        --set tokenizer.vocab_size=1024 --set tokenizer.sample_bytes_per_domain=200000 \
        --set model.context=256 \
        --set budget.total_tokens=65536 --set budget.batch_tokens=4096 --set optim.micro_batch_tokens=4096 \
        --set optim.eval_every=4 --set optim.log_every=2 \
        --set arms.random_split=false \
        --set eval.max_tokens_per_domain=2049 --set eval.prior_sequences=4 --set eval.prior_batch=2 \
        --set eval.valid_windows_per_domain=2 \
        --set out="$out" || return 1
    cp "$out/results.json" "$out/report.md" "$out/timing.json" "$LOGS/" 2>/dev/null
    "$PY" - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
r = json.loads((out / "results.json").read_text())
dev = json.loads((out / "dense" / "train.json").read_text())["spec"]["device"]
assert dev.startswith("cuda"), f"the study trained on {dev}"
cfg = json.loads((out / "forest" / "news" / "config.json").read_text())
assert (cfg["n_layer"], cfg["n_embd"]) == (12, 768)
print("trained on", dev, "| btm_ensemble_cached train mean ppl", round(r["btm_ensemble_cached"]["train_mean"], 2),
      "| dense", round(r["dense"]["train_mean"], 2))
EOF
}

if [ "${VENV-auto}" = auto ]; then
    if "$PY" -c 'import os, sys; sys.exit(0 if sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, "conda-meta")) else 1)'; then
        VENV=""
    else
        VENV="${TMPDIR:-/tmp}/elmforest-gpu-venv"
    fi
fi
export -f install gpu_tests bench study
export PY WHEELS LOGS WORK BENCH_ARGS VENV
STEPS=${STEPS:-install tests bench study}
has() { [[ " $STEPS " == *" $1 "* ]]; }
has install && step install 90 install
if [ -n "$VENV" ] && [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; export PY; fi  # install ran in a child bash
echo "python: $PY" | tee -a "$LOGS/summary.txt"
has tests && step tests 90 gpu_tests
has bench && step bench 180 bench
has study && step study 120 study
rm -rf "$WORK"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]} (logs in $LOGS)" | tee -a "$LOGS/summary.txt"
    exit 1
fi
echo "all steps passed (logs in $LOGS)" | tee -a "$LOGS/summary.txt"
