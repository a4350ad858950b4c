#!/usr/bin/env bash
# Make the TLS certificates and SuperNode authentication keys of a synthfed consortium.
#
#   deploy/make-certs.sh OUT_DIR SUPERLINK_NAME [SITE ...]
#
# OUT_DIR/ca.crt, ca.key           consortium CA (keep ca.key offline after this)
# OUT_DIR/superlink.crt, .key      TLS certificate of the coordinator's SuperLink; its subject
#                                  alternative names are SUPERLINK_NAME (DNS name or IP address)
#                                  and, for loopback tests, 127.0.0.1 / localhost
# OUT_DIR/nodes/SITE(.pub)         per-site SuperNode authentication key pair (ECDSA P-384,
#                                  OpenSSH format, as flower-supernode expects). The private key
#                                  goes to the site only; the .pub is registered at the SuperLink
#                                  with `flwr supernode register`.
#
# Refuses to overwrite existing files. Needs openssl and ssh-keygen.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 OUT_DIR SUPERLINK_NAME [SITE ...]" >&2
    exit 2
fi
out=$1
name=$2
shift 2
days=${SYNTHFED_CERT_DAYS:-825}

for tool in openssl ssh-keygen; do
    command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 1; }
done
for site in "$@"; do
    [[ $site =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || { echo "error: bad site name $site" >&2; exit 2; }
done

umask 077
mkdir -p "$out/nodes"

if [[ -e $out/ca.key ]]; then
    echo "keeping existing CA in $out" >&2
else
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -days "$days" -nodes \
        -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=synthfed consortium CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        2>/dev/null
fi

if [[ -e $out/superlink.key ]]; then
    echo "keeping existing SuperLink certificate in $out" >&2
else
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san="IP:$name"; else san="DNS:$name"; fi
    san="$san,DNS:localhost,IP:127.0.0.1"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -nodes \
        -keyout "$out/superlink.key" \
        -out "$out/superlink.csr" -subj "/CN=$name" 2>/dev/null
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
        "$san" > "$out/superlink.ext"
    openssl x509 -req -in "$out/superlink.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
        -CAcreateserial -days "$days" -sha384 -extfile "$out/superlink.ext" \
        -out "$out/superlink.crt" 2>/dev/null
    rm -f "$out/superlink.csr" "$out/superlink.ext" "$out/ca.srl"
fi

for site in "$@"; do
    if [[ -e $out/nodes/$site ]]; then
        echo "keeping existing key of $site" >&2
        continue
    fi
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "synthfed-$site" -f "$out/nodes/$site"
done

chmod 600 "$out"/*.key "$out"/nodes/* 2>/dev/null || true
chmod 644 "$out/ca.crt" "$out/superlink.crt" "$out"/nodes/*.pub 2>/dev/null || true
echo "made: $out/ca.crt $out/superlink.crt $out/superlink.key${*:+ and node keys for: $*}"
