#!/usr/bin/env bash
# Every GPU measurement of the scorer in one go (< 8 minutes on one recent GPU), as markdown.
#
#   benchmarks/gpu.sh [OUT.md]            # default OUT: benchmarks/gpu_results.md
#
# Sections (each under its own time limit, so one slow part cannot sink the rest):
#   1. scorer: exact vs floor vs the paper's listing, peak memory, SLQ vs exact at K = 256,
#      and loop vs batched Jacobian rows            (benchmarks/bench_scorer.py --quick --device cuda)
#   2. ViT: floor / exact loop / batched / auto / SLQ seconds per image for the ViT-Ti-width 32 px
#      model and ViT-S/16, ViT-B/16 at 224 px, and the 128-image projection
#                                                   (benchmarks/bench_vit.py --device cuda)
#   3. demo: `jepa-monitor demo --steps 500 --device cuda` (train + monitor + curate, two runs)
#
# Without a CUDA GPU it prints why and exits 0. GPU_SH_SMOKE=1 runs a few-second version of every
# section on the CPU instead (to check the plumbing where no GPU is lent; the numbers mean nothing).
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python).
set -u
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/gpu_results.md}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu.sh: '$PY' cannot import torch; set PYTHON=/path/to/python of an environment with torch and this package's dependencies." >&2
    exit 1
fi
SMOKE="${GPU_SH_SMOKE:-0}"
if [ "$SMOKE" != "1" ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA GPU visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); nothing measured. Run it on a machine with a GPU (GPU_SH_SMOKE=1 checks the plumbing on CPU)."
    exit 0
fi

if [ "$SMOKE" = "1" ]; then
    DEV=cpu
    SCORER_ARGS=(--rows --quick --device cpu)
    VIT_ARGS=(--device cpu --config tiny32 --quick --no-slq)
    DEMO_ARGS=(--steps 20 --device cpu --no-compare --no-progress --threads 1)
    LIMITS=(300 300 300)
else
    DEV=cuda
    SCORER_ARGS=(--quick --device cuda)
    VIT_ARGS=(--device cuda --config tiny32 s16_224 b16_224 --images 2 --repeats 2)
    DEMO_ARGS=(--steps 500 --device cuda --no-progress)
    LIMITS=(150 220 80)
fi

LOG="${OUT%.md}.log"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
began=$(date +%s)
{
    echo "# GPU benchmark results"
    echo
    if rev=$(git rev-parse --short HEAD 2>/dev/null); then
        git diff --quiet HEAD 2>/dev/null || rev="$rev + uncommitted changes"
    else
        rev="not a git checkout"
    fi
    echo "Written by \`benchmarks/gpu.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC') (commit: $rev)."
    "$PY" - "$DEV" <<'EOF'
import sys, torch
dev = sys.argv[1]
name = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU (smoke run: numbers mean nothing)"
print(f"Device: {name}; torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if dev == "cuda" else ""))
EOF
    echo
} > "$OUT"
: > "$LOG"

section() {  # title, time limit (s), command...
    local title="$1" limit="$2"
    shift 2
    local start=$(date +%s) rc
    echo "== $title: $*" | tee -a "$LOG" >&2
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$TMP/out" 2>> "$LOG"
    rc=$?
    {
        echo "## $title"
        echo
        echo "Command: \`$*\` ($(( $(date +%s) - start )) s, exit status $rc$([ $rc -eq 124 ] && echo ": stopped at the ${limit} s limit"))."
        echo
        # Markdown tables pass through as they are; other lines become a fenced block around them.
        "$PY" - "$TMP/out" <<'EOF'
import sys
lines = open(sys.argv[1], errors="replace").read().splitlines()
fenced = False
for line in lines:
    table = line.startswith("|")
    if not table and not fenced and line.strip():
        print("```"); fenced = True
    elif table and fenced:
        print("```\n"); fenced = False
    if fenced or table:
        print(line)
if fenced:
    print("```")
EOF
        echo
    } >> "$OUT"
    cat "$TMP/out"
}

section "Scorer: exact vs floor vs paper listing, loop vs batched rows" "${LIMITS[0]}" \
    "$PY" benchmarks/bench_scorer.py "${SCORER_ARGS[@]}"
section "ViT: seconds per image and the 224 px projection" "${LIMITS[1]}" \
    "$PY" benchmarks/bench_vit.py "${VIT_ARGS[@]}"
section "Demo (train, monitor, curate)" "${LIMITS[2]}" \
    "$PY" -m jepa_monitor.cli demo --logdir "$TMP/demo" "${DEMO_ARGS[@]}"

echo "Total: $(( $(date +%s) - began )) s. Progress and warnings: \`$LOG\`." >> "$OUT"
echo "gpu.sh: wrote $OUT ($(( $(date +%s) - began )) s); stderr in $LOG" >&2
