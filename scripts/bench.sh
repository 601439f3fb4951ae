#!/usr/bin/env bash
# `make bench`: measures the stack on this machine, on loopback, and prints one table.
#
# It builds the release binaries, makes the two models once under $BENCH_DIR (MNIST with
# mnist-export; ResNet-18 with scripts/make_resnet18.py), starts its own etcd (ports
# 23790/23800), aspire-discovery serving both models, then for batching off and on in turn
# one aspire-worker and aspire-router, and drives each model direct and through the
# router at every concurrency with `aspire-bench load`. Then the ceilings: the transport
# ceiling (a bare PredictionService in aspire-bench, same request and answer sizes) and
# the compute ceiling (the model's forward pass in-process). The table and the target
# checks go to the terminal and into BENCHMARKS.md (its generated section).
#
# Variables: BENCH_SECONDS (measured window per run, default 5), BENCH_RESNET_SECONDS (the
# same for ResNet-18, default 3 × BENCH_SECONDS), BENCH_WARMUP (default 1),
# BENCH_CONCURRENCY ("1 8 32 128"), BENCH_MODELS ("mnist resnet18"), BENCH_CLIENT_THREADS
# (load generator runtime threads, default 1), BENCH_DIR (.aspire/bench), BENCH_OUT
# (BENCHMARKS.md; empty: write nothing), BENCH_SKIP_BUILD=1 (use target/release as is).
# Everything listens on 127.0.0.1; everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${BENCH_SECONDS:-5}
# One ResNet-18 batch of 32 takes about a second here: its windows are longer, so each
# holds many batches.
resnet_seconds=${BENCH_RESNET_SECONDS:-$(( seconds * 3 ))}
warmup=${BENCH_WARMUP:-1}
concurrencies=${BENCH_CONCURRENCY:-"1 8 32 128"}
models=${BENCH_MODELS:-"mnist resnet18"}
client_threads=${BENCH_CLIENT_THREADS:-1}
dir=${BENCH_DIR:-.aspire/bench}
out=${BENCH_OUT-BENCHMARKS.md}
bin=target/release
py=.venv/bin/python

etcd_client=23790; etcd_peer=23800
worker_port=23801; worker_metrics=23802
router_port=23803; router_metrics=23804
transport_port=23805
ports="$etcd_client $etcd_peer $worker_port $worker_metrics $router_port $router_metrics $transport_port"

started=$(date +%s)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

log() { printf '[bench %3ds] %s\n' "$(( $(date +%s) - started ))" "$*" >&2; }

