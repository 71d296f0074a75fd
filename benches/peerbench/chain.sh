#!/usr/bin/env bash
# Run 4 (issue 4): client -> Kalmar -> Squid. peerbench starts this as ONE proxy command
# (`exec bash chain.sh ...` under taskset), so both processes are pinned to the proxy CPU and
# measured together (the process tree). A fresh parent Squid (config rendered by pbx.py
# --render-squid into SQUID_DIR) is started first, then Kalmar with the parent configured.
# Usage: chain.sh SQUID_DIR SQUID_PORT KALMAR_BIN KALMAR_CONF
set -u
dir=$1 port=$2 bin=$3 conf=$4
rm -f "$dir/access.log" "$dir/cache.log" "$dir/squid.pid"
squid -N -f "$dir/squid.conf" & sp=$!
# On exit, note each process's CPU ticks over its whole life (preflight + warm-up + run) in
# SQUID_DIR/../chain-cpu.txt, to split the measured total between Kalmar and Squid.
stop() {
    if [[ -n "${kp:-}" && -r /proc/$kp/stat ]]; then
        k=$(awk '{print $14+$15}' "/proc/$kp/stat"); s=$(awk '{print $14+$15}' "/proc/$sp/stat")
        echo "kalmar_ticks=$k squid_ticks=$s" >> "$dir/../chain-cpu.txt"
    fi
    kill -TERM $sp ${kp:-} 2>/dev/null; wait
}
trap stop TERM INT
for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
KALMAR_UPSTREAM__PARENTS="127.0.0.1:$port" "$bin" --config "$conf" & kp=$!
wait
