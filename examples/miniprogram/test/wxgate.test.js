// wxgate.js against a real gateway and the mock WeChat, with `wx` stood in for by fake-wx.js.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');

const { createClient } = require('../wxgate.js');
const { fakeWx } = require('../test-support/fake-wx.js');
const { startStack, postJson } = require('../test-support/stack.js');

let stack;
before(async () => {
  stack = await startStack();
});
after(() => stack && stack.stop());

// A fresh `wx` for `user` (wxgate.js reads the global, as in a mini-program) and a client.
function setup(user) {
  const wx = fakeWx(user);
  globalThis.wx = wx;
  return { wx, client: createClient({ baseUrl: stack.baseUrl }) };
}

function stored(wx) {
  return wx.getStorageSync('wxgate.session');
}

// Breaks the stored access token's signature: the gateway answers 401 invalid_token and the
// client has to renew. (A token that really expires: expiry.test.js.)
function spoilAccessToken(wx) {
  const session = stored(wx);
  const original = session.access_token;
  session.access_token = original.slice(0, -4) + (original.endsWith('AAAA') ? 'BBBB' : 'AAAA');
  wx.setStorageSync('wxgate.session', session);
  return original;
}

async function rejection(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail('expected a rejection');
}

function count(wx, method, path) {
  return wx.requests.filter((r) => r.method === method && r.path === path).length;
}

test('login posts the wx.login code and keeps the tokens in storage', async () => {
  const { wx, client } = setup('login-alice');
  const answer = await client.login();
  assert.equal(wx.logins, 1);
  assert.equal(answer.token_type, 'Bearer');
  assert.match(answer.openid, /^o/);
  const session = stored(wx);
  assert.equal(session.access_token, answer.access_token);
  assert.equal(session.refresh_token, answer.refresh_token);
  assert.deepEqual(client.session(), { openid: answer.openid, unionid: answer.unionid });
});

test('appid and storageKey are honoured, and an unknown appid is unknown_app', async () => {
  const wx = fakeWx('options-abe');
  globalThis.wx = wx;
  const shop = createClient({ baseUrl: stack.baseUrl, appid: stack.appid, storageKey: 'shop' });
  const { openid } = await shop.login();
  assert.equal(wx.getStorageSync('shop').openid, openid);
  assert.equal(stored(wx), '');

  const other = createClient({ baseUrl: stack.baseUrl, appid: 'wx00000000000000zz', storageKey: 'other' });
  const err = await rejection(other.login());
  assert.equal(err.code, 'unknown_app');
  assert.equal(err.status, 400);
});

test('login passes encryptedData and iv on and resolves with the decrypted user', async () => {
  const { client } = setup('profile-bea');
  const { openid } = await client.login();
  const sealed = await postJson(`${stack.mockUrl}/mock/encrypt`, {
    appid: stack.appid,
    openid,
    data: { nickName: 'Bea', avatarUrl: 'https://example.com/bea.png' },
  });
  assert.equal(sealed.status, 200);
  const answer = await client.login({ encryptedData: sealed.body.encryptedData, iv: sealed.body.iv });
  assert.deepEqual(answer.user, { nickName: 'Bea', avatarUrl: 'https://example.com/bea.png' });
});

test('login passes rawData and signature on, and the gateway checks them', async () => {
  const { client } = setup('sig-wes');
  const { openid } = await client.login();
  // What wx.getUserInfo would hand over beside its rawData, signed by the mock with the
  // user's session_key.
  const rawData = JSON.stringify({ nickName: 'Wes', gender: 0 });
  const signed = await postJson(`${stack.mockUrl}/mock/sign`, { appid: stack.appid, openid, rawData });
  assert.equal(signed.status, 200);
  const { signature } = signed.body;
  const answer = await client.login({ rawData, signature });
  assert.equal(answer.openid, openid);

  const forged = await rejection(client.login({ rawData: JSON.stringify({ nickName: 'Mallory' }), signature }));
  assert.equal(forged.code, 'invalid_signature');
  assert.equal(forged.status, 400);
});

