/*
 * wxgate.js: the mini-program side of wxgate. Copy this file into your project (for example
 * as utils/wxgate.js); it needs nothing else.
 *
 *   var wxgate = require('./utils/wxgate.js');
 *   var client = wxgate.createClient({ baseUrl: 'https://api.example.com' });
 *   client.request({ url: '/api/orders' }).then(function (res) { ... });
 *
 * The client logs in with wx.login when it has no session, sends the access token on every
 * call, refreshes it when the gateway refuses it (401), and logs in again when the refresh is
 * refused. Every failure rejects with an Error carrying the gateway's error code, or one of
 * this file's own, in `.code` (see README, "For mini-program developers").
 *
 * Written in ES5 with Promises so it runs on every base library without the "ES6 to ES5"
 * compile step.
 */
'use strict';

var DEFAULT_STORAGE_KEY = 'wxgate.session';

// wx.request's callbacks: request() takes them out of the options it passes on.
var CALLBACKS = { success: true, fail: true, complete: true };

function createClient(options) {
  if (!options || typeof options.baseUrl !== 'string' || !options.baseUrl) {
    throw new TypeError('wxgate.createClient: baseUrl is required');
  }
  var baseUrl = options.baseUrl.replace(/\/+$/, '');
  // The gateway's server.auth_path, for operators who moved it.
  var authPath = (options.authPath || '/auth').replace(/\/+$/, '');
  var appid = options.appid;
  var storageKey = options.storageKey || DEFAULT_STORAGE_KEY;

  // The login or refresh under way. Everyone who needs a new session waits for this one
  // promise: a refresh token rotates on every use, so ten callers refreshing on their own
  // would spend it ten times, and the gateway takes a late reuse for theft.
  var renewing = null;

  function load() {
    var session = wx.getStorageSync(storageKey);
    return session && session.access_token ? session : null;
  }

  function save(answer) {
    var session = {
      access_token: answer.access_token,
      refresh_token: answer.refresh_token,
      openid: answer.openid
    };
    if (answer.unionid) session.unionid = answer.unionid;
    wx.setStorageSync(storageKey, session);
    return session;
  }

  function forget() {
    wx.removeStorageSync(storageKey);
  }

  // Runs `task` once the renewal under way (if any) has settled, as the new renewal. The
  // failure of a task that is `callersOwn` (a login the page asked for) is its caller's alone:
  // whoever waits on it goes on with the session stored, which a failed login leaves as it was.
  function exclusive(task, callersOwn) {
    var mine = (renewing || Promise.resolve()).then(task, task);
    var waitedOn = callersOwn ? mine.then(null, function () {}) : mine;
    renewing = waitedOn;
    var clear = function () {
      if (renewing === waitedOn) renewing = null;
    };
    waitedOn.then(clear, clear);
    return mine;
  }

  function doLogin(opts) {
    return wxLogin().then(function (code) {
      var body = { code: code };
      if (appid) body.appid = appid;
      ['encryptedData', 'iv', 'rawData', 'signature'].forEach(function (name) {
        if (opts[name]) body[name] = opts[name];
      });
      return send({ url: authPath + '/login', method: 'POST', data: body }).then(function (res) {
        save(res.data);
        return res.data;
      });
    });
  }

  function doRefresh(session, relogin) {
    return send({
      url: authPath + '/refresh',
      method: 'POST',
      data: { refresh_token: session.refresh_token }
    }).then(
      function (res) {
        return save(res.data);
      },
      function (err) {
        // A network failure or a 5xx keeps the session: the next call refreshes again. Any
        // other refusal (invalid_refresh_token, refresh_token_reused, or a session stored
        // without its refresh token) ends it.
        if (err.status === 0 || err.status >= 500) throw err;
        forget();
        if (!relogin) throw err;
        return doLogin({}).then(load);
      }
    );
  }

  // A session newer than the one that earned `stale` its 401: waits for the renewal under
  // way, reuses one that finished meanwhile, or starts one. Without `relogin`, a session that
  // is gone stays gone.
  function renew(stale, relogin) {
    if (renewing) {
      return renewing.then(function () {
        return renew(stale, relogin);
      });
    }
    var session = load();
    if (session && session.access_token !== stale) return Promise.resolve(session);
    if (!session && !relogin) return Promise.resolve(null);
    return exclusive(function () {
      return session ? doRefresh(session, relogin) : doLogin({}).then(load);
    }).then(load);
  }

  function currentSession(relogin) {
    var waited = renewing ? renewing.then(load) : Promise.resolve(load());
    return waited.then(function (session) {
      if (session || !relogin) return session;
      return renew(null, true);
    });
  }

  // A call with the bearer token; a 401 earns one renewal and one retry.
  // `relogin` false (logout) never starts a wx.login.
  function authed(req, relogin) {
    return currentSession(relogin).then(function (session) {
      if (!session) throw wxgateError('not_logged_in', 'no session: call login() first', 0);
      return send(withBearer(req, session.access_token)).catch(function (err) {
        // Only the gateway's refusal of the token: a business API's own 401 ("wrong PIN") is
        // its answer to the call, which must not be sent twice.
        if (!err.tokenRefused) throw err;
        return renew(session.access_token, relogin).then(function (fresh) {
          if (!fresh) throw err;
          return send(withBearer(req, fresh.access_token));
        });
      });
    });
  }

  function login(opts) {
    return exclusive(function () {
      return doLogin(opts || {});
    }, true);
  }

  // The caller's success / fail / complete, like wx.request's, run once with the outcome the
  // promise settles with: never once per attempt, whatever renewals and retries came between.
  function request(options) {
    var req = {};
    var callbacks = {};
    for (var name in options || {}) {
      if (CALLBACKS[name]) callbacks[name] = options[name];
      else req[name] = options[name];
    }
    var outcome;
    if (typeof req.url !== 'string' || req.url.charAt(0) !== '/') {
      // A full URL could point at another host, and the bearer token would go with it.
      var err = new TypeError('wxgate request: url must be a path on the gateway, like "/api/orders"');
      err.code = 'bad_url';
      err.status = 0;
      outcome = Promise.reject(err);
    } else {
      outcome = authed(req, true);
    }
    if (callbacks.success || callbacks.fail || callbacks.complete) {
      // Handling the rejection here also keeps a caller who uses only the callbacks from
      // seeing an unhandled rejection, as with wx.request.
      outcome.then(
        function (res) {
          if (callbacks.success) callbacks.success(res);
          if (callbacks.complete) callbacks.complete(res);
        },
        function (err) {
          if (callbacks.fail) callbacks.fail(err);
          if (callbacks.complete) callbacks.complete(err);
        }
      );
    }
    return outcome;
  }

  function logout() {
    return authed({ url: authPath + '/logout', method: 'POST' }, false).then(
      function () {
        forget();
      },
      function (err) {
        // The tokens go whatever happened: a user who logs out must not stay logged in on
        // this device because the network failed (the gateway's session then just runs out).
        // A 401 means the gateway already refused the session: as logged out as it gets.
        forget();
        if (err.status !== 401 && err.code !== 'not_logged_in') throw err;
      }
    );
  }

  function decrypt(encryptedData, iv) {
    return authed({
      url: authPath + '/decrypt',
      method: 'POST',
      data: { encryptedData: encryptedData, iv: iv }
    }, true).then(
      function (res) {
        return res.data.data;
      },
      function (err) {
        if (err.code !== 'session_key_stale') throw err;
        // The data was sealed with a session_key the gateway no longer holds. A new login
        // hands it the current one; the data must then be fetched from WeChat again, which
        // only the page can do, so the page still gets the error.
        return login().then(function () {
          throw err;
        });
      }
    );
  }

  function phone(code) {
    return authed({ url: authPath + '/phone', method: 'POST', data: { code: code } }, true)
      .then(function (res) {
        return res.data;
      });
  }

  // wx.request as a promise: resolves below 400, rejects with a wxgate error otherwise.
  function send(req) {
    return new Promise(function (resolve, reject) {
      var call = {};
      for (var name in req) call[name] = req[name];
      call.url = baseUrl + req.url;
      call.success = function (res) {
        if (res.statusCode < 400) resolve(res);
        else reject(fromResponse(res));
      };
      call.fail = function (res) {
        reject(wxgateError('network_error', (res && res.errMsg) || 'request failed', 0));
      };
      wx.request(call);
    });
  }

  return {
    login: login,
    request: request,
    logout: logout,
    decrypt: decrypt,
    phone: phone,
    // The stored openid (and unionid when WeChat gave one), or null before the first login.
    session: function () {
      var session = load();
      return session ? { openid: session.openid, unionid: session.unionid } : null;
    }
  };
}

