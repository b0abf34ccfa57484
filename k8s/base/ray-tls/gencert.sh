#!/bin/sh
# Ray's TLS (RAY_USE_TLS=1): this pod's own key and certificate, made when the pod starts by an init container and
# signed by the Ray CA of the lookalike-ray-ca Secret (keys ca.crt and ca.key; docs/DEPLOY.md, "Network and pod
# security"). Only this init container mounts the CA's key; the pod's other containers read the files written
# here, in the pod's emptyDir at $OUT (0600, owned by the pod's user): tls.key, tls.crt and ca.crt.
# The names are those its peers dial: the pod's IP (raylets, workers), its Service, $TLS_SERVICE (the head's: GCS,
# Ray Client; Redis' for Redis) and loopback. Needs the openssl command (the lookalike image's Debian base has it).
set -eu
CA=${RAY_CA_DIR:-/etc/ray/ca}
OUT=${RAY_TLS_DIR:-/etc/ray/tls}
SVC="${TLS_SERVICE}"
NS="${POD_NAMESPACE}"
umask 077
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=${POD_NAME}" \
  -keyout "$OUT/tls.key" -out "$OUT/tls.csr" 2>/dev/null
cat > "$OUT/ext.cnf" <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:${POD_IP}, DNS:${SVC}, DNS:${SVC}.${NS}, DNS:${SVC}.${NS}.svc, DNS:${SVC}.${NS}.svc.${CLUSTER_DOMAIN:-cluster.local}
EXT
openssl x509 -req -in "$OUT/tls.csr" -CA "$CA/ca.crt" -CAkey "$CA/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
  -days "${RAY_TLS_DAYS:-825}" -sha256 -extfile "$OUT/ext.cnf" -out "$OUT/tls.crt" 2>/dev/null
cp "$CA/ca.crt" "$OUT/ca.crt"
rm -f "$OUT/tls.csr" "$OUT/ext.cnf"
echo "Ray TLS certificate for ${POD_NAME} (${POD_IP}) written to $OUT"
