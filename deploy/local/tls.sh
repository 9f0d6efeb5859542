#!/usr/bin/env bash
# deploy/local/tls.sh DIR — makes the local stack's test PKI in DIR (once: an existing, complete
# DIR is left as it is). For tests and the `--tls` profile of stack.sh only, never production.
#
#   ca.crt ca.key                 the test CA every server certificate below is signed by
#   server.crt server.key         CN=localhost, SAN DNS:localhost + IP:127.0.0.1 (PostgreSQL,
#                                 Redis and Kafka all present this one)
#   client.crt client.key         CN=cqrs, extendedKeyUsage clientAuth (mutual TLS)
#   wrong-name.crt wrong-name.key signed by the test CA but for DNS:not-this-host.invalid only:
#                                 a server presenting it must be refused (host name check)
#   other-ca.crt other-ca.key     a second CA that signed nothing here: a client trusting only
#                                 it must refuse every server above (chain check)
#
# Keys are unencrypted PKCS#8 PEM (what Kafka's PEM keystore, PostgreSQL and Redis all read),
# mode 0600; certificates 0644. EC P-256 keeps generation under a second.
set -euo pipefail

DIR=${1:?usage: tls.sh DIR}
DAYS=${CQRS_TLS_DAYS:-825}
FILES=(ca.crt ca.key server.crt server.key client.crt client.key wrong-name.crt wrong-name.key
    other-ca.crt other-ca.key)

complete() {
    local f
    for f in "${FILES[@]}"; do [[ -s $DIR/$f ]] || return 1; done
}
complete && exit 0
command -v openssl >/dev/null || {
    echo "[tls] openssl is missing (apt-get install openssl)" >&2
    exit 1
}

mkdir -p "$DIR"
umask 077
tmp=$(mktemp -d "$DIR/.make.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# ca NAME CN: a self-signed CA.
ca() {
    key "$tmp/$1.key"
    openssl req -x509 -new -key "$tmp/$1.key" -sha256 -days "$DAYS" -subj "/CN=$2" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$tmp/$1.crt" 2>/dev/null
}

# leaf NAME CN EXTENSIONS: a certificate signed by the test CA.
leaf() {
    key "$tmp/$1.key"
    openssl req -new -key "$tmp/$1.key" -subj "/CN=$2" -out "$tmp/$1.csr" 2>/dev/null
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
        "$3" >"$tmp/$1.ext"
    openssl x509 -req -in "$tmp/$1.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" -CAcreateserial \
        -sha256 -days "$DAYS" -extfile "$tmp/$1.ext" -out "$tmp/$1.crt" 2>/dev/null
}

ca ca "cqrs local test CA"
ca other-ca "cqrs untrusted test CA"
leaf server localhost $'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth'
leaf client cqrs 'extendedKeyUsage=clientAuth'
leaf wrong-name not-this-host.invalid $'subjectAltName=DNS:not-this-host.invalid\nextendedKeyUsage=serverAuth'

for f in "${FILES[@]}"; do
    case $f in
    *.crt) chmod 0644 "$tmp/$f" ;;
    *) chmod 0600 "$tmp/$f" ;;
    esac
    mv "$tmp/$f" "$DIR/$f"
done
echo "[tls] test PKI in $DIR" >&2
