#!/usr/bin/env python3
"""Logins per second of two or more builds, measured the way bench.py measures them: each build
on core 0 with one worker and an embedded store of its own, wrk (64 connections) and the mock
WeChat on core 1, every login with a code never sent before. Rounds alternate the builds, so
that a drift of the machine falls on all of them; medians. Besides the rate, the CPU time the
gateway spent per login (user + system, from /proc) and how busy its core was: a build that
leaves the core idle is waiting, on the store's commits or on WeChat.

Usage: python3 bench/logins.py BINARY [BINARY ...] [--rounds N] [--seconds S]
(copy target/release/wxgate aside before rebuilding to have two)
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

from bench import (JWT_SECRET, LOAD_CORE, PROXY_CORE, Procs, cpu_seconds_tree, free_port,
                   login_script, wait_port, wrk, wxgate_conf)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binaries", nargs="+")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=10)
    opts = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="wxgate-logins-")
    procs = Procs(workdir)
    try:
        binaries = [os.path.abspath(binary) for binary in opts.binaries]
        mock_port = free_port()
        procs.start("mock", [binaries[-1], "mock-wechat", "--listen", f"127.0.0.1:{mock_port}"], core=LOAD_CORE)
        env = dict(os.environ, TOKIO_WORKER_THREADS="1", RUST_LOG="warn")
        gateways = []
        for number, binary in enumerate(binaries):
            port = free_port()
            store = f'backend = "embedded"\npath = "{workdir}/build-{number}.redb"'
            config = wxgate_conf(workdir, f"build-{number}", port, mock_port, free_port(),
                                 f'[token]\nsecret = "{JWT_SECRET}"', store)
            process = procs.start(f"build-{number}", [binary, "--log-format", "json", "serve", "--config", config],
                                  env=env, core=PROXY_CORE)
            gateways.append((binary, port, process))
        wait_port(mock_port)
        for _, port, _ in gateways:
            wait_port(port)

        results = {binary: [] for binary in binaries}
        run = 0
        for round_number in range(opts.rounds):
            order = gateways if round_number % 2 == 0 else gateways[::-1]
            for binary, port, process in order:
                # Codes are numbered by run, so that no build is sent a code another was sent.
                run += 1
                user_before, system_before = cpu_seconds_tree([process.pid])
                started = time.time()
                count, _, _ = wrk(f"http://127.0.0.1:{port}/", opts.seconds, script=login_script(workdir, run))
                wall = time.time() - started
                user_after, system_after = cpu_seconds_tree([process.pid])
                user, system = user_after - user_before, system_after - system_before
                results[binary].append({"rate": count / opts.seconds, "user_us": user / count * 1e6,
                                        "system_us": system / count * 1e6, "busy": (user + system) / wall})
            print(f"round {round_number + 1}/{opts.rounds} done", file=sys.stderr)

        print("| build | logins/s | user µs/login | system µs/login | core busy |")
        print("|---|---|---|---|---|")
        for binary, runs in results.items():
            def median(key):
                return statistics.median(run[key] for run in runs)
            print(f"| {binary} | {median('rate'):.0f} | {median('user_us'):.1f} | {median('system_us'):.1f} "
                  f"| {median('busy'):.0%} |")
    finally:
        procs.stop()


if __name__ == "__main__":
    main()
