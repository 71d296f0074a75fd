"""probe: what a proxy's way of relaying costs its *peers* (client and origin), for pbx.py --probe.

peerbench measures the proxy (its CPU, its RSS) and the result (MB/s, conn/s). On this
harness the client core (curl or oha, plus nginx) is the bottleneck, so the figure that
decides throughput is how much work the proxy causes on that core. This module wraps
peerbench's own `bulk` and `connect` workloads (their figures and checks stay peerbench's)
with counters that cost nothing while the load runs, and adds one instrumented download:

  every repetition, over the workload's whole window (free: /proc reads before and after)
    cpu<N>_{user,sys,softirq}_ms    per-core CPU time from /proc/stat
    tcp_*                           /proc/net/snmp + netstat deltas (loopback: every segment
                                    is counted once out and once in, on one host)
    ctxt                            context switches, all CPUs (/proc/stat)
    client_{utime,stime}_s, client_{vol,invol}_cs   the curl processes (wait4 rusage)
    origin_{cpu_s,vol_cs,invol_cs}  the nginx worker(s)
  bulk only, one extra 100 MiB download after the timed ones (not in MB/s):
    perf stat counts of the client's syscalls (tracepoints, `-- curl`), of the proxy's
    syscalls (`-p`), and context switches / wakeups per core (`-C`); `ss -tin` sampled
    every 100 ms, the last sample of every tunnel socket kept (segment sizes, rcv_space,
    delivery rate).

Derived per MB (10^6 payload bytes) or per connection in the report (`probe_report.py`).
"""
import json
import os
import re
import resource
import shutil
import subprocess
import threading
import time

CLIENT_SYSCALLS = ["read", "recvfrom", "recvmsg", "write", "sendto", "poll", "ppoll", "epoll_wait",
                   "epoll_pwait"]
PROXY_SYSCALLS = ["read", "recvfrom", "write", "writev", "sendto", "splice", "epoll_wait", "epoll_pwait",
                  "setsockopt"]
TCP_KEYS = {
    "Tcp": ["InSegs", "OutSegs", "RetransSegs", "ActiveOpens", "PassiveOpens"],
    "TcpExt": ["DelayedACKs", "TCPHPAcks", "TCPPureAcks", "TCPHPHits", "TCPRcvCollapsed", "PruneCalled",
               "TCPBacklogCoalesce", "TCPOFOQueue", "TCPAutoCorking", "TCPFromZeroWindowAdv",
               "TCPToZeroWindowAdv", "TCPWantZeroWindowAdv", "TCPOrigDataSent", "TCPDelivered",
               "TCPRcvQDrop", "TCPZeroWindowDrop", "TCPACKSkippedSeq"],
}


