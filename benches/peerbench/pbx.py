#!/usr/bin/env python3
"""pbx: Kalmar's extensions to ../shared/peerbench, which stays untouched (read-only).

peerbench benchmarks its built-in slots (direct, squid, tinyproxy) plus ONE extra proxy. The
runs in benches/peerbench/run.sh need more in the same run (two Kalmar configurations side by
side; a second Squid with its own template; a different origin template), so this wrapper
imports peerbench.py as a module, adds proxy specs to its build_specs(), optionally swaps the
nginx template, and then runs peerbench's own main() with the remaining arguments. Everything
else (fresh instance per repetition, interleaving, pinning, accounting, checks, report) is
peerbench's unchanged code.

    pbx.py [--extra NAME ADDR LOG CMD]... [--squid-extra NAME PORT TEMPLATE]...
           [--render-squid NAME PORT TEMPLATE]... [--nginx-template FILE] [--probe] [--rotate]
           -- <peerbench.py options>

--extra          another command-line proxy (like --proxy-cmd); LOG may be '-' (none)
--squid-extra    a Squid slot from another template (placeholders as peerbench's, plus @DIR@ =
                 <workdir>/NAME); rendered fresh for every repetition
--render-squid   only render such a Squid config into <workdir>/NAME/squid.conf (for a Squid
                 that a --extra command starts itself, e.g. a parent proxy in a chain)
--nginx-template origin template to use instead of peerbench's conf/nginx.conf.tmpl
--rotate         start each repetition one proxy later (rep 1: A B C, rep 2: B C A, ...), so that
                 no proxy always runs right after the same one: on this VM the slot in the
                 sequence moved a Kalmar-vs-Kalmar comparison by ~8% (results/retry/)
--probe          wrap the bulk and connect workloads with probe.py's peer-side counters (what the
                 proxy's relaying costs the client and the origin); probe_report.py tabulates them
"""
import argparse
import os
import shutil
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PB_DIR = os.environ.get("PEERBENCH_DIR",
                        os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "peerbench")))
sys.path.insert(0, PB_DIR)
import peerbench as pb  # noqa: E402


def render_file(src, dest, values):
    with open(src) as f:
        text = f.read()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    with open(dest, "w") as f:
        f.write(text)
    return dest


def port_free(addr):
    """Refuse to measure a stale process that still listens where a fresh instance should."""
    try:
        with socket.create_connection(addr, timeout=0.5):
            pass
    except OSError:
        return
    raise RuntimeError(f"something already listens on {addr[0]}:{addr[1]}; a stale proxy would be measured")


class Rotating(list):
    """The proxy list for --rotate. peerbench's main() walks the list once for its preflight and
    then once per repetition; every walk after the first starts one proxy further on."""

    def __init__(self, items):
        super().__init__(items)
        self.walks = 0

    def __iter__(self):
        shift = max(self.walks - 1, 0) % max(len(self), 1)
        self.walks += 1
        return iter(list.__getitem__(self, slice(shift, None)) + list.__getitem__(self, slice(0, shift)))


def main():
    argv = sys.argv[1:]
    if "--" in argv:
        i = argv.index("--")
        mine, rest = argv[:i], argv[i + 1:]
    else:
        mine, rest = argv, []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra", nargs=4, action="append", default=[], metavar=("NAME", "ADDR", "LOG", "CMD"))
    ap.add_argument("--squid-extra", nargs=3, action="append", default=[], metavar=("NAME", "PORT", "TEMPLATE"))
    ap.add_argument("--render-squid", nargs=3, action="append", default=[], metavar=("NAME", "PORT", "TEMPLATE"))
    ap.add_argument("--nginx-template")
    ap.add_argument("--probe", action="store_true",
                    help="add the peer-side counters of probe.py to bulk and connect (raw.jsonl 'probe')")
    ap.add_argument("--rotate", action="store_true",
                    help="rotate the proxies' order by one every repetition")
    x = ap.parse_args(mine)

    if x.probe:
        import probe
        probe.install(pb)

    if x.nginx_template:
        tmpl = os.path.abspath(x.nginx_template)
        orig_render = pb.render

        def render(template, dest, values):
            if template == "nginx.conf.tmpl":
                return render_file(tmpl, dest, values)
            return orig_render(template, dest, values)
        pb.render = render

    orig_build = pb.build_specs

    def squid_prep(a, name, port, template):
        d = os.path.join(a.workdir, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        conf = render_file(os.path.abspath(template), os.path.join(d, "squid.conf"), {
            "ORIGIN_HTTP_PORT": a.origin_http_port, "ORIGIN_HTTPS_PORT": a.origin_https_port,
            "NOFILE": a.nofile, "RUNDIR": a.workdir, "DIR": d, "PORT": port})
        pb.chown_tree(d, "proxy")
        return conf

    def build_specs(a):
        specs = orig_build(a)
        for name, port, template in x.render_squid:
            squid_prep(a, name, port, template)
        for name, port, template in x.squid_extra:
            d = os.path.join(a.workdir, name)
            specs.append(pb.ProxySpec(
                name, ("127.0.0.1", int(port)), ["squid", "-N", "-f", os.path.join(d, "squid.conf")],
                lambda name=name, port=port, template=template: squid_prep(a, name, port, template),
                os.path.join(d, "access.log")))
        for name, addr, logp, cmd in x.extra:
            addr = pb.loopback_addr(addr)
            specs.append(pb.ProxySpec(name, addr, ["bash", "-c", "exec " + cmd],
                                      lambda addr=addr: port_free(addr), None if logp == "-" else logp))
        for spec in specs:
            if spec.argv and spec.prepare is None:
                spec.prepare = lambda addr=spec.addr: port_free(addr)
        return Rotating(specs) if x.rotate else specs
    pb.build_specs = build_specs

    sys.argv = [os.path.join(PB_DIR, "peerbench.py")] + rest
    pb.main()


if __name__ == "__main__":
    main()
