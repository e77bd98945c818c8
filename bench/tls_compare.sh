#!/usr/bin/env bash
# Rough TLS comparison (issue 14): clusterd terminating TLS vs nginx terminating TLS, in
# front of the same Node app, keep-alive and new-connection, plus both in plain HTTP for
# reference. Needs nginx, wrk, openssl, curl, node (apt-get install nginx wrk).
# Fixed ports 18101-18446 on 127.0.0.1. Not yet part of bench/run.
# Usage: bench/tls_compare.sh target/release/clusterd
set -euo pipefail
BIN=$1
D=$(mktemp -d /tmp/tlsbench.XXXX)
cd "$D"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=a.test \
  -addext subjectAltName=DNS:a.test -keyout key.pem -out cert.pem -days 2 2>/dev/null
NODE="require('http').createServer((q,s)=>s.end('ok')).listen(process.env.PORT)"
P1=18101; P2=18102; PC=18443; PN=18444
PORT=$P1 node -e "$NODE" & N1=$!
PORT=$P2 node -e "$NODE" & N2=$!
mkdir apps state logs
cat > apps/b.yaml <<Y
apiVersion: clusterd/v1
kind: App
metadata: {name: b}
spec:
  command: [node, -e, "$NODE"]
  instances: 2
  listen:
    - port: $PC
      address: 127.0.0.1
      tls: {certificates: [{cert: $D/cert.pem, key: $D/key.pem}]}
Y
cat > apps/c.yaml <<Y
apiVersion: clusterd/v1
kind: App
metadata: {name: c}
spec:
  command: [node, -e, "$NODE"]
  instances: 2
  listen:
    - port: 18445
      address: 127.0.0.1
Y
setsid "$BIN" daemon --apps-dir apps --socket "$D/sock" --state-dir state --log-dir logs > daemon.out 2>&1 & CD=$!
cat > nginx.conf <<N
worker_processes 2;
pid $D/nginx.pid;
error_log $D/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  upstream up { server 127.0.0.1:$P1; server 127.0.0.1:$P2; keepalive 64; }
  server {
    listen 127.0.0.1:$PN ssl;
    ssl_certificate $D/cert.pem; ssl_certificate_key $D/key.pem;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 127.0.0.1:18446;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
N
nginx -c "$D/nginx.conf" -p "$D"
for i in $(seq 100); do curl -sk https://127.0.0.1:$PC/ >/dev/null && break; sleep 0.2; done
for i in $(seq 100); do curl -sk http://127.0.0.1:18445/ >/dev/null && break; sleep 0.2; done
for i in $(seq 100); do curl -sk https://127.0.0.1:$PN/ >/dev/null && break; sleep 0.2; done
for name in clusterd-tls:https://127.0.0.1:$PC nginx-tls:https://127.0.0.1:$PN clusterd-plain:http://127.0.0.1:18445 nginx-plain:http://127.0.0.1:18446; do
  n=${name%%:*}; u=${name#*:}
  wrk -t1 -c50 -d3s $u/ >/dev/null
  ka=$(wrk -t1 -c50 -d10s $u/ | awk '/Requests\/sec/{print $2}')
  nc=$(wrk -t1 -c50 -d10s -H 'Connection: close' $u/ | awk '/Requests\/sec/{print $2}')
  echo "$n keepalive_rps=$ka newconn_rps=$nc"
done
kill "$(cat $D/nginx.pid)"; kill -TERM $CD; kill $N1 $N2
wait $CD 2>/dev/null || true
