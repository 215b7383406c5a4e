#!/usr/bin/env bash
# Two GPUs: the agreement check on one instance (Poisson, then FineServe Dense_lt10B with NB
# micro-bursts), then two instances (one per GPU) as one deployment, routed round-robin and
# least-outstanding under the same bursty schedule, with per-endpoint metrics.
#
#   WHEELS=.whl DATA=.gpu_data OUT=out bash benches/gpu_e2e/run_dual.sh
set -uo pipefail
WHEELS=${WHEELS:-.whl}; DATA=${DATA:-.gpu_data}; OUT=${OUT:-out}; PY=${PY:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT" ~/.cache/huggingface/hub /tmp/rep
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
log() { echo "[$(date +%T)] $*"; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
MODEL=/tmp/model
log "creating the model"; $PY "$HERE/make_model.py" $MODEL || exit 1
for g in 0 1; do
    CUDA_VISIBLE_DEVICES=$g setsid nohup $PY "$HERE/serve_timed.py" "$OUT/server_timing_$g.jsonl" \
        -- serve $MODEL --continuous-batching --port 800$g --host 127.0.0.1 \
        > /tmp/server_$g.log 2>&1 < /dev/null &
done
up() { $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:800$1/v1/models', timeout=2)"; }
for g in 0 1; do
    for i in $(seq 1 180); do up $g > /dev/null 2>&1 && break; sleep 1; done
    up $g || { tail -40 /tmp/server_$g.log; exit 1; }
done
FS="$PY -m fineserve.cli"
COMMON="--backend openai --model $MODEL --tokenizer $MODEL --disable-tqdm --warmup-requests 2 \
    --seed 1 --random-input-len 256 --random-output-len 64 --request-timeout 120"
ONE="--base-url http://127.0.0.1:8000"
TWO="--base-url http://127.0.0.1:8000 --base-url http://127.0.0.1:8001"
log "agreement: poisson 10 req/s on one instance"
$FS blast $COMMON $ONE --request-rate 10 --num-prompts 200 --output-file /tmp/poisson_10.json \
    --save-requests /tmp/poisson_10.parquet > /tmp/p.txt 2>&1; grep -E "Successful|P99 TTFT" /tmp/p.txt
log "agreement: Dense_lt10B (NB bursts) at time scale 0.1 (~13 req/s) on one instance"
$FS blast $COMMON $ONE --mode parametric --model-class Dense_lt10B --datasets-dir "$DATA" \
    --duration 10 --time-scale 0.1 --output-file /tmp/parametric.json \
    --save-requests /tmp/parametric.parquet > /tmp/q.txt 2>&1
grep -E "Traffic|Successful|Failed|P99 TTFT|scheduled ms" /tmp/q.txt
for run in poisson_10 parametric; do
    $PY "$HERE/agreement.py" /tmp/$run.parquet "$OUT/server_timing_0.jsonl" \
        --json /tmp/agree_$run.json > /dev/null || echo "agreement failed for $run"
done
for route in round-robin least-outstanding; do
    log "two instances, $route, Dense_lt10B at time scale 0.25 (~34 req/s)"
    $FS blast $COMMON $TWO --route $route --mode parametric --model-class Dense_lt10B \
        --datasets-dir "$DATA" --duration 10 --time-scale 0.25 \
        --output-file /tmp/route_$route.json --save-requests /tmp/route_$route.parquet \
        > /tmp/r.txt 2>&1; grep -E "Traffic|Successful|Failed|P99 TTFT|P99 E2E|800" /tmp/r.txt
done
$FS report /tmp/route_round-robin.parquet /tmp/route_least-outstanding.parquet \
    -o /tmp/rep/routing.html > /dev/null 2>&1 && cp /tmp/rep/routing_latency_cdfs.png \
    /tmp/rep/routing_breakdown.png "$OUT/"
$PY "$HERE/collect.py" /tmp "$OUT/summary.json" > /dev/null
$PY -c "
import json; d=json.load(open('$OUT/summary.json'))
for k, v in d.get('agreement', {}).items(): print(k, json.dumps(v))
for r in ('round-robin', 'least-outstanding'):
    m = json.load(open(f'/tmp/route_{r}.json'))
    print(r, {e: (round(s['p99_ttft_ms'], 1), s['completed']) for e, s in m['breakdown']['endpoint'].items()},
          'p99 ttft', round(m['p99_ttft_ms'], 1), 'p99 e2e', round(m['p99_e2el_ms'], 1))
"
log "done"
