#!/usr/bin/env python3
"""wxgate against nginx, on one machine, in one run (SPEC §10).

Each proxy under test runs pinned to core 0 with one worker (nginx `worker_processes 1`,
wxgate `TOKIO_WORKER_THREADS=1`); the upstream (nginx answering 200), the mock WeChat and the
load generator (wrk, 64 connections) run on core 1. Targets alternate over several rounds and
the medians are reported. The figure that travels between machines is requests per CPU-second
of the proxy process (its utime + stime from /proc), as a ratio to nginx; for the required
route, that ratio is also given round by round, against the nginx run of the same round, with
its median and range.

"nginx proxy_pass", the baseline of the ratio, is nginx at its best: HTTP/1.1 and a pool of
keep-alive connections to the upstream, like wxgate's, sent requests without a token. "nginx
proxy_pass, same request as wxgate's" is the same nginx sent the required route's request,
token included, for the ratio of the two proxies at the same work. "nginx proxy_pass, default
config" is the two-line `location / { proxy_pass …; }` an operator gets without tuning:
HTTP/1.0 and a new upstream connection per request. "relay, no HTTP" (examples/relay.rs)
copies bytes between each client and an upstream connection of its own on wxgate's runtime:
the same system calls as a keep-alive proxy and nothing else, so the most a proxy on that
runtime can reach here while each client has an upstream connection of its own.
"relay, pipelined" (examples/pipelined_relay.rs) writes the requests of all its clients to one
upstream connection, those ready in the same turn in one write: what pipelining to the upstream
would save such a proxy.

Usage: bench/run.sh [--rounds N] [--seconds S]   (builds the release binary, then runs this)
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WXGATE = os.path.join(ROOT, "target", "release", "wxgate")
RELAY = os.path.join(ROOT, "target", "release", "examples", "relay")
PIPELINED_RELAY = os.path.join(ROOT, "target", "release", "examples", "pipelined_relay")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CORE = "0"
LOAD_CORE = "1"
APPID = "wx00000000000bench"
JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123456789"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


def cpu_seconds(pid):
    """(user, system) CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds_tree(pids):
    times = [cpu_seconds(pid) for pid in pids]
    return sum(user for user, _ in times), sum(system for _, system in times)


