#!/usr/bin/env bash
# `make run`: the whole stack on this machine, on loopback: etcd (its own data directory),
# aspire-discovery, two aspire-workers and aspire-router on :8500, serving mnist v1.
# Ctrl-C stops everything it started.
set -euo pipefail
bin="$1"; demo="$2"; port="$3"
etcd_client=2379; etcd_peer=2380
mkdir -p "$demo"
if [ ! -d "$demo/mnist_model/1" ]; then
    "$bin/mnist-export" --training-iteration 100 --model-version 1 "$demo/mnist_model"
fi
if [ ! -d "$demo/mnist_model/2" ]; then
    "$bin/mnist-export" --training-iteration 2000 --model-version 2 "$demo/mnist_model"
fi
rm -rf "$demo/monitored" "$demo/etcd" "$demo/logs"
mkdir -p "$demo/monitored" "$demo/logs"
cp -r "$demo/mnist_model/1" "$demo/monitored/"

pids=()
cleanup() {
    # Ignore a second Ctrl-C while stopping, so nothing is left running.
    trap '' INT TERM
    trap - EXIT
    echo; echo "stopping the stack"
    # Reverse order: router, workers (they deregister), discovery, then etcd.
    for (( i=${#pids[@]}-1; i>=0; i-- )); do
        kill -TERM "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
}
trap cleanup INT TERM EXIT

if (exec 3<>/dev/tcp/127.0.0.1/$etcd_client) 2>/dev/null; then
    echo "something already listens on 127.0.0.1:$etcd_client; stop it (or that etcd) first" >&2
    exit 1
fi
etcd --name aspire-demo --data-dir "$demo/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_client" --advertise-client-urls "http://127.0.0.1:$etcd_client" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "aspire-demo=http://127.0.0.1:$etcd_peer" >"$demo/logs/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$etcd_client/health" >/dev/null 2>&1 && break
    sleep 0.1
done
etcd="--etcd-endpoints=http://127.0.0.1:$etcd_client"

"$bin/aspire-discovery" "$etcd" --model_name=mnist --model_base_path="$demo/monitored" \
    >"$demo/logs/discovery.log" 2>&1 &
pids+=($!)
for i in 1 2; do
    # Workers load only from under --storage-root, whatever etcd names.
    "$bin/aspire-worker" "$etcd" --host=127.0.0.1 --port=$((port + i)) --worker-id="worker-$i" \
        --storage-root="$demo/monitored" --metrics-port=$((port + 1000 + i)) --enable_batching \
        >"$demo/logs/worker-$i.log" 2>&1 &
    pids+=($!)
done
"$bin/aspire-router" "$etcd" --host=127.0.0.1 --port="$port" --metrics-port=$((port + 1000)) >"$demo/logs/router.log" 2>&1 &
pids+=($!)

cat <<MSG

The stack is up (logs in $demo/logs/):
  etcd              127.0.0.1:$etcd_client
  aspire-discovery  watching $demo/monitored
  aspire-worker     127.0.0.1:$((port + 1)) (worker-1), 127.0.0.1:$((port + 2)) (worker-2)
  aspire-router     127.0.0.1:$port
  metrics           http://127.0.0.1:$((port + 1000))/metrics (router), :$((port + 1001)) and :$((port + 1002)) (workers)

In another shell (README.md walks through each step):
  $bin/mnist-client --num_tests=1000 --server=127.0.0.1:$port --concurrency=10
  cp -r $demo/mnist_model/2 $demo/monitored/
  $bin/aspirectl status
  etcdctl put /aspire/models/mnist/pinned 1
Ctrl-C stops everything.

MSG
# Run until Ctrl-C. A process that dies (a worker killed in the walk-through) leaves the
# rest running; its log says why.
wait