# --- Processes: every one started is recorded and stopped on exit. -------------------
pids=()
stop_pid() {
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    trap - INT TERM EXIT
    for (( i=${#pids[@]}-1; i>=0; i-- )); do
        stop_pid "${pids[i]}"
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for port in $ports; do
    if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
        echo "bench: something already listens on 127.0.0.1:$port (another make bench?); stop it first" >&2
        exit 1
    fi
done

# --- Binaries and models. -------------------------------------------------------------
if [ "${BENCH_SKIP_BUILD:-}" != 1 ]; then
    log "building release binaries"
    cargo build --release --workspace --bins
fi
for b in aspire-bench aspire-worker aspire-router aspire-discovery mnist-export; do
    [ -x "$bin/$b" ] || { echo "bench: $bin/$b is missing; build it (cargo build --release --workspace --bins)" >&2; exit 1; }
done

mkdir -p "$dir/models" "$dir/logs"
dir=$(cd "$dir" && pwd)
if [[ " $models " == *" mnist "* ]] && [ ! -f "$dir/models/mnist/1/model.pt" ]; then
    log "making the MNIST model (2000 training iterations)"
    rm -rf "$dir/models/mnist"
    "$bin/mnist-export" --training-iteration 2000 --model-version 1 "$dir/models/mnist" >&2
fi
if [[ " $models " == *" resnet18 "* ]] && [ ! -f "$dir/models/resnet18/1/model.pt" ]; then
    if ! "$py" -c 'import torchvision' 2>/dev/null; then
        # torchvision's other dependencies, pinned; --no-deps keeps pip off torch itself.
        log "installing torchvision 0.26.0 into the venv"
        "$py" -m pip install -q --no-deps torchvision==0.26.0 numpy==2.2.6 pillow==11.3.0 >&2
    fi
    log "making the ResNet-18 model (random weights)"
    rm -rf "$dir/models/resnet18"
    "$py" scripts/make_resnet18.py "$dir/models/resnet18" >&2
fi

# Per model: signature, input, shape, output, output shape.
model_args() {
    case "$1" in
        mnist) echo "predict_images images 1,784 scores 1,10" ;;
        resnet18) echo "serving_default input 1,3,224,224 logits 1,1000" ;;
        *) echo "bench: unknown model $1" >&2; exit 1 ;;
    esac
}

results="$dir/results.jsonl"
: >"$results"

# --- The stack: etcd and discovery once, worker and router per batching setting. ------
rm -rf "$dir/etcd"
etcd --name aspire-bench --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_client" --advertise-client-urls "http://127.0.0.1:$etcd_client" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "aspire-bench=http://127.0.0.1:$etcd_peer" >"$dir/logs/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$etcd_client/health" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fs "http://127.0.0.1:$etcd_client/health" >/dev/null || { echo "bench: etcd did not start; see $dir/logs/etcd.log" >&2; exit 1; }
etcd="--etcd-endpoints=http://127.0.0.1:$etcd_client"
prefix="--prefix=/aspire-bench"

{
    echo "model_config_list {"
    for m in $models; do
        echo "  config { name: '$m' base_path: '$dir/models/$m' model_platform: 'pytorch' }"
    done
    echo "}"
} >"$dir/models.config"
"$bin/aspire-discovery" "$etcd" "$prefix" --model_config_file="$dir/models.config" \
    >"$dir/logs/discovery.log" 2>&1 &
pids+=($!)

# Waits until `aspire-bench load` gets an answer from $1 for model $2 (bounded).
wait_serving() {
    local server=$1 model=$2 tries=$3
    read -r sig input shape _ _ <<<"$(model_args "$model")"
    for _ in $(seq "$tries"); do
        if "$bin/aspire-bench" load --server "$server" --model "$model" --signature "$sig" \
            --input-name "$input" --shape "$shape" --concurrency 1 --duration-secs 0.05 \
            --warmup-secs 0 --timeout-secs 30 >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    echo "bench: $model is not served at $server; see $dir/logs/" >&2
    exit 1
}

# run_load SERVER MODEL PATH BATCHING C [WATCH...]
run_load() {
    local server=$1 model=$2 path=$3 batching=$4 c=$5
    shift 5
    read -r sig input shape _ _ <<<"$(model_args "$model")"
    local window=$seconds
    [ "$model" = resnet18 ] && window=$resnet_seconds
    local extra=()
    for w in "$@"; do extra+=(--watch "$w"); done
    if [ "$path" != transport ]; then
        extra+=(--worker-metrics-url "http://127.0.0.1:$worker_metrics/metrics")
    fi
    "$bin/aspire-bench" load --server "$server" --model "$model" --signature "$sig" \
        --input-name "$input" --shape "$shape" --concurrency "$c" \
        --duration-secs "$window" --warmup-secs "$warmup" --runtime-threads "$client_threads" \
        --tag "model=$model" --tag "path=$path" --tag "batching=$batching" \
        "${extra[@]}" --out "$results" >/dev/null
}

worker_pid=""; router_pid=""
# Three worker setups: batching off, on (default flags), and on with one batch thread
# (so each forward pass gets every CPU as intra-op threads), the last one direct only.
for setup in off on one; do
    flags=()
    batching=$setup
    case "$setup" in
        on) flags+=(--enable_batching) ;;
        one) flags+=(--enable_batching --num-batch-threads=1); batching="on, 1 batch thread" ;;
    esac
    log "batching $batching: starting aspire-worker${flags[*]:+ (${flags[*]})}"
    "$bin/aspire-worker" "$etcd" "$prefix" --host=127.0.0.1 --port=$worker_port \
        --metrics-port=$worker_metrics --worker-id=bench-worker \
        --storage-root="$dir/models" "${flags[@]}" \
        >"$dir/logs/worker-batching-$setup.log" 2>&1 &
    worker_pid=$!
    pids+=("$worker_pid")
    for m in $models; do wait_serving "127.0.0.1:$worker_port" "$m" 240; done
    if [ "$setup" != one ]; then
        "$bin/aspire-router" "$etcd" "$prefix" --host=127.0.0.1 --port=$router_port \
            --metrics-port=$router_metrics >"$dir/logs/router-batching-$setup.log" 2>&1 &
        router_pid=$!
        pids+=("$router_pid")
        for m in $models; do wait_serving "127.0.0.1:$router_port" "$m" 60; done
    fi
    # Let start-up settle (etcd writes, the router's first health checks).
    sleep 2

    for m in $models; do
        for c in $concurrencies; do
            if [ -n "$router_pid" ]; then
                log "$m, batching $batching, c=$c: direct, then through the router"
            else
                log "$m, batching $batching, c=$c: direct"
            fi
            run_load "127.0.0.1:$worker_port" "$m" direct "$batching" "$c" "worker=$worker_pid"
            if [ -n "$router_pid" ]; then
                run_load "127.0.0.1:$router_port" "$m" router "$batching" "$c" \
                    "worker=$worker_pid" "router=$router_pid"
            fi
        done
    done
    stop_pid "$router_pid"; router_pid=""
    stop_pid "$worker_pid"; worker_pid=""
