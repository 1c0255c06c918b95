#!/usr/bin/env python3
"""Instructions per proxied request, counted by callgrind: a figure that does not move with
the machine's load, for comparing two builds of the hot path where a few percent would be lost
in the noise of the timed benchmark.

The gateway (release build, one worker) runs under `valgrind --tool=callgrind` in front of
nginx answering 200. After a warm-up, the counters are zeroed, oha sends `--requests` requests
on 8 connections to the public route, then to the required route with an HS256 token, and the
counts of each run are divided by the number of requests. A second gateway, signing with ES256,
is counted the same way on its required route: once a token is verified, the two algorithms
should cost the same (SPEC §10 allows ES256 10% over HS256), and an instruction count shows it
where the timed benchmark's rounds move by more than that. `--top N` also lists the N functions
that cost the most instructions of their own on the HS256 required route.

glibc copies large blocks with `rep movsb`, which callgrind counts once per byte; the gateway
is run with that path turned off so that a copy counts what its vector loop costs.

`--logins` counts logins instead: the gateway with the embedded store, wrk posting codes never
sent before on 16 connections for `--seconds`, and the counts split by thread, the request
thread apart from the store's writer.

Usage: cargo build --release && python3 bench/instructions.py [--requests N] [--top N]
       cargo build --release && python3 bench/instructions.py --logins [--seconds S]
"""

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from bench import (JWT_SECRET, WXGATE, Procs, es256_token_section, free_port, login, login_script,
                   start_upstream, wait_port, wxgate_conf)

# The gateway's environment under callgrind: one worker, and copies counted by their vector loop.
GATEWAY_ENV = dict(os.environ, TOKIO_WORKER_THREADS="1", RUST_LOG="warn",
                   GLIBC_TUNABLES="glibc.cpu.x86_rep_movsb_threshold=100000000")


