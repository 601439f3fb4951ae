#!/usr/bin/env bash
# `make run`: exports mnist v1 (and v2, kept aside for the README walk-through) and serves
# v1 with aspire-server until Ctrl-C.
set -euo pipefail
bin="$1"; demo="$2"; port="$3"
mkdir -p "$demo"
if [ ! -d "$demo/mnist_model/1" ]; then
    "$bin/mnist-export" --training-iteration 100 --model-version 1 "$demo/mnist_model"
fi
if [ ! -d "$demo/mnist_model/2" ]; then
    "$bin/mnist-export" --training-iteration 2000 --model-version 2 "$demo/mnist_model"
fi
rm -rf "$demo/monitored"
mkdir -p "$demo/monitored"
cp -r "$demo/mnist_model/1" "$demo/monitored/"
cat <<MSG

Serving mnist v1 from $demo/monitored on 127.0.0.1:$port. In another shell:
  $bin/mnist-client --num_tests=1000 --server=127.0.0.1:$port --concurrency=10
  cp -r $demo/mnist_model/2 $demo/monitored/      # v2 goes live within seconds
Ctrl-C stops the server.

MSG
exec "$bin/aspire-server" --enable_batching --host=127.0.0.1 --port="$port" \
    --model_name=mnist --model_base_path="$demo/monitored"
