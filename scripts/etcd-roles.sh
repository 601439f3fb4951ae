#!/usr/bin/env bash
# Creates the etcd roles (and, optionally, users) with which each Aspire service may write
# only the keys it owns. Run it as etcd's root user; it is safe to run again (after adding
# a model, say). It does not enable auth: do that once with `etcdctl auth enable`.
#
# Usage:
#   scripts/etcd-roles.sh [--prefix /aspire] [--models mnist,resnet] [--password-dir DIR]
#
# etcdctl takes its connection from its own environment, e.g.
#   ETCDCTL_ENDPOINTS=https://etcd:2379 ETCDCTL_CACERT=ca.pem ETCDCTL_CERT=root.pem \
#   ETCDCTL_KEY=root-key.pem ETCDCTL_USER=root ETCDCTL_PASSWORD=... scripts/etcd-roles.sh
#
# Roles (etcd grants key ranges, not patterns):
#   aspire-reader     read    PREFIX/ (the whole prefix: every service watches it)
#   aspire-worker     write   PREFIX/workers/
#   aspire-discovery  write   PREFIX/models/M/available and PREFIX/models/M/aspired
#   aspire-operator   write   PREFIX/models/M/pinned
# "models/*/pinned" is not a range: pins sort between other models' keys. With --models,
# discovery and operators get exact keys for each model named (run this again when a model
# is added; discovery is refused writes for a model missing here). Without --models both
# get PREFIX/models/ as a whole, so discovery could also write pins and operators
# available/aspired; workers stay confined to PREFIX/workers/ either way.
#
# With --password-dir DIR, each file DIR/<service> (discovery, worker, router, operator)
# creates the user aspire-<service> with that file's content as password (if it does not
# exist yet) and grants it aspire-reader and its own role (the router only reads).
set -euo pipefail

prefix=/aspire
models=""
password_dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#*=}"; shift ;;
        --models) models="$2"; shift 2 ;;
        --models=*) models="${1#*=}"; shift ;;
        --password-dir) password_dir="$2"; shift 2 ;;
        --password-dir=*) password_dir="${1#*=}"; shift ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "etcd-roles.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$prefix" in
    /*) ;;
    *) echo "etcd-roles.sh: --prefix '$prefix' must start with '/'" >&2; exit 2 ;;
esac
prefix="${prefix%/}"
export ETCDCTL_API=3
ctl() { etcdctl "$@" >/dev/null; }

role() {
    etcdctl role get "$1" >/dev/null 2>&1 || ctl role add "$1"
}

role aspire-reader
ctl role grant-permission --prefix=true aspire-reader read "$prefix/"
role aspire-worker
ctl role grant-permission --prefix=true aspire-worker readwrite "$prefix/workers/"
role aspire-discovery
role aspire-operator
if [[ -n "$models" ]]; then
    IFS=',' read -r -a names <<<"$models"
    for m in "${names[@]}"; do
        [[ -n "$m" ]] || continue
        ctl role grant-permission aspire-discovery readwrite "$prefix/models/$m/available"
        ctl role grant-permission aspire-discovery readwrite "$prefix/models/$m/aspired"
        ctl role grant-permission aspire-operator readwrite "$prefix/models/$m/pinned"
    done
else
    echo "etcd-roles.sh: no --models: discovery and operators may write all of $prefix/models/" >&2
    ctl role grant-permission --prefix=true aspire-discovery readwrite "$prefix/models/"
    ctl role grant-permission --prefix=true aspire-operator readwrite "$prefix/models/"
fi

if [[ -n "$password_dir" ]]; then
    for service in discovery worker router operator; do
        file="$password_dir/$service"
        [[ -f "$file" ]] || continue
        user="aspire-$service"
        if ! etcdctl user get "$user" >/dev/null 2>&1; then
            # The password goes through stdin, not the command line (`ps` shows that).
            ctl user add "$user" --interactive=false <"$file"
        fi
        ctl user grant-role "$user" aspire-reader
        if [[ "$service" != router ]]; then
            ctl user grant-role "$user" "aspire-$service"
        fi
    done
fi
echo "etcd-roles.sh: roles for $prefix are in place"