test('request logs in first when there is no session and the upstream sees the openid', async () => {
  const { wx, client } = setup('call-carl');
  const res = await client.request({ url: '/api/orders', data: { page: 2 }, header: { 'X-Trace': 't1' } });
  assert.equal(wx.logins, 1);
  assert.equal(res.statusCode, 200);
  assert.equal(res.data.method, 'GET');
  assert.equal(res.data.url, '/api/orders?page=2');
  assert.equal(res.data.headers['x-wx-openid'], client.session().openid);
  assert.equal(res.data.headers['x-wx-appid'], stack.appid);
  assert.equal(res.data.headers['x-trace'], 't1');
});

test('a POST body reaches the upstream as JSON', async () => {
  const { client } = setup('post-dora');
  const res = await client.request({ url: '/api/orders', method: 'POST', data: { sku: 42 } });
  assert.equal(res.data.method, 'POST');
  assert.deepEqual(JSON.parse(res.data.body), { sku: 42 });
});

test('a refused access token is refreshed once and the call retried', async () => {
  const { wx, client } = setup('refresh-ed');
  await client.login();
  const before = stored(wx).refresh_token;
  spoilAccessToken(wx);
  const res = await client.request({ url: '/api/me' });
  assert.equal(res.statusCode, 200);
  assert.equal(res.data.headers['x-wx-openid'], client.session().openid);
  assert.equal(wx.refreshes(), 1);
  assert.equal(wx.logins, 1, 'a refresh that works needs no new login');
  assert.equal(count(wx, 'GET', '/api/me'), 2);
  assert.notEqual(stored(wx).refresh_token, before, 'the rotated refresh token is kept');
});

// Ten calls go out with a refused token; the refresh the first 401 starts is answered, but
// its answer is held until all ten 401s are back, so the other nine meet it under way.
async function tenRefusedAtOnce(wx, client, name) {
  const refresh = wx.hold('POST', '/auth/refresh');
  const calls = Promise.all(Array.from({ length: 10 }, (_, i) => client.request({ url: `/api/${name}/${i}` })));
  await wx.whenAnswered(
    (answers) => answers.filter((a) => a.statusCode === 401 && a.path.startsWith(`/api/${name}/`)).length === 10,
  );
  refresh.release();
  return calls;
}

test('ten calls refused at once share exactly one refresh', { timeout: 30000 }, async () => {
  const { wx, client } = setup('burst-fay');
  const { openid } = await client.login();
  spoilAccessToken(wx);
  const answers = await tenRefusedAtOnce(wx, client, 'burst');
  assert.equal(wx.refreshes(), 1);
  assert.equal(wx.logins, 1);
  answers.forEach((res, i) => {
    assert.equal(res.statusCode, 200);
    assert.equal(res.data.url, `/api/burst/${i}`);
    assert.equal(res.data.headers['x-wx-openid'], openid);
  });
  // Each went out twice: refused with the spoiled token, then retried with the new one.
  for (let i = 0; i < 10; i++) assert.equal(count(wx, 'GET', `/api/burst/${i}`), 2);
  assert.equal(wx.answers.filter((a) => a.path.startsWith('/api/burst/') && a.statusCode === 200).length, 10);
});

test('ten calls refused at once with a refused refresh share one refresh and one new login', { timeout: 30000 }, async () => {
  const { wx, client } = setup('burst-gil');
  const { openid } = await client.login();
  const session = stored(wx);
  session.refresh_token = 'not-a-refresh-token';
  wx.setStorageSync('wxgate.session', session);
  spoilAccessToken(wx);
  const answers = await tenRefusedAtOnce(wx, client, 'relogin');
  assert.equal(wx.refreshes(), 1);
  assert.equal(wx.logins, 2, 'the first login and exactly one new one');
  assert.deepEqual(
    wx.answers.filter((a) => a.path === '/auth/refresh').map((a) => a.error),
    ['invalid_refresh_token'],
  );
  answers.forEach((res, i) => {
    assert.equal(res.statusCode, 200);
    assert.equal(res.data.url, `/api/relogin/${i}`);
    assert.equal(res.data.headers['x-wx-openid'], openid);
  });
  for (let i = 0; i < 10; i++) assert.equal(count(wx, 'GET', `/api/relogin/${i}`), 2);
});