def rss_mb(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Procs:
    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []

    def start(self, name, args, env=None, core=None):
        if core is not None:
            args = ["taskset", "-c", core] + args
        log = open(os.path.join(self.workdir, f"{name}.log"), "w")
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def nginx_conf(workdir, name, body):
    path = os.path.join(workdir, f"{name}.conf")
    with open(path, "w") as f:
        f.write(f"""
worker_processes 1;
daemon off;
master_process off;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.error.log crit;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/{name}-body;
    proxy_temp_path {workdir}/{name}-proxy;
    fastcgi_temp_path {workdir}/{name}-fcgi;
    uwsgi_temp_path {workdir}/{name}-uwsgi;
    scgi_temp_path {workdir}/{name}-scgi;
    keepalive_requests 1000000;
{body}
}}
""")
    return path


def start_upstream(procs, workdir, port, core=None):
    """The upstream every proxy here forwards to: nginx answering 200 "ok"."""
    conf = nginx_conf(workdir, "upstream", f"""
    server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok\\n"; }} }}""")
    return procs.start("upstream", ["nginx", "-c", conf], core=core)


def start_nginx_proxy(procs, workdir, port, upstream_port):
    """The baseline: nginx `proxy_pass` at its best, HTTP/1.1 and keep-alive upstream
    connections, on the proxy core."""
    conf = nginx_conf(workdir, "nginx", f"""
    upstream app {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}""")
    return procs.start("nginx", ["nginx", "-c", conf], core=PROXY_CORE)


def wxgate_conf(workdir, name, port, mock_port, upstream_port, token_section, store):
    path = os.path.join(workdir, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f"""
[server]
listen = "127.0.0.1:{port}"
admin_listen = ""
[wechat]
hosts = ["http://127.0.0.1:{mock_port}"]
[[wechat.apps]]
appid = "{APPID}"
secret = "bench-app-secret"
{token_section}
[store]
{store}
[rate_limit]
login_per_ip_per_minute = 0
[[routes]]
path = "/public/"
upstream = "http://127.0.0.1:{upstream_port}"
auth = "public"
[[routes]]
path = "/api/"
upstream = "http://127.0.0.1:{upstream_port}"
auth = "required"
""")
    return path


def es256_token_section(workdir):
    """The `[token]` section of a gateway signing with ES256, with a key from `wxgate keygen`;
    None when the binary cannot make one."""
    keygen = subprocess.run([WXGATE, "keygen", "--alg", "ES256"], capture_output=True, text=True)
    if keygen.returncode != 0:
        return None
    key = os.path.join(workdir, "es256.pem")
    with open(key, "w") as f:
        f.write(keygen.stdout)
    return f'[token]\nalgorithm = "ES256"\nsigning_key = "{key}"'


def login(port, code):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/auth/login",
        data=json.dumps({"code": code}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as answer:
        return json.load(answer)["access_token"]


def wrk(url, seconds, connections=64, headers=(), script=None):
    args = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for header in headers:
        args += ["-H", header]
    if script:
        args += ["-s", script]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        sys.exit(f"{url}: {errors.group(1)} non-2xx answers\n{out}")

    def latency(pct):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return requests, latency(50), latency(99)


def paced_latency(url, rate, seconds, headers=(), load_pids=()):
    """Latency percentiles (ms) at a fixed offered load: oha sends `rate` requests a second
    whatever the answers' speed, and corrects for coordinated omission, so that two targets
    are compared at the same load (wrk, which waits for each answer, loads a faster target
    more). Also how busy the load core was: oha's CPU time and that of `load_pids` (the
    upstream) over the run, as a share of one core."""
    args = ["taskset", "-c", LOAD_CORE, "oha", "--no-tui", "--output-format", "json",
            "--latency-correction", "-z", f"{seconds}s", "-c", "64", "-q", str(rate)]
    for header in headers:
        args += ["-H", header]
    before = os.times()
    load_before = sum(cpu_seconds_tree(load_pids))
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    after = os.times()
    load_after = sum(cpu_seconds_tree(load_pids))
    oha_cpu = (after.children_user + after.children_system
               - before.children_user - before.children_system)
    result = json.loads(out)
    if result["summary"]["successRate"] < 1.0:
        sys.exit(f"{url}: failed requests at {rate} req/s")
    percentiles = result["latencyPercentiles"]
    return {"p50": percentiles["p50"] * 1000, "p99": percentiles["p99"] * 1000,
            "load_core": (oha_cpu + load_after - load_before) / seconds}


def measure(target, seconds):
    pids = target["pids"]()
    user_before, system_before = cpu_seconds_tree(pids)
    started = time.time()
    requests, p50, p99 = wrk(target["url"], seconds, headers=target.get("headers", ()))
    wall = time.time() - started
    user_after, system_after = cpu_seconds_tree(pids)
    user, system = user_after - user_before, system_after - system_before
    return {"rps": requests / wall, "p50": p50, "p99": p99,
            "per_cpu_s": requests / max(user + system, 1e-9),
            "user_us": user / requests * 1e6, "system_us": system / requests * 1e6}


# Each connection makes one request, waits for its answer and stays open: what the gateway
# keeps per idle keep-alive client. (Sending all 10,000 requests before reading any answer
# would measure something else: 10,000 requests in flight at once, each with an upstream
# connection of its own, whose memory the allocator keeps after the burst.)
IDLE_CLIENT = r"""
import socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /public/ HTTP/1.1\r\nHost: bench\r\n\r\n")
    s.recv(65536)
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


def rss_with_idle_connections(port, pid, count):
    client = subprocess.Popen(
        [sys.executable, "-c", IDLE_CLIENT, str(port), str(count)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    line = client.stdout.readline().strip()
    if line != "ready":
        sys.exit("the idle-connection client failed")
    # Idle means idle: an HTTP/1 connection sheds hyper's buffers after 50 ms without a
    # request (src/server/shedding.rs); a second is far past that for the last one made.
    time.sleep(1)
    rss = rss_mb([pid])
    client.stdin.close()
    client.wait()
    return rss


# The n-th login of round r sends the code `bench-n-r`: the mock WeChat makes it user
# `bench-n`'s, so that each round logs the same users in again, each with a code never sent
# before. A code sent again would get the remembered outcome of its one exchange (SPEC §7),
# without WeChat or the store's session_key write.
LOGIN_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local body = '{"code":"bench-' .. counter .. '-ROUND"}'
  return wrk.format("POST", "/auth/login", {["Content-Type"] = "application/json"}, body)
end
"""


def login_script(workdir, round_number):
    path = os.path.join(workdir, f"login-{round_number}.lua")
    with open(path, "w") as f:
        f.write(LOGIN_SCRIPT.replace("ROUND", str(round_number)))
    return path


# Compared for latency at the same load (SPEC §10: p99 no worse than nginx's).
PACED_TARGETS = ("nginx proxy_pass", "wxgate required, HS256")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--idle-connections", type=int, default=10000)
    parser.add_argument("--paced-rate", type=int, default=0,
                        help="requests a second for the latency comparison at the same load "
                             "(default: a quarter of the slower target's measured rate)")
    parser.add_argument("--paced-rounds", type=int, default=15,
                        help="runs of each target at that load: a p99 takes more runs than a "
                             "rate to settle, as one stall of the host moves a whole run's")
    parser.add_argument("--paced-seconds", type=int, default=5)
    opts = parser.parse_args()
    for tool in ("nginx", "wrk", "oha", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: bench/run.sh installs it")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    workdir = tempfile.mkdtemp(prefix="wxgate-bench-")
    procs = Procs(workdir)
    try:
        ports = {name: free_port() for name in
                 ("upstream", "nginx", "plain", "relay", "pipelined", "mock", "hs", "es", "verify_nginx", "login")}
        upstream = start_upstream(procs, workdir, ports["upstream"], core=LOAD_CORE)
        nginx = start_nginx_proxy(procs, workdir, ports["nginx"], ports["upstream"])
        plain = nginx_conf(workdir, "plain", f"""
    server {{
        listen 127.0.0.1:{ports['plain']};
        location / {{ proxy_pass http://127.0.0.1:{ports['upstream']}; }}
    }}""")
        plain_nginx = procs.start("nginx-plain", ["nginx", "-c", plain], core=PROXY_CORE)
        relay = procs.start("relay", [RELAY, f"127.0.0.1:{ports['relay']}", f"127.0.0.1:{ports['upstream']}"],
                            core=PROXY_CORE)
        pipelined = procs.start("pipelined-relay", [PIPELINED_RELAY, f"127.0.0.1:{ports['pipelined']}",
                                                    f"127.0.0.1:{ports['upstream']}"], core=PROXY_CORE)
        procs.start("mock", [WXGATE, "mock-wechat", "--listen", f"127.0.0.1:{ports['mock']}"], core=LOAD_CORE)
        env = dict(os.environ, TOKIO_WORKER_THREADS="1", RUST_LOG="warn")

        hs_conf = wxgate_conf(workdir, "hs", ports["hs"], ports["mock"], ports["upstream"],
                              f'[token]\nsecret = "{JWT_SECRET}"', 'backend = "memory"')
        hs = procs.start("wxgate-hs256", [WXGATE, "--log-format", "json", "serve", "--config", hs_conf], env=env, core=PROXY_CORE)

        es_token = es256_token_section(workdir)
        es = None
        if es_token:
            es_conf = wxgate_conf(workdir, "es", ports["es"], ports["mock"], ports["upstream"],
                                  es_token, 'backend = "memory"')
            es = procs.start("wxgate-es256", [WXGATE, "--log-format", "json", "serve", "--config", es_conf], env=env, core=PROXY_CORE)

        verify_conf = nginx_conf(workdir, "verify", f"""
    upstream app {{ server 127.0.0.1:{ports['upstream']}; keepalive 128; }}
    upstream wxgate {{ server 127.0.0.1:{ports['hs']}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{ports['verify_nginx']};
        location = /_verify {{
            internal;
            proxy_pass http://wxgate/auth/verify;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
        }}
        location / {{
            auth_request /_verify;
            auth_request_set $openid $upstream_http_x_wx_openid;
            proxy_set_header X-WX-OpenID $openid;
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}""")
        verify_nginx = procs.start("nginx-auth-request", ["nginx", "-c", verify_conf], core=PROXY_CORE)

        for port in (ports["upstream"], ports["nginx"], ports["relay"], ports["pipelined"], ports["mock"], ports["hs"], ports["verify_nginx"]):
            wait_port(port)
        if es:
            wait_port(ports["es"])
        time.sleep(0.5)

        hs_token = login(ports["hs"], "bench-hs")
        targets = {
            "nginx proxy_pass": {"url": f"http://127.0.0.1:{ports['nginx']}/", "pids": lambda: [nginx.pid] + children(nginx.pid)},
            # The same request as the required route's, token included: what nginx costs when
            # it forwards what a mini-program sends. The ratio's baseline stays the lighter
            # request above, the harder comparison for wxgate.
            "nginx proxy_pass, same request as wxgate's": {
                "url": f"http://127.0.0.1:{ports['nginx']}/", "pids": lambda: [nginx.pid] + children(nginx.pid),
                "headers": [f"Authorization: Bearer {hs_token}"]},
            "nginx proxy_pass, default config": {"url": f"http://127.0.0.1:{ports['plain']}/", "pids": lambda: [plain_nginx.pid]},
            "relay, no HTTP": {"url": f"http://127.0.0.1:{ports['relay']}/", "pids": lambda: [relay.pid]},
            "relay, pipelined": {"url": f"http://127.0.0.1:{ports['pipelined']}/", "pids": lambda: [pipelined.pid]},
            "wxgate public route": {"url": f"http://127.0.0.1:{ports['hs']}/public/", "pids": lambda: [hs.pid]},
            "wxgate required, HS256": {"url": f"http://127.0.0.1:{ports['hs']}/api/", "pids": lambda: [hs.pid],
                                       "headers": [f"Authorization: Bearer {hs_token}"]},
            "nginx auth_request → wxgate /auth/verify": {
                "url": f"http://127.0.0.1:{ports['verify_nginx']}/", "pids": lambda: [verify_nginx.pid, hs.pid],
                "headers": [f"Authorization: Bearer {hs_token}"]},
        }
        if es:
            es_token = login(ports["es"], "bench-es")
            targets["wxgate required, ES256"] = {"url": f"http://127.0.0.1:{ports['es']}/api/", "pids": lambda: [es.pid],
                                                 "headers": [f"Authorization: Bearer {es_token}"]}

        idle_rss = {"HS256": rss_mb([hs.pid])}
        results = {name: [] for name in targets}
        order = list(targets.items())
        for round_number in range(opts.rounds):
            # Each round starts one target later, so that no target always runs first or last,
            # and every other round runs backwards, so that no target always follows the same
            # one (the auth_request run, which loads the HS256 gateway too).
            shift = round_number % len(order)
            rotated = order[shift:] + order[:shift]
            for name, target in rotated if round_number % 2 == 0 else rotated[::-1]:
                results[name].append(measure(target, opts.seconds))
            print(f"round {round_number + 1}/{opts.rounds} done", file=sys.stderr)

        def median(name, key):
            return statistics.median(run[key] for run in results[name])

        base = median("nginx proxy_pass", "per_cpu_s")
        print("\n| target | req/s | p50 ms | p99 ms | req per CPU-second | vs nginx | user µs/req | system µs/req |")
        print("|---|---|---|---|---|---|---|---|")
        for name in targets:
            per_cpu = median(name, "per_cpu_s")
            print(f"| {name} | {median(name, 'rps'):.0f} | {median(name, 'p50'):.3f} | {median(name, 'p99'):.3f} "
                  f"| {per_cpu:.0f} | {per_cpu / base:.2f}× | {median(name, 'user_us'):.2f} | {median(name, 'system_us'):.2f} |")
        same_request = median("nginx proxy_pass, same request as wxgate's", "per_cpu_s")
        for name in ("wxgate required, HS256", "wxgate required, ES256"):
            if name in targets:
                print(f"{name} against nginx given the same request: "
                      f"{median(name, 'per_cpu_s') / same_request:.2f}×")
                # Each round's own ratio, against the nginx run of the same round: the host
                # drifts less within a round than across the whole benchmark, and the spread of
                # these ratios shows how far the median above can be trusted.
                ratios = sorted(run["per_cpu_s"] / nginx_run["per_cpu_s"]
                                for run, nginx_run in zip(results[name], results["nginx proxy_pass"]))
                print(f"{name} against nginx in the same round: median {statistics.median(ratios):.2f}×, "
                      f"{ratios[0]:.2f}× to {ratios[-1]:.2f}× over {len(ratios)} rounds")

        # A fixed rate would compare an overloaded target's queue with a loaded one's on a day the
        # shared host is slow, so the rate follows what the slower of the two managed. A quarter
        # of it, not more: oha costs the load core about twice what wrk does, and with the
        # upstream beside it that core is full at about half the proxies' rate, where the p99
        # is the load generator's own queue, whichever proxy is in front.
        paced_rate = opts.paced_rate or int(min(median(name, "rps") for name in PACED_TARGETS) / 4000) * 1000
        # Both get the same request, the token included: the load generator and the upstream
        # then do the same work for either, and only the proxy differs.
        paced_headers = targets["wxgate required, HS256"]["headers"]
        paced = {name: [] for name in PACED_TARGETS}
        for paced_round in range(opts.paced_rounds):
            for name in PACED_TARGETS[::1 if paced_round % 2 == 0 else -1]:
                paced[name].append(paced_latency(targets[name]["url"], paced_rate, opts.paced_seconds,
                                                 paced_headers, [upstream.pid]))
        print(f"\nAt the same offered load, {paced_rate} requests a second, the same request to both "
              f"(oha, medians of {opts.paced_rounds} runs of {opts.paced_seconds} s):\n")
        print("| target | p50 ms | p99 ms | load core busy |")
        print("|---|---|---|---|")
        for name in PACED_TARGETS:
            runs = paced[name]
            p50 = statistics.median(run["p50"] for run in runs)
            p99 = statistics.median(run["p99"] for run in runs)
            busy = statistics.median(run["load_core"] for run in runs)
            print(f"| {name} | {p50:.3f} | {p99:.3f} | {busy:.0%} |")
        print("p99 of each run, in order: " + "; ".join(
            f"{name}: " + ", ".join(f"{run['p99']:.2f}" for run in paced[name]) for name in PACED_TARGETS))

        rss_idle_conns = rss_with_idle_connections(ports["hs"], hs.pid, opts.idle_connections)
        print(f"\nwxgate RSS: idle {idle_rss['HS256']:.1f} MB; with {opts.idle_connections} idle keep-alive connections {rss_idle_conns:.1f} MB")

        store_path = os.path.join(workdir, "bench.redb")
        login_conf = wxgate_conf(workdir, "login", ports["login"], ports["mock"], ports["upstream"],
                                 f'[token]\nsecret = "{JWT_SECRET}"', f'backend = "embedded"\npath = "{store_path}"')
        login_gw = procs.start("wxgate-login", [WXGATE, "--log-format", "json", "serve", "--config", login_conf], env=env, core=PROXY_CORE)
        try:
            wait_port(ports["login"], timeout=10)
            logins = [wrk(f"http://127.0.0.1:{ports['login']}/", opts.seconds, script=login_script(workdir, number))
                      for number in range(1, opts.rounds + 1)]
            rates = [count / opts.seconds for count, _, _ in logins]
            print(f"logins per second (mock WeChat, embedded store): {statistics.median(rates):.0f}")
        except SystemExit as err:
            print(f"logins per second: not measured ({err}); see {workdir}/wxgate-login.log")
        print(f"\nmachine: {os.cpu_count()} cores, {open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}")
    finally:
        procs.stop()


if __name__ == "__main__":
    main()
