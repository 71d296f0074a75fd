#!/usr/bin/env bash
# User-space instructions per plain-HTTP request, counted by valgrind (callgrind), for one or
# more Kalmar binaries: a figure that the VM's drifting vCPU speed cannot move, for comparing
# two builds when peerbench's CPU-time ratios are within its noise.
#
#   benches/peerbench/instructions.sh BIN [BIN...]      (env: N1=1000 N2=3000)
#
# Each binary serves N1 and then N2 keep-alive GETs of 1 KiB (one client connection, absolute
# form, the peerbench config with its access log on) from a loopback nginx; the difference of
# the two totals over N2-N1 is the per-request figure, start-up and shutdown cancelled out.
# Kernel work (system calls, loopback TCP) is not counted: it is the same for every build.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
N1="${N1:-1000}" N2="${N2:-3000}"
for tool in valgrind callgrind_annotate nginx python3 curl; do
    command -v "$tool" >/dev/null || { echo "instructions.sh: $tool is required" >&2; exit 2; }
done
[[ $# -gt 0 ]] || { echo "usage: instructions.sh BIN [BIN...]" >&2; exit 2; }

work="$(mktemp -d /tmp/kalmar-instructions.XXXXXX)"
ORIGIN=127.0.0.1:18180 PROXY=127.0.0.1:19190 ADMIN=127.0.0.1:19191
cleanup() {
    [[ -f "$work/nginx.pid" ]] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/html"
head -c 1024 /dev/zero | tr '\0' x > "$work/html/1k"
cat > "$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work;
  uwsgi_temp_path $work; scgi_temp_path $work;
  keepalive_requests 1000000;
  server { listen $ORIGIN; root $work/html; }
}
CONF
nginx -c "$work/nginx.conf"
for _ in $(seq 1 100); do curl -sf -o /dev/null "http://$ORIGIN/1k" && break; sleep 0.05; done

cat > "$work/drive.py" <<'PY'
import http.client, sys
proxy, origin, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
host, port = proxy.rsplit(":", 1)
c = http.client.HTTPConnection(host, int(port))
for _ in range(n):
    c.request("GET", f"http://{origin}/1k", headers={"User-Agent": "instructions.sh", "Accept": "*/*"})
    r = c.getresponse()
    body = r.read()
    assert r.status == 200 and len(body) == 1024, (r.status, len(body))
PY

# Total instructions of one Kalmar run that serves N requests.
count() { # BIN N
    local out="$work/callgrind.out"
    rm -f "$out"
    env KALMAR_ACCESS_LOG__PATH="$work/access.log" KALMAR_SERVER__LISTEN="$PROXY" \
        KALMAR_SERVER__ADMIN_LISTEN="$ADMIN" \
        valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$1" --config "$HERE/kalmar.toml" > "$work/kalmar.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 300); do
        curl -sf -o /dev/null --max-time 1 "http://$ADMIN/healthz" && break
        sleep 0.1
    done
    python3 "$work/drive.py" "$PROXY" "$ORIGIN" "$2"
    kill -TERM "$pid"
    wait "$pid" || true
    callgrind_annotate "$out" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}

printf '%-40s %12s\n' binary "instr/request"
for bin in "$@"; do
    a="$(count "$bin" "$N1")" b="$(count "$bin" "$N2")"
    printf '%-40s %12d\n' "$bin" $(( (b - a) / (N2 - N1) ))
done