test('a call after a renewal finished uses the new token without refreshing again', async () => {
  const { wx, client } = setup('late-gus');
  await client.login();
  spoilAccessToken(wx);
  await client.request({ url: '/api/first' });
  await client.request({ url: '/api/second' });
  assert.equal(wx.refreshes(), 1);
  assert.equal(count(wx, 'GET', '/api/second'), 1);
});

test('a refused refresh token leads to a new login and the call still succeeds', async () => {
  const { wx, client } = setup('relogin-hal');
  const { openid } = await client.login();
  const session = stored(wx);
  session.refresh_token = 'not-a-refresh-token';
  wx.setStorageSync('wxgate.session', session);
  spoilAccessToken(wx);
  const res = await client.request({ url: '/api/me' });
  assert.equal(res.statusCode, 200);
  assert.equal(res.data.headers['x-wx-openid'], openid);
  assert.equal(wx.refreshes(), 1);
  assert.equal(wx.logins, 2);
  assert.notEqual(stored(wx).refresh_token, 'not-a-refresh-token');
});

test("a business API's own 401 is its answer: no refresh, and the call is not sent twice", async () => {
  const { wx, client } = setup('pin-quinn');
  await client.login();
  const err = await rejection(
    client.request({ url: '/api/pay/status/401', method: 'POST', data: { pin: '0000' } }),
  );
  assert.equal(err.status, 401);
  assert.equal(err.code, 'http_error');
  assert.equal(wx.refreshes(), 0);
  assert.equal(count(wx, 'POST', '/api/pay/status/401'), 1);
  assert.equal(stack.upstream.filter((seen) => seen.url === '/api/pay/status/401').length, 1);
});

test('a session stored without its refresh token logs in again rather than failing every call', async () => {
  const { wx, client } = setup('bare-rhea');
  await client.login();
  const session = stored(wx);
  delete session.refresh_token;
  wx.setStorageSync('wxgate.session', session);
  spoilAccessToken(wx);
  const res = await client.request({ url: '/api/orders' });
  assert.equal(res.statusCode, 200);
  assert.equal(wx.refreshes(), 1);
  assert.equal(wx.logins, 2);
  assert.ok(stored(wx).refresh_token);
});

test('a login the page asked for that fails leaves calls on the stored session alone', async () => {
  const { wx, client } = setup('profile-sol');
  await client.login();
  wx.codes.push(null);
  const relogin = rejection(client.login());
  // Started while the login is under way, so it waits for it.
  const call = client.request({ url: '/api/orders' });
  assert.equal((await relogin).code, 'wx_login_failed');
  assert.equal((await call).statusCode, 200);
  assert.equal(wx.logins, 2);
});

test('a refused refresh token is forgotten even when the new login fails', async () => {
  const { wx, client } = setup('relogin-ivy');
  await client.login();
  const session = stored(wx);
  session.refresh_token = 'not-a-refresh-token';
  wx.setStorageSync('wxgate.session', session);
  spoilAccessToken(wx);
  wx.codes.push(null);
  const err = await rejection(client.request({ url: '/api/me' }));
  assert.equal(err.code, 'wx_login_failed');
  assert.equal(stored(wx), '', 'the dead session is gone');
  assert.equal(client.session(), null);
  // The next call logs in afresh instead of sending the dead tokens again.
  const res = await client.request({ url: '/api/me' });
  assert.equal(res.statusCode, 200);
  assert.equal(wx.refreshes(), 1);
  assert.equal(count(wx, 'GET', '/api/me'), 2);
});

test('decrypt opens data sealed with the session_key, without its watermark', async () => {
  const { client } = setup('decrypt-ida');
  const { openid } = await client.login();
  const steps = { stepInfoList: [{ timestamp: 1700000000, step: 8421 }] };
  const sealed = await postJson(`${stack.mockUrl}/mock/encrypt`, { appid: stack.appid, openid, data: steps });
  assert.equal(sealed.status, 200);
  assert.deepEqual(await client.decrypt(sealed.body.encryptedData, sealed.body.iv), steps);
});

