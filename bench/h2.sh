#!/usr/bin/env bash
# bench/h2.sh: HTTP/2 over TLS, rrbalancer beside NGINX, under h2load.
#
# One nginx backend (127.0.0.1:9131, a 100-byte body) on core 1 with
# h2load; rrbalancer (tls:9132) and an NGINX front (9133, ssl and http2,
# keepalive to the backend) each on core 0, measured in interleaved
# rounds.  Prints the median requests/s of each, and rrbalancer's as a
# fraction of NGINX's.  Everything it starts is stopped when it exits.
#
# usage: bash bench/h2.sh [ROUNDS [SECONDS [CLIENTS [STREAMS]]]]
#        (defaults 3 rounds of 8 s, 8 connections of 10 streams each)
# Environment: RRBENCH_PYTHON, the interpreter with rrbalancer's
# dependencies (default python3; the balancer measured is this tree's),
# RRBENCH_WARMUP, seconds of unrecorded load first (default 3; PyPy's JIT
# wants 15 or more).

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PYTHON=${RRBENCH_PYTHON:-python3}
ROUNDS=${1:-3}
SECS=${2:-8}
CLIENTS=${3:-8}
STREAMS=${4:-10}
HOST=127.0.0.1
BACKEND=9131
declare -A PORT=([rrbalancer]=9132 [nginx]=9133)

die() { echo "h2bench: $*" >&2; exit 2; }
for tool in nginx h2load openssl curl taskset; do
    command -v "$tool" > /dev/null || die "$tool is missing (apt-get install nginx nghttp2-client openssl curl util-linux)"
done

OUT=$(mktemp -d /tmp/h2bench-XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null; done
    wait 2> /dev/null
    rm -rf "$OUT"
}
trap cleanup EXIT
mkdir -p "$OUT/certs" "$OUT/tmp"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:$HOST" \
    -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2> /dev/null || die "openssl cannot make a certificate"
cat "$OUT/key.pem" "$OUT/cert.pem" > "$OUT/certs/default.pem"

# nginx 1.25.1 has "http2 on"; older releases take it on the listen line.
version=$(nginx -v 2>&1 | sed 's|.*/||')
if printf '%s\n1.25.1\n' "$version" | sort -V -C; then
    listen="listen $HOST:${PORT[nginx]} ssl http2 backlog=4096;"
else
    listen="listen $HOST:${PORT[nginx]} ssl backlog=4096; http2 on;"
fi

common() {
    cat <<EOF
worker_processes 1;
daemon off;
pid $OUT/tmp/$1.pid;
error_log $OUT/tmp/$1.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $OUT/tmp/$1-body;
    proxy_temp_path $OUT/tmp/$1-proxy;
    fastcgi_temp_path $OUT/tmp/$1-fastcgi;
    uwsgi_temp_path $OUT/tmp/$1-uwsgi;
    scgi_temp_path $OUT/tmp/$1-scgi;
    default_type text/plain;
EOF
}
{
    common backend
    echo "    server { listen $HOST:$BACKEND backlog=4096; return 200 \"$(printf '%099d' 0)\\n\"; }"
    echo "}"
} > "$OUT/backend.conf"
{
    common front
    cat <<EOF
    upstream backends { server $HOST:$BACKEND; keepalive 32; }
    server {
        $listen
        http2_max_concurrent_streams 100;
        ssl_certificate $OUT/cert.pem;
        ssl_certificate_key $OUT/key.pem;
        location / {
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
} > "$OUT/front.conf"

launch() {  # launch CPU COMMAND...
    local cpu=$1; shift
    taskset -c "$cpu" "$@" > "$OUT/tmp/launch-${#pids[@]}.log" 2>&1 &
    pids+=($!)
}
launch 1 nginx -p "$OUT/tmp" -c "$OUT/backend.conf"
launch 0 nginx -p "$OUT/tmp" -c "$OUT/front.conf"
export PYTHONPATH=$REPO
launch 0 "$PYTHON" "$(dirname "$(command -v "$PYTHON")")/twistd" -n --pidfile= \
    --logfile="$OUT/tmp/rrbalancer.log" rrbalancer \
    --port "tls:${PORT[rrbalancer]}:interface=$HOST" --tls-cert "$OUT/certs" \
    --backend "http://$HOST:$BACKEND" --admin none

for target in rrbalancer nginx; do
    for _ in $(seq 100); do
        out=$(curl -s --http2 --cacert "$OUT/cert.pem" -o /dev/null -w '%{http_code} %{http_version}' \
            "https://$HOST:${PORT[$target]}/" 2> /dev/null) && [[ $out == "200 2" ]] && break
        sleep 0.2
    done
    [[ ${out:-} == "200 2" ]] || { tail -n 5 "$OUT"/tmp/*.log "$OUT"/tmp/*.err >&2; die "$target does not answer in HTTP/2"; }
done

measure() {  # measure TARGET SECONDS: requests/s
    taskset -c 1 h2load -c "$CLIENTS" -m "$STREAMS" -D "$2" "https://$HOST:${PORT[$1]}/" 2>&1 |
        awk '/^finished in/ { gsub(",", ""); print $4 } /^status codes:/ { bad = $5 + $7 + $9 } END { if (bad) print "errors" > "/dev/stderr" }'
}

WARMUP=${RRBENCH_WARMUP:-3}
measure rrbalancer "$WARMUP" > /dev/null
measure nginx "$WARMUP" > /dev/null
declare -A results=()
for round in $(seq "$ROUNDS"); do
    for target in rrbalancer nginx; do
        r=$(measure "$target" "$SECS")
        echo "h2bench: round $round, $target: $r req/s" >&2
        results[$target]+="$r "
    done
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
rr=$(echo "${results[rrbalancer]}" | median)
ng=$(echo "${results[nginx]}" | median)
echo "| target | req/s (median of $ROUNDS, h2load -c $CLIENTS -m $STREAMS, ${SECS}s) |"
echo "|---|---:|"
echo "| rrbalancer ($("$PYTHON" -c 'import platform; print(platform.python_implementation())')) | $rr |"
echo "| NGINX $version | $ng |"
awk -v a="$rr" -v b="$ng" 'BEGIN { printf "rrbalancer / NGINX: %.3f\n", a / b }'