function withBearer(req, token) {
  var copy = {};
  var name;
  for (name in req) copy[name] = req[name];
  copy.header = {};
  for (name in req.header || {}) {
    // The gateway owns Authorization on protected routes: a caller's own would be replaced.
    if (name.toLowerCase() !== 'authorization') copy.header[name] = req.header[name];
  }
  copy.header.Authorization = 'Bearer ' + token;
  return copy;
}

function wxLogin() {
  return new Promise(function (resolve, reject) {
    wx.login({
      success: function (res) {
        resolve(res.code);
      },
      fail: function (res) {
        reject(wxgateError('wx_login_failed', (res && res.errMsg) || 'wx.login failed', 0));
      }
    });
  });
}

function fromResponse(res) {
  var body = res.data;
  var gateway = body && typeof body === 'object' && typeof body.error === 'string';
  var err = wxgateError(
    // A business API's own error body need not follow the gateway's shape.
    gateway ? body.error : 'http_error',
    gateway && body.message ? body.message : 'HTTP ' + res.statusCode,
    res.statusCode
  );
  err.data = body;
  if (gateway && body.wechat_errcode !== undefined) err.wechatErrcode = body.wechat_errcode;
  // The gateway's 401s, and only those, name its realm in their challenge.
  var challenge = headerValue(res.header, 'www-authenticate');
  err.tokenRefused = res.statusCode === 401 && /realm="wxgate"/.test(challenge || '');
  var retryAfter = headerValue(res.header, 'retry-after');
  if (retryAfter !== undefined && !isNaN(Number(retryAfter))) err.retryAfter = Number(retryAfter);
  return err;
}

function wxgateError(code, message, status) {
  var err = new Error(message);
  err.code = code;
  err.status = status;
  return err;
}

// Header names arrive in whatever case the platform hands them over.
function headerValue(headers, wanted) {
  for (var name in headers || {}) {
    if (name.toLowerCase() === wanted) return headers[name];
  }
  return undefined;
}

module.exports = { createClient: createClient };