test('decrypt with a stale session_key logs in again and rejects so the page refetches', async () => {
  const { wx, client } = setup('stale-jo');
  const { openid } = await client.login();
  // Data sealed with someone else's session_key stands in for data sealed with a key a later
  // wx.login rotated: the gateway cannot open either with the key it holds.
  const other = await postJson(`${stack.baseUrl}/auth/login`, { code: 'stale-other-1' });
  const foreign = await postJson(`${stack.mockUrl}/mock/encrypt`, {
    appid: stack.appid,
    openid: other.body.openid,
    data: { secret: 'not yours' },
  });
  const err = await rejection(client.decrypt(foreign.body.encryptedData, foreign.body.iv));
  assert.equal(err.code, 'session_key_stale');
  assert.equal(err.status, 409);
  assert.equal(wx.logins, 2, 'the client logged in again');

  const refetched = await postJson(`${stack.mockUrl}/mock/encrypt`, {
    appid: stack.appid,
    openid,
    data: { runs: 3 },
  });
  assert.deepEqual(await client.decrypt(refetched.body.encryptedData, refetched.body.iv), { runs: 3 });
});

test('phone exchanges a getPhoneNumber code for the number', async () => {
  const { client } = setup('phone-kim');
  await client.login();
  const number = await client.phone('phone-kim-1');
  assert.match(number.phone_number, /^138\d{8}$/);
  assert.equal(number.pure_phone_number, number.phone_number);
  assert.equal(number.country_code, '86');
});

test('a refused phone code rejects with invalid_code and the WeChat errcode', async () => {
  const { client } = setup('phone-lou');
  await client.login();
  const err = await rejection(client.phone('invalid'));
  assert.equal(err.code, 'invalid_code');
  assert.equal(err.status, 400);
  assert.equal(err.wechatErrcode, 40029);
});

test('logout revokes the session and forgets the tokens', async () => {
  const { wx, client } = setup('logout-max');
  const { access_token, refresh_token } = await client.login();
  await client.logout();
  assert.equal(stored(wx), '');
  assert.equal(client.session(), null);
  const call = await postJson(`${stack.baseUrl}/api/me`, {}, { authorization: `Bearer ${access_token}` });
  assert.equal(call.status, 401);
  assert.equal(call.body.error, 'token_revoked');
  const refresh = await postJson(`${stack.baseUrl}/auth/refresh`, { refresh_token });
  assert.equal(refresh.status, 401);
  assert.equal(refresh.body.error, 'invalid_refresh_token');
});

test('logout with a refused access token refreshes first, so the session is still revoked', async () => {
  const { wx, client } = setup('logout-ned');
  await client.login();
  const original = spoilAccessToken(wx);
  await client.logout();
  assert.equal(wx.refreshes(), 1);
  assert.equal(wx.logins, 1, 'logging out never logs in');
  assert.equal(stored(wx), '');
  const call = await postJson(`${stack.baseUrl}/api/me`, {}, { authorization: `Bearer ${original}` });
  assert.equal(call.body.error, 'token_revoked');
});

test('logout with a refused refresh token resolves and forgets the tokens', async () => {
  const { wx, client } = setup('logout-nia');
  await client.login();
  const session = stored(wx);
  session.refresh_token = 'not-a-refresh-token';
  wx.setStorageSync('wxgate.session', session);
  spoilAccessToken(wx);
  await client.logout();
  assert.equal(wx.refreshes(), 1);
  assert.equal(wx.logins, 1, 'logging out never logs in');
  assert.equal(stored(wx), '');
  assert.equal(client.session(), null);
});

test('logout whose session another logout ended meanwhile never logs in', async () => {
  const { wx, client } = setup('logout-tess');
  await client.login();
  spoilAccessToken(wx);
  // The session is read as the call starts, and its 401 comes back later: a second logout (a
  // double tap) finishes in between.
  const logout = client.logout();
  wx.removeStorageSync('wxgate.session');
  await logout;
  assert.equal(wx.logins, 1, 'logging out never logs in');
  assert.equal(wx.refreshes(), 0);
  assert.equal(stored(wx), '');
});

test('logout without a session makes no request', async () => {
  const { wx, client } = setup('logout-ola');
  await client.logout();
  assert.equal(wx.requests.length, 0);
});