def cpu_jiffies():
    """cpuN -> {user, sys, softirq} in ms; plus the global ctxt count."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            parts = line.split()
            if re.fullmatch(r"cpu\d+", parts[0]):
                v = [int(x) for x in parts[1:8]]
                out[parts[0]] = {"user": (v[0] + v[1]) * 1000 / hz, "sys": v[2] * 1000 / hz,
                                 "softirq": (v[5] + v[6]) * 1000 / hz}
            elif parts[0] == "ctxt":
                out["ctxt"] = int(parts[1])
    return out


def tcp_counters():
    out = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        with open(path) as f:
            lines = f.read().splitlines()
        for head, vals in zip(lines[0::2], lines[1::2]):
            proto, names = head.split(":", 1)
            if proto not in TCP_KEYS:
                continue
            table = dict(zip(names.split(), vals.split(":", 1)[1].split()))
            for k in TCP_KEYS[proto]:
                if k in table:
                    out[f"tcp_{k}"] = int(table[k])
    return out


def nginx_workers():
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if cmd.startswith(b"nginx: worker process"):
            pids.append(int(d))
    return pids


def proc_counts(pids):
    hz = os.sysconf("SC_CLK_TCK")
    cpu = vol = invol = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / hz
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol += int(line.split()[1])
        except OSError:
            pass
    return {"cpu_s": cpu, "vol_cs": vol, "invol_cs": invol}


class Window:
    """Free counters over one workload window."""

    def start(self):
        self.workers = nginx_workers()
        self.cpu0, self.tcp0 = cpu_jiffies(), tcp_counters()
        self.origin0 = proc_counts(self.workers)
        self.ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return self

    def stop(self):
        cpu1, tcp1 = cpu_jiffies(), tcp_counters()
        origin1 = proc_counts(self.workers)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {}
        for cpu, v in cpu1.items():
            if cpu == "ctxt":
                out["ctxt"] = v - self.cpu0["ctxt"]
                continue
            for k, ms in v.items():
                out[f"{cpu}_{k}_ms"] = round(ms - self.cpu0[cpu][k], 1)
        for k, v in tcp1.items():
            out[k] = v - self.tcp0.get(k, 0)
        for k in ("cpu_s", "vol_cs", "invol_cs"):
            out[f"origin_{k}"] = round(origin1[k] - self.origin0[k], 3)
        out.update({
            "client_utime_s": round(ru1.ru_utime - self.ru0.ru_utime, 3),
            "client_stime_s": round(ru1.ru_stime - self.ru0.ru_stime, 3),
            "client_vol_cs": ru1.ru_nvcsw - self.ru0.ru_nvcsw,
            "client_invol_cs": ru1.ru_nivcsw - self.ru0.ru_nivcsw,
        })
        return out


def parse_perf_csv(path):
    """perf stat -x, output -> {event[/cpuN]: count}."""
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) < 3 or line.startswith("#"):
                continue
            # with -A: CPU0,count,,event,...; without: count,,event,...
            if parts[0].startswith("CPU"):
                cpu, count, event = parts[0].lower(), parts[1], parts[3]
                key = f"{event}/{cpu}"
            else:
                count, event = parts[0], parts[2]
                key = event
            try:
                out[key.replace("syscalls:sys_enter_", "sc_").replace("sched:", "")] = int(float(count))
            except ValueError:
                pass
    return out


SS_FIELDS = ["bytes_sent", "bytes_acked", "bytes_received", "segs_out", "segs_in", "data_segs_out",
             "data_segs_in", "rcv_space", "rcv_ssthresh", "mss", "rcv_mss", "advmss", "cwnd", "snd_wnd",
             "delivered", "notsent", "rcv_wnd"]


def parse_ss(text):
    """`ss -tinH` -> {(local, peer): {field: value}}."""
    socks = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        head = lines[i].split()
        info = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith(("\t", " ")) else ""
        i += 2 if info else 1
        if len(head) < 4:
            continue
        local, peer = head[-2], head[-1]
        d = {"recv_q": int(head[-4]), "send_q": int(head[-3])} if head[-4].isdigit() else {}
        for field in SS_FIELDS:
            m = re.search(rf"(?<![\w_]){field}:(\d+)", info)
            if m:
                d[field] = int(m.group(1))
        m = re.search(r"delivery_rate (\d+(?:\.\d+)?)([KMG]?)bps", info)
        if m:
            d["delivery_rate_mbps"] = float(m.group(1)) * {"": 1e-6, "K": 1e-3, "M": 1, "G": 1e3}[m.group(2)]
        socks[(local, peer)] = d
    return socks


class SsSampler(threading.Thread):
    def __init__(self, ports, interval=0.1):
        super().__init__(daemon=True)
        self.ports, self.interval = ports, interval
        self.last = {}
        self._halt = threading.Event()

    def run(self):
        while not self._halt.wait(self.interval):
            r = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True, text=True)
            for key, d in parse_ss(r.stdout).items():
                if any(k.endswith(f":{p}") for k in key for p in self.ports):
                    self.last[key] = d

    def stop(self):
        self._halt.set()
        self.join()
        return self.last


def roles(socks, proxy_port, origin_port):
    """Name the sockets of one tunnel: client (curl's end), proxy_client (the proxy's end
    towards curl), proxy_origin (the proxy's end towards nginx), origin (nginx's end)."""
    out = {}
    for (local, peer), d in socks.items():
        lp, pp = local.rsplit(":", 1)[1], peer.rsplit(":", 1)[1]
        if proxy_port is None:
            role = "client" if pp == str(origin_port) else "origin" if lp == str(origin_port) else None
        elif pp == str(proxy_port):
            role = "client"
        elif lp == str(proxy_port):
            role = "proxy_client"
        elif pp == str(origin_port):
            role = "proxy_origin"
        elif lp == str(origin_port):
            role = "origin"
        else:
            role = None
        if role:
            # the biggest transfer wins (the warm-up's sockets are gone by now)
            prev = out.get(role)
            size = d.get("bytes_received", 0) + d.get("bytes_acked", 0)
            if not prev or size > prev.get("bytes_received", 0) + prev.get("bytes_acked", 0):
                out[role] = d
    return out


class CpuEvents:
    """Context switches, wakeups and migrations per core (software events, counted by the
    kernel: nothing is sampled) over a window."""

    def __init__(self, a):
        self.out = os.path.join(a.workdir, "probe-cpu.csv")
        self.cpus = ",".join(c for c in (a.client_cpus, a.proxy_cpus) if c) or "0,1"

    def start(self):
        self.proc = subprocess.Popen(["perf", "stat", "-x,", "-o", self.out, "-A", "-C", self.cpus, "-e",
                                      "context-switches,sched:sched_wakeup,cpu-migrations"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.2)  # perf attaches
        return self

    def stop(self):
        self.proc.send_signal(2)
        self.proc.wait(10)
        return parse_perf_csv(self.out)


def instrumented_download(pb, a, spec, inst):
    """One 100 MiB download through the tunnel with perf syscall counts and ss samples."""
    if not shutil.which("perf"):
        return {"probe_error": "perf not found"}
    wd = a.workdir
    url = f"https://127.0.0.1:{a.origin_https_port}/100m"
    client_out, proxy_out = (os.path.join(wd, f"probe-{n}.csv") for n in ("client", "proxy"))
    client_ev = ",".join(f"syscalls:sys_enter_{s}" for s in CLIENT_SYSCALLS)
    proxy_ev = ",".join(f"syscalls:sys_enter_{s}" for s in PROXY_SYSCALLS)
    procs = []
    events = CpuEvents(a).start()
    if inst.pid:
        procs.append(subprocess.Popen(["perf", "stat", "-x,", "-o", proxy_out, "-e", proxy_ev, "-p",
                                       str(inst.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.3)  # perf attaches
    proxy_port = None if spec.direct else spec.addr[1]
    sampler = SsSampler([a.origin_https_port] + ([proxy_port] if proxy_port else []))
    sampler.start()
    argv = pb.curl_argv(a, spec, url, True)
    argv = ["perf", "stat", "-x,", "-o", client_out, "-e", client_ev, "--"] + argv
    if a.client_cpus:
        argv = ["taskset", "-c", a.client_cpus] + argv
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    socks = sampler.stop()
    for p in procs:
        p.send_signal(2)
        p.wait(10)
    cpu_events = events.stop()
    c = pb.parse_curl(r.stdout)
    out = {"probe_download_ok": bool(c and c["status"] == 200 and c["size"] == pb.BODIES["100m"])}
    if c:
        out["probe_mb_per_s"] = round(c["bytes_per_s"] / 1e6, 1)
    out["probe_client_syscalls"] = parse_perf_csv(client_out)
    if inst.pid:
        out["probe_proxy_syscalls"] = parse_perf_csv(proxy_out)
    out["probe_cpu_events"] = cpu_events
    out["probe_sockets"] = roles(socks, proxy_port, a.origin_https_port)
    return out


def install(pb):
    """Wrap peerbench's bulk and connect workloads with the probe."""
    orig_bulk, orig_connect = pb.wl_bulk, pb.wl_connect

    def wl_bulk(a, spec, inst, rep):
        w = Window().start()
        res = orig_bulk(a, spec, inst, rep)
        res = dict(res, probe=w.stop())
        if res.get("valid"):
            res["probe"].update(instrumented_download(pb, a, spec, inst))
        return res

    def wl_connect(a, spec, inst, rep):
        w = Window().start()
        events = CpuEvents(a).start()
        res = orig_connect(a, spec, inst, rep)
        return dict(res, probe=dict(w.stop(), probe_cpu_events=events.stop()))

    pb.wl_bulk, pb.wl_connect = wl_bulk, wl_connect


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
