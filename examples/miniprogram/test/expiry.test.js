// An access token that really expires (access_ttl 1s, no leeway) is refreshed without the
// page noticing. Its own file because it needs a gateway with short-lived tokens.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');

const { createClient } = require('../wxgate.js');
const { fakeWx } = require('../test-support/fake-wx.js');
const { startStack, getJson } = require('../test-support/stack.js');

let stack;
before(async () => {
  stack = await startStack({ token: { access_ttl: '1s', leeway: '0s' } });
});
after(() => stack && stack.stop());

// Resolves once the gateway answers `token` with 401 token_expired: expiry is what is under
// test, so this waits for the gateway to say so rather than for a clock.
async function expired(token) {
  for (;;) {
    const me = await getJson(`${stack.baseUrl}/auth/me`, { authorization: `Bearer ${token}` });
    if (me.status === 401) {
      assert.equal(me.body.error, 'token_expired');
      return;
    }
    assert.equal(me.status, 200);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

test('an expired access token is refreshed and the call retried', { timeout: 30000 }, async () => {
  const wx = fakeWx('expiry-vera');
  globalThis.wx = wx;
  const client = createClient({ baseUrl: stack.baseUrl });
  const { openid, access_token } = await client.login();
  await expired(access_token);

  const res = await client.request({ url: '/api/me' });
  assert.equal(res.statusCode, 200);
  assert.equal(res.data.headers['x-wx-openid'], openid);
  assert.deepEqual(
    wx.answers.map((a) => [a.method, a.path, a.statusCode, a.error]),
    [
      ['POST', '/auth/login', 200, undefined],
      ['GET', '/api/me', 401, 'token_expired'],
      ['POST', '/auth/refresh', 200, undefined],
      ['GET', '/api/me', 200, undefined],
    ],
  );
  assert.equal(wx.logins, 1, 'a refresh that works needs no new login');
  assert.notEqual(wx.getStorageSync('wxgate.session').access_token, access_token);
});
