#!/usr/bin/env python3
"""Two builds of wxgate on the same setup, for a before/after figure: nginx `proxy_pass` as the
baseline, then each build on its public route and on its required route (HS256), measured the
way bench.py measures (wrk, the proxies pinned to core 0, requests per CPU-second). Rounds
alternate the order of the two builds, so that a drift of the machine falls on both; medians.

Usage: python3 bench/compare.py BEFORE_BINARY AFTER_BINARY [--rounds N] [--seconds S]
(copy target/release/wxgate aside before rebuilding to have both)
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

from bench import (JWT_SECRET, LOAD_CORE, PROXY_CORE, Procs, free_port, login, measure,
                   start_nginx_proxy, start_upstream, wait_port, wxgate_conf)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=8)
    opts = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="wxgate-compare-")
    procs = Procs(workdir)
    try:
        ports = {name: free_port() for name in ("upstream", "nginx", "mock", "before", "after")}
        start_upstream(procs, workdir, ports["upstream"], core=LOAD_CORE)
        nginx = start_nginx_proxy(procs, workdir, ports["nginx"], ports["upstream"])
        procs.start("mock", [os.path.abspath(opts.after), "mock-wechat", "--listen",
                             f"127.0.0.1:{ports['mock']}"], core=LOAD_CORE)
        env = dict(os.environ, TOKIO_WORKER_THREADS="1", RUST_LOG="warn")
        builds = {}
        for name in ("before", "after"):
            config = wxgate_conf(workdir, name, ports[name], ports["mock"], ports["upstream"],
                                 f'[token]\nsecret = "{JWT_SECRET}"', 'backend = "memory"')
            binary = os.path.abspath(getattr(opts, name))
            builds[name] = procs.start(name, [binary, "--log-format", "json", "serve", "--config", config],
                                       env=env, core=PROXY_CORE)
        for port in ports.values():
            wait_port(port)
        time.sleep(0.5)

        targets = {"nginx proxy_pass": {"url": f"http://127.0.0.1:{ports['nginx']}/", "pids": lambda: [nginx.pid]}}
        for name, process in builds.items():
            token = login(ports[name], f"compare-{name}")
            pids = (lambda pid=process.pid: [pid])
            targets[f"{name}: public"] = {"url": f"http://127.0.0.1:{ports[name]}/public/", "pids": pids}
            targets[f"{name}: required, HS256"] = {"url": f"http://127.0.0.1:{ports[name]}/api/", "pids": pids,
                                                  "headers": [f"Authorization: Bearer {token}"]}
        pairs = [("before: public", "after: public"), ("before: required, HS256", "after: required, HS256")]
        results = {name: [] for name in targets}
        for round_number in range(opts.rounds):
            order = ["nginx proxy_pass"]
            for pair in pairs:
                order += pair if round_number % 2 == 0 else pair[::-1]
            for name in order:
                results[name].append(measure(targets[name], opts.seconds))
            print(f"round {round_number + 1}/{opts.rounds} done", file=sys.stderr)

        base = statistics.median(run["per_cpu_s"] for run in results["nginx proxy_pass"])
        print("| target | req/s | p99 ms | req per CPU-second | vs nginx | user µs/req | system µs/req |")
        print("|---|---|---|---|---|---|---|")
        for name, runs in results.items():
            def median(key):
                return statistics.median(run[key] for run in runs)
            print(f"| {name} | {median('rps'):.0f} | {median('p99'):.3f} | {median('per_cpu_s'):.0f} "
                  f"| {median('per_cpu_s') / base:.2f}× | {median('user_us'):.2f} | {median('system_us'):.2f} |")
    finally:
        procs.stop()


if __name__ == "__main__":
    main()
