#!/usr/bin/env bash
# bench/run.sh: rrbalancer next to other round-robin balancers, under wrk.
#
# Three nginx backends (127.0.0.1:9101-9103), each balancer on its own
# loopback port pinned to core 0, wrk and the backends on core 1, wrk run
# against every target in interleaved rounds.  Prints (and writes to
# OUT/summary.md) medians, latencies, peak RSS, errors and ratios.
# Everything it starts is stopped when it exits.  See --help.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SRC=$(cd "${RRBENCH_SRC:-$REPO}" && pwd) || { echo "rrbench: no folder ${RRBENCH_SRC:-}" >&2; exit 2; }

ROUNDS=3
TPUT_SECS=8
LIGHT_SECS=5
TPUT_CONNS=64
WARMUP_SECS=3
PYPY_WARMUP_SECS=15
ONLY=""
OUT=""
SETUP_ONLY=0

CPY_VENV=${RRBENCH_CPYTHON_VENV:-/tmp/rrbench-venv-cpython}
PYPY_VENV=${RRBENCH_PYPY_VENV:-/tmp/rrbench-venv-pypy}
LB_CPU=0
LOAD_CPU=1
HOST=127.0.0.1
BACKEND_PORTS=(9101 9102 9103)
ALL_TARGETS=(direct rr-cpython rr-pypy rr-workers2 naive nginx haproxy)
declare -A PORT=([direct]=9101 [rr-cpython]=9111 [rr-pypy]=9112 [rr-workers2]=9113
                 [naive]=9114 [nginx]=9115 [haproxy]=9116)

usage() {
    cat <<EOF
usage: bash bench/run.sh [options]

Targets: ${ALL_TARGETS[*]}
  direct       one backend, no balancer (the ceiling)
  rr-cpython   rrbalancer under twistd on CPython (health checks on, defaults)
  rr-pypy      the same on PyPy (${PYPY_WARMUP_SECS}s of load before measuring)
  rr-workers2  rrbalancer --workers 2 (skipped if twistd rrbalancer has no --workers)
  naive        bench/naive_rr.py: round robin over stock ReverseProxyResource
  nginx        nginx upstream round robin (keepalive 32, proxy_http_version 1.1)
  haproxy      haproxy balance roundrobin (http-reuse safe, nbthread 1)

Options:
  --rounds N            interleaved rounds (default $ROUNDS)
  --only A,B            measure only these targets (direct and naive are always
                        kept: every ratio is taken against them)
  --throughput-secs S   length of each wrk -t1 -c$TPUT_CONNS run (default $TPUT_SECS)
  --latency-secs S      length of each wrk -t1 -c1 run (default $LIGHT_SECS)
  --warmup-secs S       unrecorded load per target before round 1 (default $WARMUP_SECS)
  --pypy-warmup-secs S  the same for PyPy targets (default $PYPY_WARMUP_SECS)
  --out DIR             results folder (default /tmp/rrbench-YYYYmmdd-HHMMSS)
  --setup               install what is missing (Debian packages, venvs) and exit
  -h, --help            this text

Environment: RRBENCH_CPYTHON_VENV (default $CPY_VENV),
             RRBENCH_PYPY_VENV (default $PYPY_VENV),
             RRBENCH_SRC: the rrbalancer tree to measure (default $REPO).
The project is (re)installed into both venvs whenever its source changed.
EOF
}

say() { echo "rrbench: $*" >&2; }
die() { echo "rrbench: $*" >&2; exit 2; }

while (($#)); do
    case $1 in
        --rounds) ROUNDS=${2:?}; shift 2 ;;
        --only) ONLY=${2:?}; shift 2 ;;
        --throughput-secs) TPUT_SECS=${2:?}; shift 2 ;;
        --latency-secs) LIGHT_SECS=${2:?}; shift 2 ;;
        --warmup-secs) WARMUP_SECS=${2:?}; shift 2 ;;
        --pypy-warmup-secs) PYPY_WARMUP_SECS=${2:?}; shift 2 ;;
        --out) OUT=${2:?}; shift 2 ;;
        --setup) SETUP_ONLY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
