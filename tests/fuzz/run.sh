#!/usr/bin/env bash
# Run the atheris fuzzers of tests/fuzz over their committed corpus.
#
#   tests/fuzz/run.sh [-t SECONDS] [--grow] [TARGET...]
#
# TARGET is request_head, response, headers or config (all by default);
# each runs for SECONDS (15 by default), one after the other.  Any crash
# (an invariant broken, an exception, a hang of 10 s) stops the run with
# status 1 and leaves the input that caused it in tests/fuzz/crashes/.
#
# New inputs go to a scratch folder and are forgotten, unless --grow is
# given: the corpus is then replaced by a minimized merge of itself and
# what the run found (libFuzzer's -merge=1), to be committed.
#
# PYTHON names the interpreter (python3 by default); it needs atheris
# (pip install atheris) and the project's dependencies.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-python3}
seconds=15
grow=0
targets=()
while (($#)); do
    case $1 in
        -t) seconds=$2; shift 2 ;;
        --grow) grow=1; shift ;;
        -h|--help) sed -n '2,16s/^# \{0,1\}//p' "$0"; exit 0 ;;
        -*) echo "fuzz: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
((${#targets[@]})) || targets=(request_head response headers config)

if ! "$python" -c 'import atheris' 2>/dev/null; then
    echo "fuzz: atheris cannot be imported by $python (pip install atheris)" >&2
    exit 3
fi

cd "$root"
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$here/crashes"

for target in "${targets[@]}"; do
    corpus=$here/corpus/$target
    module=tests.fuzz.fuzz_$target
    [[ -f $here/fuzz_$target.py ]] || { echo "fuzz: no target $target" >&2; exit 2; }
    dict=$here/http.dict
    [[ $target == config ]] && dict=$here/config.dict
    mkdir -p "$corpus" "$scratch/$target"
    log=$scratch/$target.log
    if ! "$python" -m "$module" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 \
        -dict="$dict" -artifact_prefix="$here/crashes/$target-" -print_final_stats=1 \
        "$scratch/$target" "$corpus" > "$log" 2>&1; then
        tail -n 60 "$log" >&2
        echo "fuzz: $target: CRASH; the input is in tests/fuzz/crashes/" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    found=$(find "$scratch/$target" -type f | wc -l)
    echo "fuzz: $target: ${runs:-?} inputs in ${seconds}s, no crash" \
        "($(find "$corpus" -type f | wc -l) in the corpus, $found new)"
    if ((grow)); then
        merged=$scratch/$target.merged
        mkdir -p "$merged"
        "$python" -m "$module" -merge=1 -timeout=10 -rss_limit_mb=1024 \
            "$merged" "$corpus" "$scratch/$target" > "$log.merge" 2>&1 \
            || { tail -n 30 "$log.merge" >&2; exit 1; }
        if [[ -z $(ls -A "$merged") ]]; then
            tail -n 30 "$log.merge" >&2
            echo "fuzz: $target: the merge kept nothing; corpus left as it was" >&2
            exit 1
        fi
        rm -rf "$corpus"
        mv "$merged" "$corpus"
        echo "fuzz: $target: corpus minimized to $(find "$corpus" -type f | wc -l) files," \
            "$(cat "$corpus"/* | wc -c) bytes"
    fi
done
rmdir "$here/crashes" 2>/dev/null || true
