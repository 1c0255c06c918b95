// A real wxgate, the mock WeChat and a business API on free loopback ports, for the tests.
// (Outside test/ and not named *.test.js, so the test runner does not take it for a test.)
'use strict';

const { spawn, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');

const REPO = path.resolve(__dirname, '..', '..', '..');
const APPID = 'wx00000000000000aa';
const STARTUP_TIMEOUT_MS = 30000;

// `$WXGATE_BIN` as it is, else target/debug/wxgate after a `cargo build`. The build runs every
// time, not only when the binary is missing: someone who edits the Rust code and runs only
// these tests would otherwise test the binary of an older build, and when nothing changed the
// build is a check of a fraction of a second.
function binary() {
  if (process.env.WXGATE_BIN) return process.env.WXGATE_BIN;
  // stdout would be read as test output by `node --test`: keep cargo on stderr.
  const cargo = spawnSync('cargo', ['build'], { cwd: REPO, stdio: ['ignore', 2, 2] });
  if (cargo.error) throw new Error(`cannot run cargo build: ${cargo.error.message}`);
  if (cargo.status !== 0) throw new Error('cargo build failed');
  return path.join(REPO, 'target', 'debug', 'wxgate');
}

// Starts `wxgate ARGS` and resolves with the address of the JSON log line whose message is
// `message`: both servers listen on port 0 and say where they landed.
function startWxgate(args, message) {
  const child = spawn(binary(), ['--log-format', 'json', ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, RUST_LOG: 'info' },
  });
  // A test run that dies before its `after` hook must not leave servers behind.
  const reap = () => child.kill('SIGKILL');
  process.once('exit', reap);
  child.once('exit', () => process.removeListener('exit', reap));
  return new Promise((resolve, reject) => {
    let log = '';
    let pending = '';
    const timer = setTimeout(() => fail(new Error(`no "${message}" within ${STARTUP_TIMEOUT_MS} ms`)), STARTUP_TIMEOUT_MS);
    function fail(err) {
      clearTimeout(timer);
      child.kill('SIGKILL');
      err.message += `\n${log}`;
      reject(err);
    }
    child.on('error', fail);
    const earlyExit = (code) => fail(new Error(`wxgate ${args[0]} exited with ${code}`));
    child.on('exit', earlyExit);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      log += chunk;
      pending += chunk;
      const lines = pending.split('\n');
      pending = lines.pop();
      for (const line of lines) {
        let entry;
        try {
          entry = JSON.parse(line);
        } catch {
          continue;
        }
        if (entry.message === message && entry.addr) {
          clearTimeout(timer);
          child.removeListener('exit', earlyExit);
          // Keep draining stderr so a chatty child never blocks on a full pipe.
          child.stderr.removeAllListeners('data');
          child.stderr.resume();
          resolve({ child, url: `http://${entry.addr}` });
        }
      }
    });
  });
}

// The business API: answers every request with what it received, identity headers included,
// with status 200, or NNN for a path ending in /status/NNN.
function startUpstream() {
  const seen = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => (body += chunk));
    req.on('end', () => {
      const echo = { method: req.method, url: req.url, headers: req.headers, body };
      seen.push(echo);
      const status = /\/status\/(\d{3})$/.exec(req.url);
      res.writeHead(status ? Number(status[1]) : 200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(echo));
    });
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => resolve({ server, seen, port: server.address().port }));
  });
}

// `token` overrides string keys of the gateway's [token] table: { access_ttl: '1s' }.
async function startStack({ token = {} } = {}) {
  const children = [];
  const upstream = await startUpstream();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wxgate-miniprogram-'));
  try {
    const mock = await startWxgate(['mock-wechat', '--listen', '127.0.0.1:0'], 'mock WeChat listening');
    children.push(mock.child);
    const config = path.join(dir, 'config.toml');
    fs.writeFileSync(
      config,
      `[server]
listen = "127.0.0.1:0"
admin_listen = ""
[wechat]
hosts = ["${mock.url}"]
[[wechat.apps]]
appid = "${APPID}"
secret = "test-app-secret"
[token]
${Object.entries({ secret: 'test-jwt-secret-at-least-32-bytes-long!!', access_ttl: '2h', ...token })
  .map(([key, value]) => `${key} = ${JSON.stringify(value)}`)
  .join('\n')}
[store]
backend = "memory"
# Every test logs in from 127.0.0.1: the per-IP login limit would only make them flaky.
[rate_limit]
login_per_ip_per_minute = 0
[[routes]]
path = "/api/"
upstream = "http://127.0.0.1:${upstream.port}"
auth = "required"
`,
    );
    const gateway = await startWxgate(['serve', '--config', config], 'wxgate listening');
    children.push(gateway.child);
    return {
      appid: APPID,
      baseUrl: gateway.url,
      mockUrl: mock.url,
      upstream: upstream.seen,
      async stop() {
        await Promise.all(children.map(stopChild));
        upstream.server.closeAllConnections();
        await new Promise((resolve) => upstream.server.close(resolve));
        fs.rmSync(dir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    await Promise.all(children.map(stopChild));
    upstream.server.close();
    fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

function stopChild(child) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    child.once('exit', resolve);
    child.kill('SIGTERM');
  });
}

// Sends a request and resolves with {status, body} (the body parsed as JSON): for the tests'
// own calls to the mock and the gateway, outside the client under test.
function callJson(method, url, body, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, {
      method,
      headers: { 'content-type': 'application/json', ...headers },
    });
    req.on('error', reject);
    req.on('response', (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => (text += chunk));
      res.on('end', () => resolve({ status: res.statusCode, body: text ? JSON.parse(text) : null }));
    });
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}

function postJson(url, body, headers) {
  return callJson('POST', url, body, headers);
}

function getJson(url, headers) {
  return callJson('GET', url, undefined, headers);
}

module.exports = { startStack, postJson, getJson };