for n in "$ROUNDS" "$TPUT_SECS" "$LIGHT_SECS" "$WARMUP_SECS" "$PYPY_WARMUP_SECS"; do
    [[ $n =~ ^[0-9]+$ ]] || die "expected a whole number, got '$n'"
done
((ROUNDS >= 1 && TPUT_SECS >= 1 && LIGHT_SECS >= 1)) || die "rounds and durations must be at least 1"

# ---------------------------------------------------------------- setup --

have() { command -v "$1" >/dev/null 2>&1; }

install_debs() {
    local p missing=()
    for p in nginx haproxy wrk pypy3 pypy3-venv curl util-linux; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    say "installing Debian packages: ${missing[*]}"
    # With policy-rc.d answering 101, no package starts its service.
    local policy=/usr/sbin/policy-rc.d ours=0 rc
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && ours=1
    fi
    timeout 900 apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive timeout 1800 apt-get install -y -qq --no-install-recommends "${missing[@]}"
    rc=$?
    ((ours)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install failed"
}

# source_stamp [DIR]: a fingerprint of the project's source (default $SRC);
# the venvs are reinstalled when it changes.
source_stamp() {
    (cd "${1:-$SRC}" && find . -path ./.git -prune -o -path ./bench -prune -o -path ./build -prune \
        -o -name '*.egg-info' -prune -o -name __pycache__ -prune -o -name dropin.cache -prune \
        -o -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

# make_venv DIR INTERPRETER: a venv holding the project, installed non-editable
# from a copy of the work tree (so the build leaves nothing in the repo).
make_venv() {
    local venv=$1 python=$2 stamp
    stamp=$(source_stamp)
    if [[ -x $venv/bin/twistd && -f $venv/.rrbench-stamp && $(cat "$venv/.rrbench-stamp") == "$stamp" ]]; then
        return 0
    fi
    if [[ ! -x $venv/bin/python ]]; then
        say "creating $venv ($python)"
        timeout 300 "$python" -m venv "$venv" || die "could not create $venv"
    fi
    say "installing the project into $venv"
    local src
    src=$(mktemp -d /tmp/rrbench-src.XXXXXX)
    tar -C "$SRC" --exclude=./.git --exclude=./bench --exclude=./build --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=dropin.cache -cf - . | tar -C "$src" -xf -
    # --only-binary=cryptography: PyPy 3.9 has wheels of an older
    # cryptography only (pip then picks a service-identity that takes it);
    # building the newest one from source needs Rust crates and a network.
    local log=$venv/rrbench-pip.log
    { timeout 1800 "$venv/bin/python" -m pip install --only-binary=cryptography --force-reinstall --no-deps "$src" &&
        timeout 1800 "$venv/bin/python" -m pip install --only-binary=cryptography "$src"; } > "$log" 2>&1
    local rc=$?
    ((rc == 0)) && source_stamp "$src" > "$venv/.rrbench-stamp"
    rm -rf "$src"
    if ((rc != 0)); then
        grep -v '^WARNING: Location' "$log" | tail -20 >&2
        die "could not install the project into $venv (log: $log)"
    fi
}

setup() {
    install_debs
    make_venv "$CPY_VENV" python3
    make_venv "$PYPY_VENV" pypy3
}

setup
if ((SETUP_ONLY)); then say "setup done"; exit 0; fi
for tool in nginx haproxy wrk curl taskset setsid; do have $tool || die "$tool is missing"; done

# ------------------------------------------------------------ targets --

if (($(nproc) < 2)); then
    say "only one CPU: balancers and load share core 0, numbers mean little"
    LOAD_CPU=0
fi

TWISTD_HELP=$(timeout 60 "$CPY_VENV/bin/twistd" rrbalancer --help 2>&1)
declare -A SKIP=()
grep -q -- '--workers' <<< "$TWISTD_HELP" ||
    SKIP[rr-workers2]="twistd rrbalancer --help lists no --workers option"
HAS_ADMIN=0
grep -q -- '--admin=' <<< "$TWISTD_HELP" && HAS_ADMIN=1

TARGETS=()
if [[ -n $ONLY ]]; then
    IFS=, read -ra wanted <<< "$ONLY"
    for t in direct naive "${wanted[@]}"; do
        [[ -n ${PORT[$t]:-} ]] || die "--only: no target '$t' (have: ${ALL_TARGETS[*]})"
        [[ " ${TARGETS[*]} " == *" $t "* ]] || TARGETS+=("$t")
    done
else
    TARGETS=("${ALL_TARGETS[@]}")
fi
kept=()
for t in "${TARGETS[@]}"; do
    if [[ -n ${SKIP[$t]:-} ]]; then say "skipping $t: ${SKIP[$t]}"; else kept+=("$t"); fi
done
TARGETS=("${kept[@]}")

listening() {  # listening PORT: is anything listening on this TCP port?
    local hex
    hex=$(printf ':%04X' "$1")
    awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
for p in "${BACKEND_PORTS[@]}"; do listening "$p" && die "port $p is already taken"; done
for t in "${TARGETS[@]}"; do
    [[ $t == direct ]] && continue
    listening "${PORT[$t]}" && die "port ${PORT[$t]} for $t is already taken"
    [[ $t == rr-cpython || $t == rr-pypy ]] && ((HAS_ADMIN)) && listening $((PORT[$t] + 10)) &&
        die "port $((PORT[$t] + 10)) for the admin API of $t is already taken"
done

[[ -n $OUT ]] || OUT=/tmp/rrbench-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"/{conf,logs,tmp,wrk} || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS=$OUT/results.tsv

# ---------------------------------------------------------- processes --

declare -A PGID=()
cleanup() {
    local t g
    trap - EXIT INT TERM
    for t in "${!PGID[@]}"; do kill -TERM -- "-${PGID[$t]}" 2>/dev/null; done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        local alive=0
        for g in "${PGID[@]}"; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.3
    done
    for g in "${PGID[@]}"; do kill -KILL -- "-$g" 2>/dev/null; done
}
trap cleanup EXIT
trap 'say interrupted; exit 130' INT TERM

# launch NAME CPU CMD...: start CMD pinned to CPU in a new session (so a
# process group of its own), output to logs/NAME.log; remember its group.
launch() {
    local name=$1 cpu=$2 pidfile=$OUT/tmp/$1.pgid
    shift 2
    rm -f "$pidfile"
    # From OUT/tmp: twistd puts its working directory on sys.path, and run
    # from the repo it would import the work tree instead of the venv's copy.
    (cd "$OUT/tmp" && exec setsid bash -c 'echo $$ > "$0"; exec taskset -c "$1" "${@:2}"' \
        "$pidfile" "$cpu" "$@" > "$OUT/logs/$name.log" 2>&1 < /dev/null) &
    for _ in $(seq 50); do [[ -s $pidfile ]] && break; sleep 0.1; done
    [[ -s $pidfile ]] || die "could not start $name"
    PGID[$name]=$(cat "$pidfile")
}

# group_pids NAME: the processes of a launched target (its process group
# and any descendants that left it).
group_pids() {
    local g=${PGID[$1]:-}
    [[ -n $g ]] || return 0
    local f line rest pid
    declare -A ppid_of=() member=()
    for f in /proc/[0-9]*/stat; do
        read -r line < "$f" 2>/dev/null || continue
        pid=${f#/proc/}; pid=${pid%/stat}
        rest=${line##*) }
        set -- $rest   # state ppid pgrp ...
        ppid_of[$pid]=$2
        [[ $3 == "$g" ]] && member[$pid]=1
    done
    local changed=1
    while ((changed)); do
        changed=0
        for pid in "${!ppid_of[@]}"; do
            [[ -z ${member[$pid]:-} && -n ${member[${ppid_of[$pid]}]:-} ]] && { member[$pid]=1; changed=1; }
        done
    done
    printf '%s\n' "${!member[@]}"
}

peak_rss_kb() {
    local sum=0 pid kb
    for pid in "$@"; do
        kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
        sum=$((sum + ${kb:-0}))
    done
    echo "$sum"
}

wait_ok() {  # wait_ok URL SECONDS: until it answers 200
    local i
    for ((i = 0; i < $2 * 5; i++)); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" 2>/dev/null) == 200 ]] && return 0
        sleep 0.2
    done
    return 1
}

# ------------------------------------------------------------ configs --

body_of() {  # a 100-byte body naming backend $1
    local text="backend-$1 of 3, 127.0.0.1:${BACKEND_PORTS[$1 - 1]}, rrbalancer bench "
    printf '%s%s' "$text" "$(printf '%*s' $((99 - ${#text})) '' | tr ' ' '=')"
}

nginx_common() {  # nginx_common NAME: the http{} preamble, all paths under OUT
    cat <<EOF
worker_processes 1;
daemon off;
pid $OUT/tmp/$1.pid;
error_log $OUT/logs/$1.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path $OUT/tmp/$1-body;
    proxy_temp_path $OUT/tmp/$1-proxy;
    fastcgi_temp_path $OUT/tmp/$1-fastcgi;
    uwsgi_temp_path $OUT/tmp/$1-uwsgi;
    scgi_temp_path $OUT/tmp/$1-scgi;
    default_type text/plain;
EOF
}

write_configs() {
    local i p
    {
        nginx_common backends
        for i in 1 2 3; do
            echo "    server { listen $HOST:${BACKEND_PORTS[i - 1]} backlog=4096; return 200 \"$(body_of $i)\\n\"; }"
        done
        echo "}"
    } > "$OUT/conf/backends.conf"
    {
        nginx_common nginx
        echo "    upstream backends {"
        for p in "${BACKEND_PORTS[@]}"; do echo "        server $HOST:$p;"; done
        cat <<EOF
        keepalive 32;
    }
    server {
        listen $HOST:${PORT[nginx]} backlog=4096;
        location / {
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    } > "$OUT/conf/nginx.conf"
    {
        cat <<EOF
global
    nbthread 1
    maxconn 4000

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse safe

frontend fe
    bind $HOST:${PORT[haproxy]}
    default_backend be

backend be
    balance roundrobin
EOF
        for i in 1 2 3; do echo "    server b$i $HOST:${BACKEND_PORTS[i - 1]}"; done
    } > "$OUT/conf/haproxy.cfg"
}

BACKEND_URLS=()
for p in "${BACKEND_PORTS[@]}"; do BACKEND_URLS+=("http://$HOST:$p"); done

rr_args() {  # rr_args PORT [ADMIN]: rrbalancer's flags for a listener on PORT
    local u
    echo -n "--port tcp:$1:interface=$HOST"
    # The admin API (where there is one) listens by default on one fixed
    # port; each instance gets its own, PORT + 10, so that they can coexist
    # (or ADMIN, e.g. 'none': it is refused with more than one worker).
    ((HAS_ADMIN)) && echo -n " --admin ${2:-tcp:$(($1 + 10)):interface=$HOST}"
    for u in "${BACKEND_URLS[@]}"; do echo -n " --backend $u"; done
}

start_target() {
    local t=$1
    case $t in
        direct) ;;
        rr-cpython)
            launch "$t" $LB_CPU "$CPY_VENV/bin/twistd" -n --pidfile= rrbalancer $(rr_args "${PORT[$t]}") ;;
        rr-pypy)
            launch "$t" $LB_CPU "$PYPY_VENV/bin/twistd" -n --pidfile= rrbalancer $(rr_args "${PORT[$t]}") ;;
        rr-workers2)
            # Two workers need two cores: they share the load generator's.
            launch "$t" "$LB_CPU,$LOAD_CPU" "$CPY_VENV/bin/twistd" -n --pidfile= rrbalancer --workers 2 $(rr_args "${PORT[$t]}" none) ;;
        naive)
            launch "$t" $LB_CPU "$CPY_VENV/bin/python" "$HERE/naive_rr.py" --port "${PORT[$t]}" "${BACKEND_URLS[@]}" ;;
        nginx)
            launch "$t" $LB_CPU nginx -p "$OUT/tmp" -e "$OUT/logs/nginx.err" -c "$OUT/conf/nginx.conf" ;;
        haproxy)
            launch "$t" $LB_CPU haproxy -db -f "$OUT/conf/haproxy.cfg" ;;
    esac
}

