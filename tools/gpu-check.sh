#!/usr/bin/env bash
# The whole GPU check in one script (README: "Checking the GPU path").
#
#   OUT=/some/folder tools/gpu-check.sh              # on a CUDA machine, from the repository root
#   OUT=/tmp/check PRESET=tiny tools/gpu-check.sh    # the same steps on a CPU, in minutes
#
# 1. trains the preset end to end as a user types it (data, VAE, CLIP, latents, U-Net), timed alone;
# 2. evaluates it (prompt accuracy, FID with intervals) and runs every notebook in quick mode;
# 3. runs `minisd bench unet mfu host` at the preset's sizes;
# 4. on CUDA, times Stable Diffusion 1.5's real sizes (tools/sd_full_size.py: random weights, 512×512, 50 steps).
# Everything lands in $OUT: train.log, eval.log, metrics.json, bench.json, bench.log, one
# nb-NN.log per notebook, and summary.txt (what passed, and the figures). The package is used
# from this tree (PYTHONPATH); wheels for what the machine lacks (nbval, ipykernel, ipywidgets,
# diffusers) are installed from ./wheels when that folder exists (tools/gpu-wheels.sh fills it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
PRESET=${PRESET:-gpu}
PY=${PYTHON:-python3}
# NOTEBOOKS="notebooks/11_*.ipynb" runs only those (default: every numbered notebook)
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/summary.txt"; }

if [ -d wheels ]; then  # two groups: the second (chapter 11, CLIP's tokenizer) may be left out of ./wheels to save room
  $PY -m pip install -q --no-index --find-links wheels nbval ipykernel ipywidgets diffusers \
    > "$OUT/pip.log" 2>&1 && say "installed from ./wheels" || say "pip install from ./wheels failed (see pip.log)"
  $PY -m pip install -q --no-index --find-links wheels transformers regex ftfy >> "$OUT/pip.log" 2>&1 \
    && say "installed transformers, regex, ftfy from ./wheels" || say "no transformers/regex/ftfy (see pip.log)"
fi
{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; $PY -c "import torch; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"; } > "$OUT/machine.txt" 2>&1
say "machine: $(tail -1 "$OUT/machine.txt"), preset $PRESET"
grep -q " cuda True " "$OUT/machine.txt" && cuda=1 || cuda=0
# notebooks run at once: on a GPU machine as many as cores; on a CPU one, since each uses every core and two at
# once crawl (JOBS=… overrides)
JOBS=${JOBS:-$([ "$cuda" = 1 ] && nproc || echo 1)}

# 1. Training, alone on the machine so that its wall time is clean.
rm -rf "$OUT/run"
t0=$(date +%s)
$PY -m minisd train --preset "$PRESET" --out "$OUT/run" > "$OUT/train.log" 2>&1
rc_train=$?
say "train: exit $rc_train in $(( $(date +%s) - t0 )) s wall"
[ -f "$OUT/run/metrics.json" ] && cp "$OUT/run/metrics.json" "$OUT/metrics.json"

# 2. Evaluation and the notebooks (quick mode): side by side on a GPU machine; one after the other on a
#    CPU, where both would compete for the same cores (on 2 cores a notebook ran 12 times slower beside the
#    eval, and nbval gave up waiting for its output)
rc_eval=1
if [ $rc_train = 0 ]; then
  ( t1=$(date +%s); $PY -m minisd eval --run "$OUT/run" > "$OUT/eval.log" 2>&1; echo $? > "$OUT/eval.rc"
    echo "$(( $(date +%s) - t1 ))" > "$OUT/eval.seconds" ) &
  eval_pid=$!
  [ "$cuda" = 1 ] || wait $eval_pid
fi
t2=$(date +%s)
ls ${NOTEBOOKS:-notebooks/[0-9]*.ipynb} | xargs -P "$JOBS" -I{} sh -c \
  'nb={}; log="$0/nb-$(basename "$nb" .ipynb).log"; MINISD_QUICK=1 "$1" -m pytest -q -p no:cacheprovider \
   --nbval-lax --nbval-current-env "$nb" > "$log" 2>&1; echo "exit $?" >> "$log"' "$OUT" "$PY"
say "notebooks (quick mode, $JOBS at once): $(( $(date +%s) - t2 )) s"
for log in "$OUT"/nb-*.log; do say "  $(basename "$log" .log): $(tail -2 "$log" | head -1)"; done
if [ $rc_train = 0 ]; then
  wait $eval_pid 2>/dev/null
  rc_eval=$(cat "$OUT/eval.rc")
  say "eval: exit $rc_eval in $(cat "$OUT/eval.seconds") s"
  [ -f "$OUT/run/metrics.json" ] && cp "$OUT/run/metrics.json" "$OUT/metrics.json"
fi

# 3. Speed figures at the preset's sizes.
t3=$(date +%s)
$PY -m minisd bench unet mfu host --preset "$PRESET" --device auto --no-compile --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
rc_bench=$?
say "bench: exit $rc_bench in $(( $(date +%s) - t3 )) s"

# 4. Stable Diffusion 1.5 at its real size (random weights in SD 1.5's layout): float16 loading, export, sampling
#    512×512 images in minisd (float32, bfloat16) and diffusers, 50 steps. On a CPU only with SD_CHECK=1 (minutes).
rc_sd=0
if [ "$cuda" = 1 ] || [ "${SD_CHECK:-0}" = 1 ]; then
  t4=$(date +%s)
  timeout 420 $PY tools/sd_full_size.py --work "$OUT/sd15" --steps "${SD_STEPS:-50}" > "$OUT/sd15.log" 2>&1
  rc_sd=$?
  cp "$OUT/sd15/sd_full_size.json" "$OUT/" 2>/dev/null; rm -rf "$OUT/sd15"  # 4 GB of random weights
  say "sd 1.5 layout: exit $rc_sd in $(( $(date +%s) - t4 )) s"
fi

{ echo; echo "== training"; grep -E "precision|trained in|wrote" "$OUT/train.log"
  echo "== eval"; grep -v "it/s\]" "$OUT/eval.log" 2>/dev/null
  echo "== bench"; grep -vE "^\[|^$" "$OUT/bench.log"
  echo "== sd 1.5 layout"; grep -E "^(SD|minisd|diffusers|the two|peak)" "$OUT/sd15.log" 2>/dev/null; } >> "$OUT/summary.txt"
failed=$(grep -L "^exit 0$" "$OUT"/nb-*.log | wc -l)
say "done: train $rc_train, eval $rc_eval, bench $rc_bench, sd $rc_sd, notebooks failed $failed, total $(( $(date +%s) - start )) s"
[ $rc_train = 0 ] && [ "$rc_eval" = 0 ] && [ $rc_bench = 0 ] && [ $rc_sd = 0 ] && [ "$failed" = 0 ]