done

# --- Transport ceiling: the same requests against a server that runs nothing. ---------
for m in $models; do
    read -r sig _ _ output output_shape <<<"$(model_args "$m")"
    "$bin/aspire-bench" transport-ceiling --host 127.0.0.1 --port $transport_port --model "$m" \
        --signature "$sig" --output-name "$output" --output-shape "$output_shape" --max-secs 900 \
        2>"$dir/logs/transport-$m.log" &
    transport_pid=$!
    pids+=("$transport_pid")
    wait_serving "127.0.0.1:$transport_port" "$m" 20
    for c in $concurrencies; do
        log "$m: transport ceiling, c=$c"
        run_load "127.0.0.1:$transport_port" "$m" transport - "$c" "server=$transport_pid"
    done
    stop_pid "$transport_pid"
done

# --- Compute ceiling: the forward pass in-process, at the sizes the batcher formed. ----
for m in $models; do
    read -r _ _ shape _ _ <<<"$(model_args "$m")"
    sizes=$("$bin/aspire-bench" batch-sizes --results "$results" --model "$m" --base 1,2,4,8,16,32)
    log "$m: compute ceiling at batch sizes $sizes"
    "$bin/aspire-bench" compute-ceiling --model-dir "$dir/models/$m/1" --shape "$shape" \
        --batch-sizes "$sizes" --duration-secs "$seconds" --warmup-secs "$warmup" \
        --tag "model=$m" --out "$results" >/dev/null 2>"$dir/logs/compute-$m.log"
done

# --- The report. ------------------------------------------------------------------------
elapsed=$(( $(date +%s) - started ))
cpu_model=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
report_args=(
    --meta "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
    --meta "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    --meta "machine=${cpu_model:-unknown CPU}, $(nproc) cores ($(lscpu | sed -n 's/^CPU(s):[[:space:]]*//p' | head -1) CPUs listed), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, $(uname -sr)"
    --meta "load average (1, 5, 15 min)=$load_before before, $(cut -d' ' -f1-3 /proc/loadavg) after"
    --meta "runs=each measured for ${seconds} s (ResNet-18: ${resnet_seconds} s) after a warm-up of ${warmup} s and until every caller has had an answer; concurrency $concurrencies; load generator: $client_threads runtime thread(s), one HTTP/2 connection per 16 callers; compute ceiling: ${seconds} s per batch size"
    --meta "servers=one aspire-worker and one aspire-router with default flags (--enable_batching for batching on; --enable_batching --num-batch-threads=1 for the on, 1 batch thread rows, direct only), etcd and aspire-discovery, all on 127.0.0.1"
    --meta "make bench took=${elapsed} s"
)
echo
echo "## Aspire benchmark"
echo
if [ -n "$out" ]; then
    "$bin/aspire-bench" report --results "$results" "${report_args[@]}" --write "$out"
    echo
    echo "(written to $out; raw results in $results)"
else
    "$bin/aspire-bench" report --results "$results" "${report_args[@]}"
fi
