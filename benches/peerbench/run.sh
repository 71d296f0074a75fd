#!/usr/bin/env bash
# Kalmar vs Squid with the shared loopback harness ../shared/peerbench (relative to the repo
# root; read-only: everything Kalmar needs beyond it is in this directory).
#
#   benches/peerbench/run.sh              # runs 1-5 (about 45 min on 2 cores)
#   benches/peerbench/run.sh main chain   # only some runs: main acl log chain cache
#
# Results: $OUT/<run>/summary.md (+ summary.json, raw.jsonl, meta.json); default OUT=/tmp/pb.
# The figures committed under benches/peerbench/results/ were made with this script.
#
#  1 main   all workloads, direct + squid + kalmar, 5 repetitions          (issue 2)
#  2 acl    http, 3 reps: Kalmar with 10,000 rules + 100,000 sources vs the shipped
#           policy, + squid                                                 (issue 3)
#  3 log    http, 3 reps: access log to a file vs to /dev/null, + squid.
#           Metrics cannot be switched off in Kalmar (always on).           (issue 6)
#  4 chain  http, 3 reps: client -> Kalmar -> Squid(13129) vs client -> Squid(13129);
#           both processes pinned to the proxy CPU                          (issue 4)
#  5 cache  http, 3 reps, origin with "expires 1h": Kalmar cache on vs Squid memory
#           cache (cache_mem 64 MB) vs nginx directly ("direct")           (issue 5)
#  6 ab     two Kalmar builds or configurations in one interleaved run, + direct + squid:
#           A = $KALMAR_A (binary, default $BIN) with env $KALMAR_A_ENV, named $A_NAME;
#           B = $BIN with env $KALMAR_B_ENV, named $B_NAME; workloads $AB_WORKLOADS
#           (http,connect), $AB_REPS repetitions (5), the order rotated every repetition
#           (pbx.py --rotate). Not in the default set.
#           e.g. before/after a change:  KALMAR_A=/path/old-kalmar A_NAME=before B_NAME=after run.sh ab
#                a config switch:        KALMAR_A_ENV=KALMAR_TLS__PORTS= A_NAME=tls-off B_NAME=tls-on \
#                                        AB_WORKLOADS=connect,bulk run.sh ab
#           (the tunnel ClientHello check: `tls.ports = []` turns the whole stage off;
#           `tls.sni = "off"` only stops comparing the name, the hello is still read)
#  7 tunnel the tunnel data path (issue 15): $TUNNEL_PEERS (direct,squid,g3proxy) and one Kalmar
#           per configuration in $TUNNEL_VARIANTS (space-separated NAME=ENV,ENV...; an item
#           @PATH runs another Kalmar binary; default: the shipped config as "kalmar"),
#           $TUNNEL_WORKLOADS (bulk,connect,http),
#           $TUNNEL_REPS (5) repetitions, $TUNNEL_DOWNLOADS (10) 100 MiB downloads per bulk
#           repetition, $TUNNEL_DURATION (10) s per http/connect run; with probe.py's
#           peer-side counters (probe.md beside summary.md). Not in the default set. e.g.
#             TUNNEL_VARIANTS="copy= splice=KALMAR_TUNNEL__RELAY=splice" run.sh tunnel
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PB="${PEERBENCH_DIR:-$REPO/../shared/peerbench}"
export PEERBENCH_DIR="$PB"
export PATH="$HOME/.cargo/bin:$PATH"
OUT="${OUT:-/tmp/pb}"
WORKDIR="${WORKDIR:-/tmp/peerbench-run}"
TARGET="${CARGO_TARGET_DIR:-$REPO/target}"
BIN="${KALMAR_BIN:-$TARGET/release/kalmar}"
KCONF="$HERE/kalmar.toml"
ADDR=127.0.0.1:19090
RUNS=("$@")
[[ ${#RUNS[@]} -gt 0 ]] || RUNS=(main acl log chain cache)

for t in nginx squid wrk curl oha; do
    command -v "$t" >/dev/null || { "$PB/run.sh" --install-deps; break; }
done
if [[ ! -x "$BIN" ]]; then
    (cd "$REPO" && cargo build --release --bin kalmar)
fi
"$BIN" check-config "$KCONF" >/dev/null
mkdir -p "$OUT" "$WORKDIR"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# Kalmar command line for peerbench: config file + access-log path (env override),
# extra environment, and the binary (default $BIN).
kcmd() { echo "env KALMAR_ACCESS_LOG__PATH=$2 ${3:-} ${4:-$BIN} --config $1"; }

for run in "${RUNS[@]}"; do
    case "$run" in
    main)
        log="$WORKDIR/kalmar-access.log"; rm -f "$log"
        "$PB/run.sh" --proxies direct,squid --proxy-name kalmar \
            --proxy-cmd "$(kcmd "$KCONF" "$log")" --proxy-addr "$ADDR" --proxy-access-log "$log" \
            --reps 5 --workdir "$WORKDIR" --out "$OUT/main"
        ;;
    acl)
        gen="$WORKDIR/bigacl"
        python3 "$HERE/gen_bigacl.py" "$KCONF" "$gen"
        "$BIN" check-config "$gen/kalmar-bigacl.toml" >/dev/null
        l1="$WORKDIR/kalmar-access.log" l2="$WORKDIR/kalmar-bigacl-access.log"; rm -f "$l1" "$l2"
        python3 "$HERE/pbx.py" \
            --extra kalmar-bigacl "$ADDR" "$l2" "$(kcmd "$gen/kalmar-bigacl.toml" "$l2")" -- \
            --proxies squid --proxy-name kalmar --proxy-cmd "$(kcmd "$KCONF" "$l1")" \
            --proxy-addr "$ADDR" --proxy-access-log "$l1" \
            --workloads http --reps 3 --workdir "$WORKDIR" --out "$OUT/acl"
        # which rule decided (must be the last of the 10,000)
        tail -n 1 "$l2" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("bigacl decided by rule:", r.get("rule"), "source:", r.get("source"), "verdict:", r.get("verdict"))' \
            | tee "$OUT/acl/rule-check.txt"
        ;;
    log)
        l1="$WORKDIR/kalmar-access.log"; rm -f "$l1"
        python3 "$HERE/pbx.py" \
            --extra kalmar-log-devnull "$ADDR" - "$(kcmd "$KCONF" /dev/null)" -- \
            --proxies squid --proxy-name kalmar --proxy-cmd "$(kcmd "$KCONF" "$l1")" \
            --proxy-addr "$ADDR" --proxy-access-log "$l1" \
            --workloads http --reps 3 --workdir "$WORKDIR" --out "$OUT/log"
        ;;
    chain)
        l1="$WORKDIR/kalmar-chain-access.log"; rm -f "$l1" "$WORKDIR/chain-cpu.txt"
        python3 "$HERE/pbx.py" \
            --render-squid squid-parent 13129 "$HERE/conf/squid-own.conf.tmpl" \
            --squid-extra squid-13129 13129 "$HERE/conf/squid-own.conf.tmpl" \
            --extra kalmar-to-squid "$ADDR" "$l1" \
            "env KALMAR_ACCESS_LOG__PATH=$l1 bash $HERE/chain.sh $WORKDIR/squid-parent 13129 $BIN $KCONF" -- \
            --proxies '' --workloads http --reps 3 --workdir "$WORKDIR" --out "$OUT/chain"
        cp "$WORKDIR/chain-cpu.txt" "$OUT/chain/" 2>/dev/null || true
        grep -c '"route":"127.0.0.1:13129"' "$l1" | sed 's/^/kalmar log lines routed via 127.0.0.1:13129: /' \
            | tee "$OUT/chain/route-check.txt"
        ;;
    cache)
        l1="$WORKDIR/kalmar-cache-access.log"; rm -f "$l1"
        python3 "$HERE/pbx.py" --nginx-template "$HERE/conf/nginx-expires.conf.tmpl" \
            --squid-extra squid-memcache 13129 "$HERE/conf/squid-memcache.conf.tmpl" \
            --extra kalmar-cache "$ADDR" "$l1" "$(kcmd "$KCONF" "$l1" KALMAR_CACHE__ENABLED=true)" -- \
            --proxies direct --workloads http --reps 3 --workdir "$WORKDIR" --out "$OUT/cache"
        {
            echo "kalmar access log, cache field over all reps:"
            grep -o '"cache":[^,}]*' "$l1" | sort | uniq -c
            echo "squid-memcache access.log (last rep), result codes:"
            awk '{print $4}' "$WORKDIR/squid-memcache/access.log" | cut -d/ -f1 | sort | uniq -c
        } | tee "$OUT/cache/hit-check.txt"
        ;;
    ab)
        la="$WORKDIR/kalmar-a-access.log" lb="$WORKDIR/kalmar-b-access.log"; rm -f "$la" "$lb"
        python3 "$HERE/pbx.py" --rotate \
            --extra "${A_NAME:-kalmar-a}" "$ADDR" "$la" \
            "$(kcmd "$KCONF" "$la" "${KALMAR_A_ENV:-}" "${KALMAR_A:-$BIN}")" -- \
            --proxies direct,squid --proxy-name "${B_NAME:-kalmar-b}" \
            --proxy-cmd "$(kcmd "$KCONF" "$lb" "${KALMAR_B_ENV:-}")" \
            --proxy-addr "$ADDR" --proxy-access-log "$lb" \
            --workloads "${AB_WORKLOADS:-http,connect}" --reps "${AB_REPS:-5}" \
            --workdir "$WORKDIR" --out "$OUT/ab"
        ;;
    tunnel)
        # Every configuration in $TUNNEL_VARIANTS ("NAME=KEY=VALUE,KEY=VALUE NAME2=..."; the
        # keys are Kalmar's environment overrides) side by side with direct, Squid and g3proxy.
        args=()
        for v in ${TUNNEL_VARIANTS:-kalmar=}; do
            name="${v%%=*}" envs="" bin="$BIN"
            IFS=, read -ra items <<< "${v#*=}"
            for item in "${items[@]}"; do
                # "@PATH" is another Kalmar binary (a build from before a change)
                if [[ "$item" == @* ]]; then bin="${item#@}"; else envs+=" $item"; fi
            done
            log="$WORKDIR/$name-access.log"; rm -f "$log"
            args+=(--extra "$name" "$ADDR" "$log" "$(kcmd "$KCONF" "$log" "$envs" "$bin")")
        done
        reps="${TUNNEL_REPS:-5}"
        python3 "$HERE/pbx.py" --probe --rotate "${args[@]}" -- --proxies "${TUNNEL_PEERS-direct,squid,g3proxy}" \
            --workloads "${TUNNEL_WORKLOADS:-bulk,connect,http}" --reps "$reps" --bulk-reps "$reps" \
            --bulk-downloads "${TUNNEL_DOWNLOADS:-10}" --duration "${TUNNEL_DURATION:-10}" \
            --workdir "$WORKDIR" --out "$OUT/tunnel"
        python3 "$HERE/probe_report.py" "$OUT/tunnel" > /dev/null
        ;;
    *) echo "unknown run $run (main acl log chain cache ab tunnel)" >&2; exit 2 ;;
    esac
done
