// A stand-in for the mini-program's `wx` global: just the calls wxgate.js makes, behaving the
// way the base library documents them.
'use strict';

const http = require('node:http');

// `user` names the person logging in: the mock WeChat takes a code's text, less a trailing
// `-<digits>`, as the user, and a code works once, so `user-1`, `user-2`, … are one person
// logging in again and again, like wx.login handing out a new code each time.
function fakeWx(user) {
  const storage = new Map();
  const fake = {
    // Codes handed out before the generated ones: `invalid`, `limited`, … (see the mock).
    codes: [],
    logins: 0,
    // Every wx.request made, as {method, path, header}.
    requests: [],

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
      fake.requests.push({ method, path: new URL(url).pathname, header });
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
          options.success({ data, statusCode: res.statusCode, header: res.headers, errMsg: 'request:ok' });
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
