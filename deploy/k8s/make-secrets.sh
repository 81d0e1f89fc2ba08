#!/bin/sh
# Writes the files the Secrets of a deployment are generated from (overlays/example/kustomization.yaml):
#
#   deploy/k8s/make-secrets.sh [DIR] [WORKERS] [NAMESPACE] [SITE...]
#
# DIR (default: overlays/example/secrets next to this script) gets
#   ca.crt ca.key          a new CA (ca.key is not put in any Secret: keep it somewhere safe, or delete it)
#   tls.crt tls.key        the coordinator's certificate, for the names workers use to reach it:
#                          fedblock-coordinator[.NAMESPACE[.svc[.cluster.local]]] and the pod's own name
#   tokens.yaml            the coordinator's --auth-tokens: a hashed line per worker worker-0 .. worker-(WORKERS-1)
#                          and per SITE
#   worker-tokens.env      the workers' tokens, one line `NAME=TOKEN` each (the Secret fedblock-worker-tokens)
#   admin-tokens.yaml      the coordinator's --admin-tokens: a hashed line for the operator `admin`
#   admin.token            that operator's token (for `fedblock admin`; not put in any Secret)
# WORKERS (default 2) must match the worker StatefulSet's replicas; NAMESPACE (default fedblock) the
# kustomization's namespace; each SITE names a site of several pods (the Job's name in
# overlays/multinode-site/: all its pods are one worker, with one token). Needs openssl and
# `fedblock` (or FEDBLOCK=/path/to/fedblock); both, and the SITE names, are checked before anything
# is written. The CA and the certificate are valid for 365 days.
# An existing DIR with these files is refused: delete it first to start over.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here/overlays/example/secrets}
workers=${2:-2}
ns=${3:-fedblock}
if [ "$#" -gt 3 ]; then shift 3; else set --; fi   # "$@": the SITE names
fedblock=${FEDBLOCK:-fedblock}

# Check the tools before writing anything: a run that stopped half way (say, after the CA) would
# leave files that make a rerun refuse.
for tool in openssl "$fedblock"; do
    if ! command -v "$tool" > /dev/null 2>&1; then
        echo "make-secrets.sh: $tool not found (on PATH, or set FEDBLOCK=/path/to/fedblock); nothing written" >&2
        exit 1
    fi
done

for site in "$@"; do
    case "$site" in
        worker-[0-9]* | *[!A-Za-z0-9._-]*)
            echo "make-secrets.sh: $site: not a site name (letters, digits, '.', '_', '-'; not worker-N); nothing written" >&2
            exit 1 ;;
    esac
done

mkdir -p "$dir"
if [ -e "$dir/tls.key" ] || [ -e "$dir/tokens.yaml" ]; then
    echo "make-secrets.sh: $dir already holds secrets; delete them first" >&2
    exit 1
fi
umask 077

# CA and the coordinator's certificate (the same openssl commands as the main README's Operations).
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=fedblock CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2> /dev/null
svc=fedblock-coordinator
printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local,DNS:%s-0.%s-headless.%s.svc.cluster.local,DNS:localhost,IP:127.0.0.1\n' \
    "$svc" "$svc" "$ns" "$svc" "$ns" "$svc" "$ns" "$svc" "$svc" "$ns" > "$dir/tls.ext"
openssl req -newkey rsa:2048 -nodes -subj "/CN=$svc" -keyout "$dir/tls.key" -out "$dir/tls.csr" 2> /dev/null
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 365 \
    -extfile "$dir/tls.ext" -out "$dir/tls.crt" 2> /dev/null
rm -f "$dir/tls.csr" "$dir/tls.ext" "$dir/ca.srl"

# `fedblock token --name NAME` prints the token on its first line (after the last ": ") and the
# hashed line for the tokens file on its last line.
token() { "$fedblock" token --name "$1"; }
: > "$dir/tokens.yaml"
: > "$dir/worker-tokens.env"
worker_token() {
    out=$(token "$1")
    printf '%s=%s\n' "$1" "$(printf '%s\n' "$out" | head -n 1 | awk -F': ' '{print $NF}')" >> "$dir/worker-tokens.env"
    printf '%s\n' "$out" | tail -n 1 >> "$dir/tokens.yaml"
}
i=0
while [ "$i" -lt "$workers" ]; do
    worker_token "worker-$i"
    i=$((i + 1))
done
for site in "$@"; do
    worker_token "$site"
done
out=$(token admin)
printf '%s\n' "$out" | head -n 1 | awk -F': ' '{print $NF}' > "$dir/admin.token"
printf '%s\n' "$out" | tail -n 1 > "$dir/admin-tokens.yaml"

# Readable by the user who runs kubectl only; kustomize reads them, the pods get them as Secrets.
chmod 600 "$dir"/*
echo "wrote $dir: ca.crt ca.key tls.crt tls.key tokens.yaml worker-tokens.env ($workers workers${1+, sites: $*}) admin-tokens.yaml admin.token"
