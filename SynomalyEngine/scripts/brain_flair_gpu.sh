#!/usr/bin/env bash
# Brain-FLAIR training candidates at once on one GPU (small networks leave most of it idle), then each
# measured on the selection patients. One command for the whole candidate stage of the recipe:
#
#   bash SynomalyEngine/scripts/brain_flair_gpu.sh OUT_DIR [PACK] [TRAIN_SECONDS] [SELECT_SECONDS] [STEPS]
#
# PACK: pack_brain_cases.py's file, for a machine without ../shared/data. A candidate stops at the last
# milestone (STEPS, default "1000 3000 6000") that fits in TRAIN_SECONDS; selection stops after SELECT_SECONDS
# with what it measured so far (selection-*.json). JOBS ("candidate part" pairs) and INFERENCE (names of
# brain_flair_candidates.INFERENCE) choose what runs; the defaults are the tumour-free candidates on the
# fitting patients, the default one also on all 28 (the final model, should it win), measured as the
# shipped model runs. The first round (600 steps) ran JOBS="skip-small fit,skip-small all,mask-small fit,
# mask-small all,mask-deep fit,mask-deep all,mask-wide fit" with INFERENCE=default.
set -u
out=$1
pack=${2:-}
train_s=${3:-7200}
select_s=${4:-3600}
steps=${5:-1000 3000 6000}
jobs=${JOBS:-skip-small fit,skip-small all,skip-deep fit,skip-wide fit}
inference=${INFERENCE:-one-stage-volume-scale-blur3.5-min20}
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
packarg=()
if [ -n "$pack" ]; then packarg=(--pack "$pack"); fi
mkdir -p "$out"
IFS=, read -r -a job_list <<<"$jobs"
candidates=()
for job in "${job_list[@]}"; do
  read -r candidate part <<<"$job"
  if [ "$part" = fit ]; then candidates+=("$candidate"); fi
  timeout "$train_s" "$py" "$here/brain_flair_candidates.py" train "$candidate" "$part" "$out" \
    --steps $steps --deadline $((train_s - 45)) "${packarg[@]}" >"$out/train-$candidate-$part.log" 2>&1 &
done
wait
for candidate in "${candidates[@]}"; do
  timeout "$select_s" "$py" "$here/brain_flair_candidates.py" select "$out" --models "$candidate-fit-*.safetensors" \
    --inference $inference --results "selection-$candidate.json" "${packarg[@]}" >"$out/select-$candidate.log" 2>&1 &
done
wait