url_of() { echo "http://$HOST:${PORT[$1]}/"; }

# rr_check TARGET: 30 sequential requests (one keep-alive connection) must
# visit the three backends in a fixed rotation; direct must stay on backend 1.
rr_check() {
    local t=$1 seq urls=() i ok=1
    for i in $(seq 30); do urls+=("$(url_of "$t")"); done
    seq=$(timeout 60 curl -s --max-time 5 "${urls[@]}" | grep -o 'backend-[0-9]' | cut -d- -f2 | tr -d '\n')
    if [[ $t == direct ]]; then
        [[ $seq =~ ^1{30}$ ]] || ok=0
    else
        ((${#seq} == 30)) || ok=0
        [[ $(fold -w1 <<< "${seq:0:3}" | sort | tr -d '\n') == 123 ]] || ok=0
        for ((i = 3; i < ${#seq}; i++)); do [[ ${seq:i:1} == "${seq:i-3:1}" ]] || ok=0; done
    fi
    local verdict=FAIL
    ((ok)) && verdict=ok
    printf '%s\t%s\t%s\n' "$t" "$verdict" "$seq" >> "$OUT/rr-check.tsv"
    say "round robin $t: $verdict ($seq)"
    ((ok))
}

# ------------------------------------------------------------ measure --

# measure ROUND TARGET SHAPE: one wrk run -> one line of results.tsv.
measure() {
    local round=$1 t=$2 shape=$3 conns secs p pids=() rss=- rps p50 p99 err
    if [[ $shape == throughput ]]; then conns=$TPUT_CONNS secs=$TPUT_SECS; else conns=1 secs=$LIGHT_SECS; fi
    mapfile -t pids < <(group_pids "$t")
    if [[ $shape == throughput ]]; then
        for p in "${pids[@]}"; do echo 5 > "/proc/$p/clear_refs" 2>/dev/null; done
    fi
    local raw=$OUT/wrk/r$round-$t-$shape.txt
    timeout $((secs + 30)) taskset -c $LOAD_CPU \
        wrk -t1 -c"$conns" -d"${secs}s" --latency "$(url_of "$t")" > "$raw" 2>&1
    if [[ $shape == throughput && ${#pids[@]} -gt 0 ]]; then
        mapfile -t pids < <(group_pids "$t")
        rss=$(peak_rss_kb "${pids[@]}")
    fi
    # req/s, p50 ms, p99 ms, errors (non-2xx/3xx + socket errors)
    local line
    line=$(awk '
        function ms(v) { n = v + 0; if (v ~ /us$/) return n / 1000; if (v ~ /ms$/) return n
                         if (v ~ /m$/) return n * 60000; if (v ~ /s$/) return n * 1000; return n }
        /^Requests\/sec:/ { rps = $2 }
        $1 == "50%" { p50 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        /Non-2xx or 3xx responses:/ { err += $NF }
        /Socket errors:/ { gsub(/,/, ""); err += $4 + $6 + $8 + $10 }
        END { printf "%s\t%s\t%s\t%d", (rps == "" ? 0 : rps), (p50 == "" ? "nan" : p50),
                     (p99 == "" ? "nan" : p99), err }' "$raw")
    [[ $line == 0$'\t'* ]] && say "wrk gave no result for $t ($shape), see $raw"
    printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$t" "$shape" "$line" "$rss" >> "$RESULTS"
    IFS=$'\t' read -r rps p50 p99 err <<< "$line"
    printf 'rrbench: [round %s/%s] %-10s %-12s %9s req/s  p50 %8s ms  p99 %8s ms  errors %s  rss %s kB\n' \
        "$round" "$ROUNDS" "$shape" "$t" "$rps" "$p50" "$p99" "$err" "$rss" >&2
    sleep 0.5
}

warmup_of() { if [[ $1 == *pypy* ]]; then echo "$PYPY_WARMUP_SECS"; else echo "$WARMUP_SECS"; fi; }

versions() {
    echo "- date: $(date -Is); host: $(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine makes numbers noisy)"
    echo "- rrbalancer: $SRC, at commit $(cd "$SRC" && git rev-parse --short HEAD 2>/dev/null || echo '?') plus any uncommitted changes (source hash $(source_stamp | cut -c1-12))"
    echo "- CPython: $("$CPY_VENV/bin/python" -c 'import sys, twisted; print(sys.version.split()[0], "/ Twisted", twisted.__version__)')"
    echo "- PyPy: $("$PYPY_VENV/bin/python" -c 'import sys, twisted; print(".".join(map(str, sys.pypy_version_info[:3])), "(Python", sys.version.split()[0] + ") / Twisted", twisted.__version__)')"
    echo "- nginx $(nginx -v 2>&1 | cut -d/ -f2), haproxy $(haproxy -v | awk 'NR == 1 {print $3}'), wrk $(wrk -v 2>&1 | awk 'NR == 1 {print $2}')"
}

# --------------------------------------------------------------- main --

say "output in $OUT"
VERSIONS=$(versions)
echo "$VERSIONS" >&2
write_configs

launch backends $LOAD_CPU nginx -p "$OUT/tmp" -e "$OUT/logs/backends.err" -c "$OUT/conf/backends.conf"
for p in "${BACKEND_PORTS[@]}"; do
    wait_ok "http://$HOST:$p/" 15 || die "backend on port $p did not come up (see $OUT/logs)"
done
for t in "${TARGETS[@]}"; do start_target "$t"; done

: > "$OUT/rr-check.tsv"
RR_FAILED=0
ready=()
for t in "${TARGETS[@]}"; do
    if ! wait_ok "$(url_of "$t")" 30; then
        say "$t did not answer 200 on $(url_of "$t"); left out (log: $OUT/logs/$t.log)"
        tail -5 "$OUT/logs/$t.log" >&2 2>/dev/null
        printf '%s\tFAIL\tno answer\n' "$t" >> "$OUT/rr-check.tsv"
        RR_FAILED=1
    elif rr_check "$t"; then
        ready+=("$t")
    else
        say "$t is left out: it does not rotate over the backends"
        RR_FAILED=1
    fi
done
TARGETS=("${ready[@]}")
((${#TARGETS[@]})) || die "nothing to measure"

n=${#TARGETS[@]}
total=0
for t in "${TARGETS[@]}"; do total=$((total + $(warmup_of "$t"))); done
say "$n targets x $ROUNDS rounds: about $((total + (TPUT_SECS + LIGHT_SECS + 1) * n * ROUNDS)) s"
for t in "${TARGETS[@]}"; do
    w=$(warmup_of "$t")
    ((w > 0)) || continue
    say "warming up $t for ${w}s"
    timeout $((w + 30)) taskset -c $LOAD_CPU wrk -t1 -c"$TPUT_CONNS" -d"${w}s" "$(url_of "$t")" \
        > "$OUT/wrk/warmup-$t.txt" 2>&1
done

printf 'round\ttarget\tshape\trps\tp50_ms\tp99_ms\terrors\tpeak_rss_kb\n' > "$RESULTS"
for ((r = 1; r <= ROUNDS; r++)); do
    for shape in throughput light; do
        # Each round starts one target further on, so none is always first.
        for ((i = 0; i < n; i++)); do measure "$r" "${TARGETS[(i + r - 1) % n]}" "$shape"; done
    done
done

{
    echo "# rrbalancer benchmark"
    echo
    echo "$VERSIONS"
    echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    [[ -n ${SKIP[rr-workers2]:-} && " ${ALL_TARGETS[*]} " == *" rr-workers2 "* ]] &&
        echo "- rr-workers2 skipped: ${SKIP[rr-workers2]}"
    echo
    echo "Round robin (30 sequential requests on one connection):"
    awk -F'\t' '{ printf "%s%s %s (%s)", (NR > 1 ? "; " : ""), $1, $2, $3 } END { print "" }' "$OUT/rr-check.tsv"
    "$CPY_VENV/bin/python" "$HERE/summarize.py" "$RESULTS" "${TARGETS[*]}" "$TPUT_CONNS" "$TPUT_SECS" "$LIGHT_SECS"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
say "summary: $OUT/summary.md; raw wrk output: $OUT/wrk"
exit $RR_FAILED
