#!/usr/bin/env bash
# gen-certs.sh — a small CA, a localhost server certificate and a client certificate signed
# by it, for trying luacallout over TLS and mTLS:
#
#   scripts/gen-certs.sh [OUTDIR]          (default ./certs)
#   luacallout --cert_chain_path OUTDIR/server.pem --private_key_path OUTDIR/server.key script.lua
#   (mTLS: add --client_ca_path OUTDIR/ca.pem; clients present OUTDIR/client.pem + client.key)
#
# Clients (Envoy, grpcurl, tests) trust OUTDIR/ca.pem. Keys are written mode 0600; never
# commit them. Existing files are not overwritten: remove OUTDIR to start over.
set -euo pipefail

outdir=${1:-./certs}
days_ca=3650
days_server=825

command -v openssl >/dev/null || { echo "gen-certs.sh: openssl not found" >&2; exit 1; }

mkdir -p "$outdir"
for f in ca.pem ca.key server.pem server.key client.pem client.key; do
  if [[ -e "$outdir/$f" ]]; then
    echo "gen-certs.sh: $outdir/$f already exists; remove $outdir to regenerate" >&2
    exit 1
  fi
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
umask 077

# The CA: EC P-256, may sign leaf certificates only.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/ca.key"
openssl req -new -x509 -key "$tmp/ca.key" -sha256 -days "$days_ca" \
  -subj "/O=luacallout test CA/CN=luacallout test CA" \
  -set_serial "0x$(openssl rand -hex 16)" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "subjectKeyIdentifier=hash" \
  -out "$tmp/ca.pem"

# The server: EC P-256, CN and SANs for local use.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/server.key"
openssl req -new -key "$tmp/server.key" -subj "/O=luacallout/CN=localhost" -out "$tmp/server.csr"
cat > "$tmp/server.ext" <<'EXT'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EXT
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
  -set_serial "0x$(openssl rand -hex 16)" -sha256 -days "$days_server" \
  -extfile "$tmp/server.ext" -out "$tmp/server.pem" 2>"$tmp/x509.log" \
  || { cat "$tmp/x509.log" >&2; exit 1; }

# A client, for mTLS (--client_ca_path ca.pem): what Envoy presents.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/client.key"
openssl req -new -key "$tmp/client.key" -subj "/O=luacallout/CN=luacallout client" \
  -out "$tmp/client.csr"
cat > "$tmp/client.ext" <<'EXT'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EXT
openssl x509 -req -in "$tmp/client.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
  -set_serial "0x$(openssl rand -hex 16)" -sha256 -days "$days_server" \
  -extfile "$tmp/client.ext" -out "$tmp/client.pem" 2>"$tmp/x509.log" \
  || { cat "$tmp/x509.log" >&2; exit 1; }

openssl verify -CAfile "$tmp/ca.pem" "$tmp/server.pem" "$tmp/client.pem" >/dev/null

chmod 644 "$tmp/ca.pem" "$tmp/server.pem" "$tmp/client.pem"
mv "$tmp/ca.key" "$tmp/ca.pem" "$tmp/server.key" "$tmp/server.pem" "$tmp/client.key" \
  "$tmp/client.pem" "$outdir/"

echo "wrote $outdir/ca.pem      CA certificate: clients trust this"
echo "wrote $outdir/ca.key      CA private key (keep it, or delete it if you will not sign more)"
echo "wrote $outdir/server.pem  server certificate for localhost, 127.0.0.1, ::1 (valid $days_server days)"
echo "wrote $outdir/server.key  server private key"
echo "wrote $outdir/client.pem  client certificate, for mTLS (--client_ca_path $outdir/ca.pem)"
echo "wrote $outdir/client.key  client private key"
echo
echo "  luacallout --cert_chain_path $outdir/server.pem --private_key_path $outdir/server.key script.lua"
