// A stand-in for the mini-program's `wx` global: just the calls wxgate.js makes, behaving the
// way the base library documents them.
'use strict';

const http = require('node:http');

// `user` names the person logging in: the mock WeChat takes a code's text, less a trailing
// `-<digits>`, as the user, and a code works once, so `user-1`, `user-2`, … are one person
// logging in again and again, like wx.login handing out a new code each time.
function fakeWx(user) {
  const storage = new Map();
  // Answers held back from the caller (see `hold`), and promises waiting on `answers`.
  const holds = [];
  const waiters = [];

  // Hands an answer to the caller, unless a hold keeps it back.
  function answer(method, path, res, deliver) {
    const hold = holds.find((h) => h.method === method && h.path === path);
    if (hold) {
      hold.queue.push(() => answer(method, path, res, deliver));
      return;
    }
    deliver();
    const error = res.data && typeof res.data === 'object' ? res.data.error : undefined;
    fake.answers.push({ method, path, statusCode: res.statusCode, error });
    for (const waiter of waiters.slice()) {
      if (waiter.until(fake.answers)) {
        waiters.splice(waiters.indexOf(waiter), 1);
        waiter.resolve();
      }
    }
  }

  const fake = {
    // Codes handed out before the generated ones: `invalid`, `limited`, … (see the mock).
    codes: [],
    logins: 0,
    // Every wx.request made, as {method, path, header}.
    requests: [],
    // Every answer handed to a caller, in that order, as {method, path, statusCode, error}.
    answers: [],

    // Keeps the answers to `method path` from their callers until `release()`: the request
    // reaches the gateway and is answered, but the caller hears nothing yet.
    hold(method, path) {
      const hold = { method, path, queue: [] };
      holds.push(hold);
      return {
        release() {
          holds.splice(holds.indexOf(hold), 1);
          // On a later turn, so that whatever the test does right after releasing runs first,
          // as it would while the network carries the answer.
          setImmediate(() => hold.queue.forEach((deliver) => deliver()));
        },
      };
    },

    // Resolves once `until(answers)` holds, checked now and after every answer. By the time
    // the awaiting test goes on, the caller has run its callback for that answer and the
    // promise reactions the callback set off.
    whenAnswered(until) {
      if (until(fake.answers)) return Promise.resolve();
      return new Promise((resolve) => waiters.push({ until, resolve }));
    },

    login({ success, fail }) {
      fake.logins += 1;
      const code = fake.codes.length ? fake.codes.shift() : `${user}-${fake.logins}`;
      setImmediate(() => (code === null ? fail({ errMsg: 'login:fail' }) : success({ code, errMsg: 'login:ok' })));
    },

    request(options) {
      const method = (options.method || 'GET').toUpperCase();
      const header = { 'content-type': 'application/json', ...options.header };
      let url = options.url;
      let body;
      if (options.data !== undefined) {
        // wx.request puts GET data in the query string and JSON-encodes an object body.
        if (method === 'GET') {
          url += (url.includes('?') ? '&' : '?') + new URLSearchParams(options.data);
        } else {
          body = typeof options.data === 'string' ? options.data : JSON.stringify(options.data);
        }
      }
      const path = new URL(url).pathname;
      fake.requests.push({ method, path, header });
      const req = http.request(url, { method, headers: header, timeout: options.timeout || 60000 });
      req.on('timeout', () => req.destroy(new Error('timeout')));
      req.on('error', (err) => options.fail && options.fail({ errMsg: `request:fail ${err.message}` }));
      req.on('response', (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (chunk) => (text += chunk));
        res.on('end', () => {
          let data = text;
          if ((options.dataType || 'json') === 'json') {
            try {
              data = JSON.parse(text);
            } catch {
              // Like wx.request: a body that is not JSON arrives as the string it is.
            }
          }
          const answered = { data, statusCode: res.statusCode, header: res.headers, errMsg: 'request:ok' };
          answer(method, path, answered, () => options.success(answered));
        });
      });
      req.end(body);
    },

    // WeChat storage keeps a copy, not the object itself.
    setStorageSync(key, value) {
      storage.set(key, JSON.stringify(value));
    },
    getStorageSync(key) {
      return storage.has(key) ? JSON.parse(storage.get(key)) : '';
    },
    removeStorageSync(key) {
      storage.delete(key);
    },

    refreshes() {
      return fake.requests.filter((r) => r.method === 'POST' && r.path === '/auth/refresh').length;
    },
  };
  return fake;
}

module.exports = { fakeWx };
