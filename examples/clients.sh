#!/usr/bin/env bash
# Four curl clients against the frontend, one line each: what the client saw.
#
#   examples/clients.sh [URL]
#
# URL defaults to $FRONTEND_URL or https://localhost:8443/order; the certificates are
# read from $PKI_DIR (default examples/certs, made by examples/make_pki.py). Only the
# good client gets an answer; the frontend's TLS server handshake spans say why each
# of the others was turned away (error.type).
set -u

url=${1:-${FRONTEND_URL:-https://localhost:8443/order}}
pki=${PKI_DIR:-examples/certs}

call() {
  local name=$1 out
  shift
  # --fail: an HTTP error is a failure too; --noproxy: the demo is on loopback.
  if out=$(curl --silent --show-error --fail --max-time 10 --noproxy '*' \
      --cacert "$pki/ca.crt" "$@" "$url" 2>&1); then
    printf '%-17s %s\n' "$name:" "$out"
  else
    printf '%-17s rejected (%s)\n' "$name:" "$(printf '%s' "$out" | tr '\n' ' ')"
  fi
}

call "good certificate" --cert "$pki/client.crt" --key "$pki/client.key"
call "wrong CA" --cert "$pki/wrong-ca.crt" --key "$pki/wrong-ca.key"
call "expired" --cert "$pki/expired.crt" --key "$pki/expired.key"
call "no certificate"
