// A refresh token used again after the gateway's 10 s grace is taken for stolen: the gateway
// answers refresh_token_reused and revokes the session. The client must log in afresh.
// Its own file because it waits out the grace, and `node --test` runs files in parallel.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');

const { createClient } = require('../wxgate.js');
const { fakeWx } = require('../test-support/fake-wx.js');
const { startStack, postJson } = require('../test-support/stack.js');

// The gateway's reuse grace (SPEC §6), plus a margin.
const PAST_GRACE_MS = 11000;

let stack;
before(async () => {
  stack = await startStack();
});
after(() => stack && stack.stop());

test('a reused refresh token leads to a new login in a new session', async () => {
  const wx = fakeWx('reuse-vic');
  globalThis.wx = wx;
  const client = createClient({ baseUrl: stack.baseUrl });
  const { openid } = await client.login();
  const old = wx.getStorageSync('wxgate.session');

  // Rotate the refresh token: a 401 makes the client refresh.
  wx.setStorageSync('wxgate.session', { ...old, access_token: 'refused' });
  await client.request({ url: '/api/me' });
  const rotated = wx.getStorageSync('wxgate.session');
  assert.equal(wx.refreshes(), 1);

  // Storage rolled back past the rotation (a restored backup, a copied device): the client
  // holds the old refresh token once more.
  await new Promise((resolve) => setTimeout(resolve, PAST_GRACE_MS));
  wx.setStorageSync('wxgate.session', { ...old, access_token: 'refused' });
  const res = await client.request({ url: '/api/me' });
  assert.equal(res.statusCode, 200);
  assert.equal(res.data.headers['x-wx-openid'], openid);
  assert.equal(wx.refreshes(), 2);
  assert.equal(wx.logins, 2);

  // The reuse revoked the session it belonged to, the rotated pair included.
  const call = await postJson(`${stack.baseUrl}/api/me`, {}, { authorization: `Bearer ${rotated.access_token}` });
  assert.equal(call.body.error, 'token_revoked');
});