def self_costs(profile):
    """Instructions each function spent itself (not in what it called), from a callgrind file
    written with uncompressed names."""
    costs = collections.Counter()
    function, in_call = None, False
    with open(profile, errors="replace") as f:
        for line in f:
            if line.startswith("fn="):
                function = line[3:].strip()
            elif line.startswith("calls="):
                in_call = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                fields = line.split()
                if not in_call and len(fields) >= 2 and function:
                    costs[function] += int(fields[1])
                in_call = False
    return costs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--top", type=int, default=0)
    parser.add_argument("--logins", action="store_true")
    parser.add_argument("--seconds", type=int, default=15)
    opts = parser.parse_args()
    for tool in ("nginx", "oha", "wrk", "valgrind", "callgrind_control"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (valgrind: apt-get install valgrind; the rest: bench/run.sh)")
    if opts.logins:
        count_logins(opts.seconds)
        return

    workdir = tempfile.mkdtemp(prefix="wxgate-instructions-")
    procs = Procs(workdir)
    try:
        ports = {name: free_port() for name in ("upstream", "mock", "hs256", "es256")}
        start_upstream(procs, workdir, ports["upstream"])
        procs.start("mock", [WXGATE, "mock-wechat", "--listen", f"127.0.0.1:{ports['mock']}"])
        token_sections = {"hs256": f'[token]\nsecret = "{JWT_SECRET}"',
                          "es256": es256_token_section(workdir)}
        if not token_sections["es256"]:
            sys.exit("wxgate keygen --alg ES256 failed")
        gateways = {}
        for name, token_section in token_sections.items():
            config = wxgate_conf(workdir, name, ports[name], ports["mock"], ports["upstream"],
                                 token_section, 'backend = "memory"')
            profile = os.path.join(workdir, f"{name}.callgrind.out")
            process = procs.start(name, [
                "valgrind", "--tool=callgrind", "--compress-strings=no", "--compress-pos=no",
                f"--callgrind-out-file={profile}",
                WXGATE, "--log-format", "json", "serve", "--config", config], env=GATEWAY_ENV)
            gateways[name] = (process, profile, ports[name])
        for port in ports.values():
            wait_port(port, timeout=120)
        # A code of its own for each: the mock WeChat, like WeChat, exchanges a code once.
        tokens = {name: login(port, f"instructions-{name}") for name, (_, _, port) in gateways.items()}

        runs = [("public", "hs256", "/public/", []),
                ("required, HS256", "hs256", "/api/", ["-H", f"Authorization: Bearer {tokens['hs256']}"]),
                ("required, ES256", "es256", "/api/", ["-H", f"Authorization: Bearer {tokens['es256']}"])]
        dumps = {}
        dumped = collections.Counter()
        for name, gateway, path, headers in runs:
            process, profile, port = gateways[gateway]
            url = f"http://127.0.0.1:{port}{path}"
            load = ["oha", "--no-tui", "-c", "8"] + headers
            subprocess.run(load + ["-n", "2000", url], capture_output=True, check=True)
            subprocess.run(["callgrind_control", "-z", str(process.pid)], capture_output=True, check=True)
            subprocess.run(load + ["-n", str(opts.requests), url], capture_output=True, check=True)
            subprocess.run(["callgrind_control", "-d", str(process.pid)], capture_output=True, check=True)
            dumped[gateway] += 1
            dumps[name] = f"{profile}.{dumped[gateway]}"

        print("| route | instructions per request |")
        print("|---|---|")
        for name, dump in dumps.items():
            with open(dump) as f:
                total = int(re.search(r"^summary: (\d+)", f.read(), re.M).group(1))
            print(f"| {name} | {total / opts.requests:,.0f} |")
        if opts.top:
            print("\n| instructions per request | function (required route, HS256, own cost) |")
            print("|---|---|")
            for function, cost in self_costs(dumps["required, HS256"]).most_common(opts.top):
                print(f"| {cost / opts.requests:,.0f} | `{function[:120]}` |")
    finally:
        procs.stop()


def count_logins(seconds):
    workdir = tempfile.mkdtemp(prefix="wxgate-instructions-")
    procs = Procs(workdir)
    try:
        ports = {name: free_port() for name in ("mock", "gateway")}
        procs.start("mock", [WXGATE, "mock-wechat", "--listen", f"127.0.0.1:{ports['mock']}"])
        store = f'backend = "embedded"\npath = "{workdir}/logins.redb"'
        config = wxgate_conf(workdir, "gateway", ports["gateway"], ports["mock"], free_port(),
                             f'[token]\nsecret = "{JWT_SECRET}"', store)
        profile = os.path.join(workdir, "callgrind.out")
        gateway = procs.start("gateway", [
            "valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={profile}",
            WXGATE, "--log-format", "json", "serve", "--config", config], env=GATEWAY_ENV)
        for port in ports.values():
            wait_port(port, timeout=120)

        def post_logins(run, duration):
            out = subprocess.run(["wrk", "-t1", "-c16", f"-d{duration}s", "-s", login_script(workdir, run),
                                  f"http://127.0.0.1:{ports['gateway']}/"],
                                 capture_output=True, text=True, check=True).stdout
            if "Non-2xx" in out:
                sys.exit(f"some logins failed:\n{out}")
            return int(re.search(r"(\d+) requests in", out).group(1))

        post_logins(1, 3)
        subprocess.run(["callgrind_control", "-z", str(gateway.pid)], capture_output=True, check=True)
        logins = post_logins(2, seconds)
        subprocess.run(["callgrind_control", "-d", str(gateway.pid)], capture_output=True, check=True)

        print(f"| thread | instructions per login ({logins} logins) |")
        print("|---|---|")
        for dump in sorted(glob.glob(f"{profile}.1-*")):
            with open(dump) as f:
                text = f.read()
            thread = "request thread" if dump.endswith("-01") else f"thread {dump.rsplit('-', 1)[1]}"
            if "wxgate::store::embedded::commit" in text:
                thread = "store writer"
            total = int(re.search(r"^summary: (\d+)", text, re.M).group(1))
            # The runtime's other threads (the blocking pool, the signal handler) do next to nothing.
            if total / logins >= 1000:
                print(f"| {thread} | {total / logins:,.0f} |")
    finally:
        procs.stop()


if __name__ == "__main__":
    main()
