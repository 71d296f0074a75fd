#!/usr/bin/env bash
# Run the public HTTP cache test suite (http-tests/cache-tests) through Kalmar as a forward
# proxy, check in Kalmar's access log that the requests really went through it, and score
# the results against the recorded figures in baseline.json.
#
#   tests/cache-suite/run.sh [--kalmar BIN | --squid] [--suite DIR] [--id TEST-ID] [--record]
#
#   --kalmar BIN   the Kalmar binary (default target/debug/kalmar)
#   --squid        run the suite through Squid (the `squid` on PATH, memory cache) instead,
#                  with the same client adapter: the figures to compare with (no baseline)
#   --suite DIR    the suite's sources, read-only (default ../shared/cache-tests, or
#                  $CACHE_TESTS_DIR); copied to a work dir and `npm install`ed there
#   --id TEST-ID   run one test and print its requests and responses (no scoring)
#   --record       write the measured counts to baseline.json instead of checking them
#
# Everything listens on 127.0.0.1 ports chosen at random. Exit status 0 only when every
# required test outside `cdn-cache-control` passes, no test failed in setup, and the passes
# are at least the recorded figure.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
kalmar="$repo/target/debug/kalmar"
suite="${CACHE_TESTS_DIR:-$repo/../shared/cache-tests}"
id=""
record=""
squid=""
while [ $# -gt 0 ]; do
  case "$1" in
    --kalmar) kalmar="$2"; shift 2 ;;
    --suite) suite="$2"; shift 2 ;;
    --id) id="$2"; shift 2 ;;
    --squid) squid=1; shift ;;
    --record) record=1; shift ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
# undici is what sends the requests (see via-kalmar.cjs): pinned, so a new release cannot
# move the score.
undici_version="7.30.2"

for tool in node npm curl; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is required" >&2; exit 2; }
done
if [ -n "$squid" ]; then
  command -v squid >/dev/null || { echo "run.sh: squid is required for --squid" >&2; exit 2; }
else
  [ -x "$kalmar" ] || { echo "run.sh: no Kalmar binary at $kalmar (cargo build)" >&2; exit 2; }
fi
[ -f "$suite/test-engine/cli.mjs" ] || { echo "run.sh: no cache test suite at $suite" >&2; exit 2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/kalmar-cache-suite.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cp -r "$suite" "$work/suite"
chmod -R u+w "$work/suite"
rm -rf "$work/suite/node_modules"
(cd "$work/suite" && npm install --no-audit --no-fund --omit=dev --loglevel=error \
  "undici@$undici_version" >"$work/npm.log" 2>&1) || { cat "$work/npm.log" >&2; exit 2; }

free_port() {
  node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}
wait_port() { # PORT NAME
  for _ in $(seq 1 100); do
    if curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$1/"; then return 0; fi
    sleep 0.1
  done
  echo "run.sh: $2 did not listen on 127.0.0.1:$1" >&2
  exit 2
}

origin_port="$(free_port)"
proxy_port="$(free_port)"
admin_port="$(free_port)"

# The suite's origin server, bound to loopback.
(cd "$work/suite" && exec env npm_package_config_protocol=http \
  npm_package_config_port="$origin_port" npm_package_config_pidfile="$work/origin.pid" \
  node --require "$here/loopback.cjs" test-engine/server/server.mjs) >"$work/origin.log" 2>&1 &
pids+=($!)

if [ -n "$squid" ]; then
  # Squid as a forward proxy with a memory cache, for comparison.
  chmod 777 "$work"
  cat >"$work/squid.conf" <<CONF
http_port 127.0.0.1:$proxy_port
acl localnet src 127.0.0.1/32
http_access allow localnet
http_access deny all
cache_mem 64 MB
maximum_object_size_in_memory 8 MB
pid_filename $work/squid.pid
access_log stdio:$work/squid-access.log
cache_log $work/squid-cache.log
coredump_dir $work
shutdown_lifetime 1 seconds
CONF
  squid -N -f "$work/squid.conf" >"$work/squid.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    if curl -s -o /dev/null --max-time 1 -x "127.0.0.1:$proxy_port" "http://127.0.0.1:$origin_port/"; then break; fi
    sleep 0.1
  done
else
  # Kalmar: the cache on, the loopback origin let through the destination guard.
  cat >"$work/kalmar.toml" <<TOML
[server]
listen = "127.0.0.1:$proxy_port"
admin_listen = "127.0.0.1:$admin_port"
workers = 2

[access_log]
format = "json"
path = "$work/access.log"

[destinations]
allowed_cidrs = ["127.0.0.1/32"]

[cache]
enabled = true
TOML
  "$kalmar" --config "$work/kalmar.toml" >"$work/kalmar.log" 2>&1 &
  pids+=($!)
  wait_port "$admin_port" "Kalmar's admin listener"
fi
wait_port "$origin_port" "the suite's origin"

cd "$work/suite"
export KALMAR_PROXY="http://127.0.0.1:$proxy_port"
export npm_package_config_base="http://127.0.0.1:$origin_port"
export npm_package_config_id="$id"
if [ -n "$id" ]; then
  node --no-warnings --require "$here/via-kalmar.cjs" test-engine/cli.mjs
  echo "--- the proxy's access log"
  cat "$work/access.log" "$work/squid-access.log" 2>/dev/null || true
  exit 0
fi

started=$(date +%s)
node --no-warnings --require "$here/via-kalmar.cjs" test-engine/cli.mjs >"$work/results.json" \
  2>"$work/cli.log" || { cat "$work/cli.log" >&2; exit 1; }
echo "suite ran in $(( $(date +%s) - started ))s"
if [ -n "${CACHE_SUITE_RESULTS:-}" ]; then cp "$work/results.json" "$CACHE_SUITE_RESULTS"; fi

if [ -n "$squid" ]; then
  node "$here/score.mjs" --suite "$work/suite" --results "$work/results.json" || true
  exit 0
fi

# Kalmar writes its access log in batches: stop it (SIGTERM flushes) before reading.
kill -TERM "${pids[1]}"
wait "${pids[1]}" 2>/dev/null || true

scored=0
node "$here/score.mjs" --suite "$work/suite" --results "$work/results.json" \
  --access-log "$work/access.log" --origin "http://127.0.0.1:$origin_port" \
  --baseline "$here/baseline.json" ${record:+--record} || scored=$?
if [ "$scored" -ne 0 ] && grep -q '^ERROR' "$work/cli.log"; then
  # A setup failure is the suite's own request failing (its PUT /config, say): show what
  # the client got, and Kalmar's access-log line for each such test.
  echo "--- the suite's client reported:"
  grep '^ERROR' "$work/cli.log" | head -20
  for uuid in $(grep '^ERROR' "$work/cli.log" | awk '{print $2}' | head -20); do
    grep -F "$uuid" "$work/access.log" | head -3 || true
  done
fi
exit "$scored"