test('an invalid code rejects with invalid_code, and logging in again works', async () => {
  const { wx, client } = setup('code-pia');
  wx.codes.push('invalid');
  const err = await rejection(client.login());
  assert.equal(err.code, 'invalid_code');
  assert.equal(err.status, 400);
  assert.equal(err.wechatErrcode, 40029);
  assert.equal(stored(wx), '');
  assert.match((await client.login()).openid, /^o/);
});

test('rate_limited carries retryAfter in seconds', async () => {
  const { wx, client } = setup('busy-quinn');
  wx.codes.push('limited');
  const err = await rejection(client.login());
  assert.equal(err.code, 'rate_limited');
  assert.equal(err.status, 429);
  assert.equal(typeof err.retryAfter, 'number');
  assert.ok(err.retryAfter >= 1);
});

test('a failing wx.login rejects with wx_login_failed and sends nothing', async () => {
  const { wx, client } = setup('nologin-rae');
  wx.codes.push(null);
  const err = await rejection(client.request({ url: '/api/me' }));
  assert.equal(err.code, 'wx_login_failed');
  assert.equal(wx.requests.length, 0);
});

test('gateway errors on business calls surface their code', async () => {
  const { client } = setup('route-sam');
  const err = await rejection(client.request({ url: '/nowhere' }));
  assert.equal(err.code, 'no_route');
  assert.equal(err.status, 404);
});

test('request refuses a full URL, so the token never leaves for another host', async () => {
  const { wx, client } = setup('url-tia');
  const err = await rejection(client.request({ url: 'https://elsewhere.example/api' }));
  assert.ok(err instanceof TypeError);
  assert.equal(err.code, 'bad_url');
  assert.equal(wx.requests.length, 0);
});

test("request runs the caller's success and complete once, after the renewal and retry", async () => {
  const { wx, client } = setup('callback-vic');
  await client.login();
  spoilAccessToken(wx);
  const calls = [];
  const res = await client.request({
    url: '/api/callbacks',
    success: (answer) => calls.push(['success', answer]),
    fail: (err) => calls.push(['fail', err]),
    complete: (answer) => calls.push(['complete', answer]),
  });
  assert.equal(count(wx, 'GET', '/api/callbacks'), 2, 'refused once, then retried');
  assert.deepEqual(calls, [['success', res], ['complete', res]]);
  assert.equal(res.statusCode, 200);
});

test("request runs the caller's fail and complete once with the error", async () => {
  const { client } = setup('callback-wu');
  for (const [url, code] of [
    ['/nowhere', 'no_route'],
    ['https://elsewhere.example/api', 'bad_url'],
  ]) {
    const calls = [];
    const err = await rejection(
      client.request({
        url,
        success: (answer) => calls.push(['success', answer]),
        fail: (failure) => calls.push(['fail', failure]),
        complete: (outcome) => calls.push(['complete', outcome]),
      }),
    );
    assert.equal(err.code, code);
    assert.deepEqual(calls, [['fail', err], ['complete', err]]);
  }
});

test('a caller who uses only the callbacks leaves no unhandled rejection', async () => {
  const { client } = setup('callback-xan');
  const unhandled = [];
  const record = (reason) => unhandled.push(reason);
  process.on('unhandledRejection', record);
  try {
    const err = await new Promise((resolve) => {
      client.request({ url: '/nowhere', fail: resolve });
    });
    assert.equal(err.code, 'no_route');
    // Node reports unhandled rejections once the microtasks of a turn have run: a turn later,
    // any there was has been reported.
    await new Promise((resolve) => setImmediate(resolve));
    assert.deepEqual(unhandled, []);
  } finally {
    process.removeListener('unhandledRejection', record);
  }
});

test('an unreachable gateway rejects with network_error', async () => {
  const wx = fakeWx('down-uma');
  globalThis.wx = wx;
  // Port 1 on loopback: nothing listens there.
  const client = createClient({ baseUrl: 'http://127.0.0.1:1' });
  const err = await rejection(client.login());
  assert.equal(err.code, 'network_error');
  assert.match(err.message, /^request:fail/);
});
