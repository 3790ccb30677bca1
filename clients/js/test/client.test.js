// Unit tests of the client library: a fake WebSocket played by the test, an injected clock
// and random source. No real time, no sleeps.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  RinggateClient,
  RinggateError,
  SeenSet,
  backoffDelay,
  compareIds,
  memoryStorage,
  retryDelay,
} from '../src/ringgate.js';
import { FakeClock, fakeWebSocket, settle } from '../test-support/fakes.js';

/** A client as alice in dev mode over fakes; `events` records every event in order. */
function setup(opts = {}) {
  const clock = opts.clock || new FakeClock();
  const ws = opts.ws || fakeWebSocket();
  const storage = opts.storage || memoryStorage();
  const client = new RinggateClient({
    url: 'ws://gw.test/ws',
    user: 'alice',
    WebSocket: ws.WS,
    clock,
    random: opts.random || (() => 0.5),
    storage,
    ...opts.options,
  });
  const events = [];
  for (const name of ['state', 'message', 'accepted', 'delivered', 'read', 'typing', 'presence', 'room', 'joined', 'gap', 'summary', 'fetched', 'synced', 'error', 'welcome', 'left']) {
    client.on(name, (data) => events.push({ event: name, ...data }));
  }
  const of = (name) => events.filter((e) => e.event === name);
  return { client, clock, ws, storage, events, of };
}

/** Start and complete the handshake as `user`; returns the socket. */
function connect(t, user = 'alice') {
  if (t.client.state === 'idle') t.client.start();
  const s = t.ws.last();
  s.open();
  s.welcome(user);
  return s;
}

const msg = (seq, from, cid, id = String(100 + seq), body = { text: `m${seq}` }) => ({
  op: 'msg', seq, id, from, cid, ts: 1, body,
});

// ---- connecting and auth ----------------------------------------------------------------

test('by default the token goes in the first frame, not in the URL', () => {
  const t = setup({ options: { user: undefined, token: 'jwt.abc.def', device: 'phone', summary: true } });
  t.client.start();
  const s = t.ws.last();
  const url = new URL(s.url);
  assert.equal(url.pathname, '/ws');
  assert.equal(url.searchParams.get('token'), null);
  assert.equal(url.searchParams.get('user'), null);
  assert.equal(url.searchParams.get('auth'), 'frame', 'the gateway\'s opt-in for first-frame auth');
  assert.equal(url.searchParams.get('device'), 'phone');
  assert.equal(url.searchParams.get('summary'), '1');
  s.open();
  assert.deepEqual(s.sent[0], { op: 'auth', token: 'jwt.abc.def' });
});

test('dev mode authenticates with {op:auth,user}; authInUrl puts user or token in the URL', () => {
  const t = setup();
  t.client.start();
  t.ws.last().open();
  assert.deepEqual(t.ws.last().sent, [{ op: 'auth', user: 'alice' }]);
  const u = setup({ options: { authInUrl: true } });
  u.client.start();
  u.ws.last().open();
  assert.equal(new URL(u.ws.last().url).searchParams.get('user'), 'alice');
  assert.equal(new URL(u.ws.last().url).searchParams.get('auth'), null, 'auth=frame with a token in the URL is a 400');
  assert.deepEqual(u.ws.last().sent, [], 'no auth frame when the URL carries it');
  const v = setup({ options: { authInUrl: true, user: undefined, token: 'a.b.c' } });
  v.client.start();
  assert.equal(new URL(v.ws.last().url).searchParams.get('token'), 'a.b.c');
});

test('4001: getToken is called again and the client reconnects; a fresh token refused at once stops', async () => {
  const tokens = ['t1', 't2', 't3'];
  let calls = 0;
  const t = setup({ options: { user: undefined, getToken: async () => tokens[calls++] } });
  t.client.start();
  await settle();
  assert.equal(calls, 1);
  let s = t.ws.last();
  s.open();
  assert.deepEqual(s.sent[0], { op: 'auth', token: 't1' });
  s.recv({ op: 'error', code: 'unauthorized', message: 'token expired' });
  s.serverClose(4001, 'unauthorized');
  assert.equal(t.client.state, 'reconnecting');
  t.clock.advance(0);
  await settle();
  assert.equal(calls, 2, 'a fresh token was asked for');
  s = t.ws.last();
  s.open();
  assert.deepEqual(s.sent[0], { op: 'auth', token: 't2' });
  s.recv({ op: 'error', code: 'unauthorized', message: 'bad signature' });
  s.serverClose(4001, 'unauthorized');
  assert.equal(t.client.state, 'stopped');
  const stopped = t.of('state').at(-1);
  assert.equal(stopped.reason, 'unauthorized');
  assert.equal(stopped.error.message, 'bad signature');
  t.clock.advance(3_600_000);
  await settle();
  assert.equal(t.ws.sockets.length, 2, 'no reconnect after stopping');
});

test('4001 after a session that was welcomed refreshes again (not "at once")', async () => {
  let calls = 0;
  const t = setup({ options: { user: undefined, getToken: async () => `t${++calls}` } });
  t.client.start();
  await settle();
  connect(t);
  t.ws.last().serverClose(4001);
  t.clock.advance(0);
  await settle();
  connect(t);
  t.ws.last().serverClose(4001);
  assert.equal(t.client.state, 'reconnecting', 'the second token had been accepted');
  assert.equal(calls, 2);
});

test('4001 without getToken stops with unauthorized (a static token cannot get better)', () => {
  const t = setup();
  t.client.start();
  t.ws.last().open();
  t.ws.last().serverClose(4001);
  assert.equal(t.client.state, 'stopped');
  assert.equal(t.of('state').at(-1).reason, 'unauthorized');
  assert.equal(t.clock.timers.length, 0, 'nothing scheduled');
});

test('4001 with retry_ms (the key is being refetched) is retried with the same token, never a stop', () => {
  // A static token: a plain 4001 would stop it at once (above).
  const t = setup();
  t.client.start();
  for (let i = 0; i < 3; i++) {
    const s = t.ws.last();
    s.open();
    s.recv({ op: 'error', code: 'unauthorized', message: 'invalid token: unknown kid', retry_ms: 1000 });
    s.serverClose(4001, 'unknown kid');
    assert.equal(t.client.state, 'reconnecting', `round ${i}`);
    const before = t.ws.sockets.length;
    t.clock.advance(999);
    assert.equal(t.ws.sockets.length, before, 'not before retry_ms');
    t.clock.advance(8_000); // retry_ms + jitter, or the backoff (capped here at 500 * 2^3)
    assert.equal(t.ws.sockets.length, before + 1, 'came back');
  }
});

test('4003 forbidden is permanent: stopped, no reconnect', () => {
  const t = setup({ options: { getToken: async () => 'x' } });
  t.client.start();
  return settle().then(() => {
    t.ws.last().open();
    t.ws.last().recv({ op: 'error', code: 'forbidden', message: 'Origin not allowed' });
    t.ws.last().serverClose(4003);
    assert.equal(t.client.state, 'stopped');
    assert.equal(t.of('state').at(-1).reason, 'forbidden');
    t.clock.advance(10_000_000);
    assert.equal(t.ws.sockets.length, 1);
  });
});

for (const [code, name] of [[4029, 'rate_limited'], [4503, 'unavailable']]) {
  test(`${code} ${name}: reconnects after retry_ms plus at most half of it as jitter`, () => {
    for (const r of [0, 0.999]) {
      const t = setup({ random: () => r });
      t.client.start();
      t.ws.last().open();
      t.ws.last().recv({ op: 'error', code: name, message: 'busy', retry_ms: 4000 });
      t.ws.last().serverClose(code);
      const st = t.of('state').at(-1);
      assert.equal(st.state, 'reconnecting');
      assert.ok(st.delayMs >= 4000 && st.delayMs <= 6000, `delay ${st.delayMs}`);
      t.clock.advance(3999);
      assert.equal(t.ws.sockets.length, 1, 'not before retry_ms');
      t.clock.advance(2001);
      assert.equal(t.ws.sockets.length, 2, 'by retry_ms x 1.5');
    }
  });
}

test('other closes (1001, 1006, 1008, 1011, 1012, 1013) reconnect with backoff', () => {
  for (const code of [1001, 1006, 1008, 1011, 1012, 1013]) {
    const t = setup({ random: () => 0.999, options: { backoffMinMs: 100, backoffMaxMs: 1000 } });
    connect(t);
    t.ws.last().serverClose(code);
    assert.equal(t.client.state, 'reconnecting', `close ${code}`);
    assert.ok(t.of('state').at(-1).delayMs < 100, `first backoff within min for ${code}`);
    t.clock.advance(100);
    assert.equal(t.ws.sockets.length, 2, `reconnected after ${code}`);
  }
});

test('backoff: full jitter within min*2^n capped at max, growing while attempts fail, reset by welcome', () => {
  assert.equal(backoffDelay(0, 500, 30000, () => 0), 0);
  for (let n = 0; n < 60; n++) {
    const cap = Math.min(30000, 500 * 2 ** n);
    assert.ok(backoffDelay(n, 500, 30000, () => 0.999999) < cap);
    assert.ok(backoffDelay(n, 500, 30000, () => 0.999999) >= cap * 0.99);
  }
  assert.equal(retryDelay(1000, () => 0), 1000);
  assert.equal(retryDelay(1000, () => 0.999), 1499);
  // In the client: a socket that never opens, again and again.
  const t = setup({ random: () => 0.999, options: { backoffMinMs: 100, backoffMaxMs: 1000 } });
  t.client.start();
  const delays = [];
  for (let i = 0; i < 8; i++) {
    t.ws.last().serverClose(1006);
    delays.push(t.of('state').at(-1).delayMs);
    t.clock.advance(t.clock.nextIn());
  }
  assert.deepEqual(delays, [99, 199, 399, 799, 999, 999, 999, 999]);
  const s = t.ws.last();
  s.open();
  s.welcome('alice');
  s.serverClose(1006);
  assert.equal(t.of('state').at(-1).delayMs, 99, 'a welcome resets the backoff');
});

test('a connection that never gets its welcome is given up after connectTimeoutMs', () => {
  const t = setup({ options: { connectTimeoutMs: 5000 } });
  t.client.start();
  t.ws.last().open();
  t.clock.advance(4999);
  assert.equal(t.client.state, 'connecting');
  t.clock.advance(1);
  assert.equal(t.client.state, 'reconnecting');
  assert.equal(t.ws.sockets[0].closedByClient.code, 4000);
});

test('silence: a ping after heartbeat_ms, a reconnect after twice that', () => {
  const t = setup();
  const s = connect(t);
  s.sent.length = 0;
  t.clock.advance(30000);
  assert.deepEqual(s.ops('ping'), [{ op: 'ping' }]);
  s.recv({ op: 'pong' }); // at +30 s: the pong counts as a frame
  t.clock.advance(59999);
  assert.equal(t.client.state, 'open');
  t.clock.advance(1);
  assert.equal(t.client.state, 'reconnecting');
  assert.equal(s.closedByClient.code, 4000, 'the dead socket is closed');
});

// ---- acks and display dedup ---------------------------------------------------------------

test('acks are cumulative and sent only after the message handler ran', () => {
  const t = setup();
  const s = connect(t);
  const acksSeenByHandler = [];
  t.client.on('message', () => acksSeenByHandler.push(s.ops('ack').length));
  s.recv(msg(1, 'bob', 'b-1'));
  s.recv(msg(2, 'bob', 'b-2'));
  s.recv(msg(3, 'carol', 'c-1'));
  assert.deepEqual(acksSeenByHandler, [0, 0, 0], 'no ack before the handler ran');
  assert.deepEqual(s.ops('ack'), [], 'acks wait for the batch');
  t.clock.advance(25);
  assert.deepEqual(s.ops('ack'), [{ op: 'ack', seq: 3 }], 'one cumulative ack');
  assert.deepEqual(t.of('message').map((m) => m.cid), ['b-1', 'b-2', 'c-1']);
});

test('a full ack batch is acked at once; read frames are acked like msg', () => {
  const t = setup({ options: { ackBatch: 4 } });
  const s = connect(t);
  for (let i = 1; i <= 3; i++) s.recv(msg(i, 'bob', `b-${i}`));
  s.recv({ op: 'read', seq: 4, by: 'bob', from: 'alice', id: '77', ts: 1 });
  assert.deepEqual(s.ops('ack'), [{ op: 'ack', seq: 4 }]);
});

test('a handler that throws does not stall the inbox (acked, reported)', () => {
  const t = setup();
  const s = connect(t);
  t.client.on('message', () => {
    throw new Error('boom');
  });
  s.recv(msg(1, 'bob', 'b-1'));
  t.clock.advance(25);
  assert.deepEqual(s.ops('ack'), [{ op: 'ack', seq: 1 }]);
  assert.equal(t.of('error').at(-1).code, 'handler');
});

test('display dedup by (from, cid): a replayed or retransmitted msg is acked but shown once', () => {
  const t = setup();
  let s = connect(t);
  s.recv(msg(1, 'bob', 'x-1'));
  s.recv(msg(2, 'carol', 'x-1')); // same cid, another sender: a different message
  s.recv(msg(2, 'carol', 'x-1')); // retransmit, same seq
  s.serverClose(1006); // dropped before the ack: the inbox replays both
  t.clock.advance(t.clock.nextIn());
  s = connect(t);
  s.recv(msg(1, 'bob', 'x-1'));
  s.recv(msg(2, 'carol', 'x-1'));
  s.recv(msg(3, 'bob', 'x-2'));
  t.clock.advance(25);
  assert.deepEqual(
    t.of('message').map((m) => `${m.from}/${m.cid}`),
    ['bob/x-1', 'carol/x-1', 'bob/x-2'],
  );
  assert.deepEqual(s.ops('ack'), [{ op: 'ack', seq: 3 }], 'duplicates are acked all the same');
});

test('an unreadable msg frame is acked by its seq and reported', () => {
  const t = setup();
  const s = connect(t);
  s.recv('{"op":"msg","seq":1,"id":"5","from":"bob","cid":"c","ts":1,"body":{"x":');
  t.clock.advance(25);
  assert.deepEqual(s.ops('ack'), [{ op: 'ack', seq: 1 }]);
  assert.equal(t.of('error').at(-1).code, 'unreadable');
});

test('dedup memory is bounded per sender and in all', () => {
  const seen = new SeenSet(3, 5);
  for (let i = 0; i < 4; i++) seen.add('bob', `b${i}`);
  assert.equal(seen.has('bob', 'b0'), false, 'per-sender bound');
  assert.equal(seen.has('bob', 'b3'), true);
  seen.add('carol', 'c0');
  seen.add('carol', 'c1');
  seen.add('dave', 'd0');
  assert.equal(seen.size, 5);
  assert.equal(seen.has('bob', 'b1'), false, 'the least recent sender loses its oldest first');
  assert.equal(seen.has('dave', 'd0'), true);
  // the client keeps to it, and so does what it persists
  const t = setup({ options: { dedupPerSender: 50, dedupMax: 120 } });
  const s = connect(t);
  for (let i = 1; i <= 1000; i++) s.recv(msg(i, `u${i % 7}`, `c${i}`));
  t.clock.advance(25);
  const saved = JSON.parse(t.storage.getItem('ringgate:alice:seen'));
  const keys = saved.senders.map((from) => JSON.parse(t.storage.getItem(`ringgate:alice:seen/${encodeURIComponent(from)}`)));
  assert.equal(keys.reduce((n, k) => n + k.length, 0), 120);
  assert.ok(keys.every((k) => k.length <= 50));
  // a sender the memory forgot has no entry left behind
  const listed = new Set(saved.senders.map((from) => `ringgate:alice:seen/${encodeURIComponent(from)}`));
  const stored = t.storage.keys().filter((k) => k.startsWith('ringgate:alice:seen/'));
  assert.deepEqual(stored.sort(), [...listed].sort());
});

// ---- sends, resends, order of accepted ----------------------------------------------------

test('sends are resent with their cids, in send order, after a reconnect; accepted ones are not', () => {
  const t = setup();
  let s = connect(t);
  const c1 = t.client.send('bob', { text: 'one' });
  const c2 = t.client.send('bob', { text: 'two' });
  const c3 = t.client.send('carol', { text: 'three' });
  assert.deepEqual(s.ops('send').map((f) => f.cid), [c1, c2, c3]);
  assert.deepEqual(s.ops('send')[0], { op: 'send', to: 'bob', cid: c1, body: { text: 'one' } });
  s.recv({ op: 'accepted', cid: c2, id: '11' });
  s.serverClose(1006);
  const c4 = t.client.send('bob', { text: 'four' }); // while down: waits in the outbox
  t.clock.advance(t.clock.nextIn());
  s = t.ws.last();
  s.open();
  assert.deepEqual(s.ops('send'), [], 'nothing before the welcome');
  s.welcome('alice');
  assert.deepEqual(s.ops('send').map((f) => f.cid), [c1, c3, c4]);
  assert.deepEqual(s.ops('send').map((f) => f.resend), [true, true, undefined], 'c4 had never been written');
  assert.deepEqual(t.client.pending().map((p) => p.cid), [c1, c3, c4]);
  assert.equal(t.of('state').at(-1).resent, 3);
});

test('unavailable with a cid: resent after a backoff; a duplicate answer is told once', () => {
  const t = setup({ random: () => 0.999, options: { backoffMinMs: 200 } });
  const s = connect(t);
  const c1 = t.client.send('bob', 1);
  s.recv({ op: 'error', code: 'unavailable', message: 'store down', cid: c1 });
  assert.equal(t.of('error').at(-1).willRetry, true);
  t.clock.advance(198);
  assert.equal(s.ops('send').length, 1);
  t.clock.advance(1);
  assert.deepEqual(s.ops('send').map((f) => f.cid), [c1, c1], 'resent with the same cid');
  s.recv({ op: 'accepted', cid: c1, id: '5' });
  s.recv({ op: 'accepted', cid: c1, id: '5' });
  assert.equal(t.of('accepted').length, 1);
  assert.deepEqual(t.client.pending(), []);
});

test('rate_limited: not resent before retry_ms; later sends wait behind it, in order', () => {
  const t = setup({ random: () => 0 });
  const s = connect(t);
  const c1 = t.client.send('bob', 1);
  const c2 = t.client.send('bob', 2);
  s.recv({ op: 'error', code: 'rate_limited', message: 'slow down', cid: c1, retry_ms: 1000 });
  s.recv({ op: 'error', code: 'rate_limited', message: 'slow down', cid: c2, retry_ms: 1000 });
  const c3 = t.client.send('bob', 3);
  assert.deepEqual(s.ops('send').map((f) => f.cid), [c1, c2], 'c3 waits for the retry');
  t.clock.advance(999);
  assert.equal(s.ops('send').length, 2);
  t.clock.advance(1);
  assert.deepEqual(s.ops('send').map((f) => f.cid), [c1, c2, c1], 'a probe: the oldest first, alone');
  s.recv({ op: 'accepted', cid: c1, id: '1' });
  assert.deepEqual(s.ops('send').map((f) => f.cid), [c1, c2, c1, c2, c3], 'then 2 at a time, in order');
});

test('at most maxInFlight unanswered sends at once (a reconnect with a full outbox stays within the burst)', () => {
  const t = setup({ options: { maxInFlight: 3 } });
  let s = connect(t);
  const cids = [1, 2, 3, 4, 5].map((n) => t.client.send('bob', n));
  assert.deepEqual(s.ops('send').map((f) => f.cid), cids.slice(0, 3));
  s.recv({ op: 'accepted', cid: cids[0], id: '1' });
  assert.deepEqual(s.ops('send').map((f) => f.cid), cids.slice(0, 4));
  s.serverClose(1006);
  t.clock.advance(t.clock.nextIn());
  s = connect(t);
  assert.deepEqual(s.ops('send').map((f) => f.cid), cids.slice(1, 4), 'the window again on the new connection');
  for (const [i, c] of cids.slice(1).entries()) s.recv({ op: 'accepted', cid: c, id: String(2 + i) });
  assert.deepEqual(s.ops('send').map((f) => f.cid), cids.slice(1));
  assert.deepEqual(t.client.pending(), []);
});

test('a send refused for good (bad_request) leaves the outbox and is reported', () => {
  const t = setup();
  const s = connect(t);
  const c = t.client.send('bob', 1);
  s.recv({ op: 'error', code: 'bad_request', message: 'bad id', cid: c });
  assert.deepEqual(t.client.pending(), []);
  assert.equal(t.of('error').at(-1).dropped, true);
});

test('order: after a reconnect, accepted answers are told in server-id order per recipient', () => {
  const t = setup();
  let s = connect(t);
  const [a, b, c] = [1, 2, 3].map((n) => t.client.send('bob', n));
  const d = t.client.send('carol', 4);
  s.serverClose(1006); // every answer lost
  t.clock.advance(t.clock.nextIn());
  s = connect(t);
  const e = t.client.send('bob', 5); // new, after the resends
  // The dedup answers come back in an order that differs from store order (README, Order).
  s.recv({ op: 'accepted', cid: b, id: '20' });
  s.recv({ op: 'accepted', cid: d, id: '21' }); // carol's batch is only d: told at once
  s.recv({ op: 'accepted', cid: e, id: '40' });
  s.recv({ op: 'delivered', cid: b, id: '20', to: 'bob' });
  s.recv({ op: 'accepted', cid: c, id: '30' });
  assert.deepEqual(t.of('accepted').map((x) => x.cid), [d], 'bob\'s answers are held');
  s.recv({ op: 'accepted', cid: a, id: '10' });
  assert.deepEqual(t.of('accepted').map((x) => x.id), ['21', '10', '20', '30', '40']);
  const told = t.events.filter((x) => x.event === 'accepted' || x.event === 'delivered').map((x) => `${x.event}:${x.cid}`);
  assert.deepEqual(told.slice(2, 4), [`accepted:${b}`, `delivered:${b}`], 'delivered follows its accepted');
});

test('order: a refused resend still holds (another attempt may be stored); held answers are released after holdMaxMs at most', () => {
  const t = setup({ options: { holdMaxMs: 3000 } });
  let s = connect(t);
  const [a, b] = [1, 2].map((n) => t.client.send('bob', n));
  s.serverClose(1006);
  t.clock.advance(t.clock.nextIn());
  s = connect(t);
  s.recv({ op: 'accepted', cid: b, id: '20' });
  assert.equal(t.of('accepted').length, 0);
  s.recv({ op: 'error', code: 'unavailable', message: 'x', cid: a });
  assert.equal(t.of('accepted').length, 0, 'a refusal says this attempt was not taken, not that none was');
  t.clock.advance(t.clock.nextIn()); // the retry
  assert.deepEqual(s.ops('send').at(-1), { op: 'send', to: 'bob', cid: a, body: 1, resend: true });
  s.recv({ op: 'accepted', cid: a, id: '10' }); // stored by the first connection after all
  assert.deepEqual(t.of('accepted').map((x) => x.cid), [a, b]);
  // an answer that never comes
  const t2 = setup({ options: { holdMaxMs: 3000 } });
  let s2 = connect(t2);
  const [x, y] = [1, 2].map((n) => t2.client.send('bob', n));
  s2.serverClose(1006);
  t2.clock.advance(t2.clock.nextIn());
  s2 = connect(t2);
  s2.recv({ op: 'accepted', cid: y, id: '2' });
  t2.clock.advance(5000); // past holdMaxMs
  assert.equal(t2.of('accepted').length, 0, 'held while connected: the gateway owes x an answer');
  s2.serverClose(1006); // and the gateway cannot be reached again
  const lastWrite = t2.clock.now();
  t2.clock.advance(2999);
  assert.equal(t2.of('accepted').length, 0);
  t2.clock.advance(1);
  assert.deepEqual(t2.of('accepted').map((e) => e.cid), [y], `released ${t2.clock.now() - lastWrite} ms after x's last write`);
  s2 = connect(t2);
  s2.recv({ op: 'accepted', cid: x, id: '1' });
  assert.deepEqual(t2.of('accepted').map((e) => e.cid), [y, x]);
});

test('order: stop tells the held answers (sorted) and leaves no timer behind', () => {
  const t = setup();
  let s = connect(t);
  const [a, b] = [1, 2].map((n) => t.client.send('bob', n));
  s.serverClose(1006);
  t.clock.advance(t.clock.nextIn());
  s = connect(t);
  s.recv({ op: 'accepted', cid: b, id: '20' });
  t.client.stop();
  assert.deepEqual(t.of('accepted').map((e) => e.cid), [b]);
  assert.deepEqual(t.clock.timers, []);
  t.client.start();
  s = connect(t);
  assert.deepEqual(s.ops('send').map((f) => f.cid), [a], 'the unanswered one is resent');
  s.recv({ op: 'accepted', cid: a, id: '10' });
  assert.deepEqual(t.of('accepted').map((e) => e.cid), [b, a]);
});

test('without a reconnect too, an answer waits for the older sends to its recipient', () => {
  // (The batch rule before told b at once: only resends after a reconnect held answers.)
  const t = setup();
  const s = connect(t);
  const [a, b] = [1, 2].map((n) => t.client.send('bob', n));
  s.recv({ op: 'accepted', cid: b, id: '2' });
  assert.deepEqual(t.of('accepted').map((e) => e.cid), [], 'a went out first: it may be stored first');
  s.recv({ op: 'accepted', cid: a, id: '3' });
  assert.deepEqual(t.of('accepted').map((e) => e.cid), [b, a], 'sorted by id');
});

// ---- order of accepted: the cases of src/client/order.rs, through the client -----------------
// Transmissions are made by sends, reconnects (every unanswered send again) and retries after
// a refusal; `told` lists what the app heard, `A<n>` / `D<n>` for accepted / delivered of send n.

function orderSetup(options = {}) {
  const t = setup({ options: { holdMaxMs: 10000, ...options } });
  const s = connect(t);
  const names = new Map();
  const send = (to = 'bob') => {
    const cid = t.client.send(to, names.size + 1);
    names.set(cid, String(names.size + 1));
    return cid;
  };
  const told = () =>
    t.events
      .filter((e) => e.event === 'accepted' || e.event === 'delivered')
      .map((e) => (e.event === 'accepted' ? 'A' : 'D') + (names.get(e.cid) ?? e.cid));
  return { t, s, send, told };
}

/** Drop the connection and reconnect: every unanswered send is written again. */
function reconnect(t) {
  t.ws.last().serverClose(1006);
  t.clock.advance(t.clock.nextIn());
  return connect(t);
}

test('order: answers in send order are told at once', () => {
  const { s, send, told } = orderSetup();
  const [a, b] = [send(), send()];
  s.recv({ op: 'accepted', cid: a, id: '9' });
  assert.deepEqual(told(), ['A1']);
  s.recv({ op: 'accepted', cid: b, id: '10' });
  assert.deepEqual(told(), ['A1', 'A2']);
});

test('order: an answer waits for older sends, then all are told by id', () => {
  // 1's answer is late; it was stored before 2 and 3.
  const { s, send, told } = orderSetup();
  const [a, b, c] = [send(), send(), send()];
  s.recv({ op: 'accepted', cid: b, id: '20' });
  s.recv({ op: 'accepted', cid: c, id: '30' });
  assert.deepEqual(told(), []);
  s.recv({ op: 'accepted', cid: a, id: '10' });
  assert.deepEqual(told(), ['A1', 'A2', 'A3']);
});

test('order: answers to resends in resend order are told in store order', () => {
  // 1 and 2 went out; 2 was stored (id 20), 1's attempt failed and its refusal was lost with
  // the connection. After the reconnect both are resent; 1 is stored now (id 30) and answered
  // first, 2 is answered from the dedup window.
  const { t, send, told } = orderSetup();
  const [a, b] = [send(), send()];
  const s = reconnect(t);
  assert.deepEqual(s.ops('send').map((f) => f.cid), [a, b]);
  s.recv({ op: 'accepted', cid: a, id: '30' });
  assert.deepEqual(told(), []);
  s.recv({ op: 'accepted', cid: b, id: '20' });
  assert.deepEqual(told(), ['A2', 'A1']);
});

test('order: a refused send still holds newer answers', () => {
  // 1 was refused here (unavailable) while another attempt of it may have been stored (a dead
  // node's write): 2's answer waits until 1 is accepted.
  const { t, s, send, told } = orderSetup();
  const [a, b] = [send(), send()];
  s.recv({ op: 'accepted', cid: b, id: '8' });
  s.recv({ op: 'error', code: 'unavailable', message: 'x', cid: a });
  assert.deepEqual(told(), []);
  t.clock.advance(t.clock.nextIn()); // the retry writes 1 again
  assert.deepEqual(s.ops('send').map((f) => f.cid), [a, b, a]);
  assert.deepEqual(told(), []);
  s.recv({ op: 'accepted', cid: a, id: '5' });
  assert.deepEqual(told(), ['A1', 'A2']);
});

test('order: sends first transmitted later do not hold an answer', () => {
  const { s, send, told } = orderSetup();
  const [a, b] = [send(), send()];
  s.recv({ op: 'accepted', cid: b, id: '8' });
  assert.deepEqual(told(), []);
  const c = send();
  // 1 answered: 1 and 2 are told; 3 went out after both and holds neither.
  s.recv({ op: 'accepted', cid: a, id: '5' });
  assert.deepEqual(told(), ['A1', 'A2']);
  s.recv({ op: 'accepted', cid: c, id: '9' });
  assert.deepEqual(told(), ['A1', 'A2', 'A3']);
});

test('order: held answers are told in id order as far as they are free', () => {
  // 2 resent after 3 was first sent: 3, unanswered, may have been stored before 2's resend, so
  // 2 waits for 3; 1 does not. (The client writes a refused send again once the window allows:
  // here after 1's answer.)
  const { t, s, send, told } = orderSetup();
  const [a, b, c] = [send(), send(), send()];
  s.recv({ op: 'error', code: 'unavailable', message: 'x', cid: b });
  t.clock.advance(t.clock.nextIn());
  s.recv({ op: 'accepted', cid: a, id: '10' });
  assert.deepEqual(told(), ['A1']);
  assert.deepEqual(s.ops('send').map((f) => f.cid), [a, b, c, b], 'transmitted 1, 2, 3, 2');
  s.recv({ op: 'accepted', cid: b, id: '40' });
  assert.deepEqual(told(), ['A1']);
  s.recv({ op: 'accepted', cid: c, id: '30' });
  assert.deepEqual(told(), ['A1', 'A3', 'A2']);
});

test('order: other recipients are not held', () => {
  const { s, send, told } = orderSetup();
  const [a, b] = [send('bob'), send('carol')];
  s.recv({ op: 'accepted', cid: b, id: '5' });
  assert.deepEqual(told(), ['A2']);
  s.recv({ op: 'accepted', cid: a, id: '7' });
  assert.deepEqual(told(), ['A2', 'A1']);
});

test('order: ids compare as numbers', () => {
  const { s, send, told } = orderSetup();
  const [a, b] = [send(), send()];
  s.recv({ op: 'accepted', cid: b, id: '100' });
  s.recv({ op: 'accepted', cid: a, id: '99' });
  assert.deepEqual(told(), ['A1', 'A2']);
});

test('order: delivered follows its held accepted', () => {
  const { s, send, told } = orderSetup();
  const [a, b] = [send(), send()];
  s.recv({ op: 'accepted', cid: b, id: '8' });
  s.recv({ op: 'delivered', cid: b, id: '8', to: 'bob' });
  assert.deepEqual(told(), [], 'held with its accepted');
  s.recv({ op: 'delivered', cid: 'x-7', id: '3', to: 'bob' });
  assert.deepEqual(told(), ['Dx-7'], 'not held: told at once');
  s.recv({ op: 'accepted', cid: a, id: '5' });
  assert.deepEqual(told(), ['Dx-7', 'A1', 'A2', 'D2']);
});

test('order: a hold lasts while the send it waits for is refused and resent, then runs out holdMaxMs after its last write', () => {
  const t = setup({ options: { holdMaxMs: 3000, backoffMinMs: 1000, backoffMaxMs: 1000 }, random: () => 0.5 });
  let s = connect(t);
  const [a, b] = [1, 2].map((n) => t.client.send('bob', n));
  s.serverClose(1006);
  t.clock.advance(t.clock.nextIn());
  s = connect(t);
  s.recv({ op: 'accepted', cid: b, id: '20' });
  // a store outage: every resend of `a` refused for 10 s, far past holdMaxMs
  for (let i = 0; i < 10; i++) {
    s.recv({ op: 'error', code: 'unavailable', message: 'x', cid: a });
    t.clock.advance(t.clock.nextIn());
    assert.deepEqual(s.ops('send').at(-1), { op: 'send', to: 'bob', cid: a, body: 1, resend: true });
  }
  assert.equal(t.of('accepted').length, 0, 'held while `a` is still being resent');
  s.recv({ op: 'accepted', cid: a, id: '10' });
  assert.deepEqual(t.of('accepted').map((x) => x.cid), [a, b]);
  // without a connection nothing is resent: the hold runs out holdMaxMs after the last write
  const c = t.client.send('bob', 3);
  const d = t.client.send('bob', 4);
  s.recv({ op: 'accepted', cid: d, id: '40' });
  s.serverClose(1006);
  t.clock.advance(2999);
  assert.deepEqual(t.of('accepted').map((x) => x.cid), [a, b]);
  t.clock.advance(1);
  assert.deepEqual(t.of('accepted').map((x) => x.cid), [a, b, d]);
  assert.ok(c);
});

test('order: a hold is released sorted after holdMaxMs', () => {
  const { t, s, send, told } = orderSetup({ holdMaxMs: 10000 });
  const [a, b, c] = [send(), send(), send()];
  s.recv({ op: 'accepted', cid: c, id: '30' });
  s.recv({ op: 'accepted', cid: b, id: '20' });
  s.serverClose(1006); // no connection from now on: nothing is written again
  t.clock.advance(9999);
  assert.deepEqual(told(), []);
  t.clock.advance(1);
  assert.deepEqual(told(), ['A2', 'A3']);
  // 1 is told when it comes.
  const s2 = connect(t);
  s2.recv({ op: 'accepted', cid: a, id: '10' });
  assert.deepEqual(told(), ['A2', 'A3', 'A1']);
});

test('resend: every retransmission of a send carries resend:true, first sends and publishes do not', () => {
  const storage = memoryStorage();
  const t = setup({ storage, random: () => 0 });
  let s = connect(t);
  const a = t.client.send('bob', 1);
  const p = t.client.publish('lobby', 2);
  assert.deepEqual(s.sent.filter((f) => f.op === 'send' || f.op === 'publish').map((f) => f.resend), [undefined, undefined]);
  s = reconnect(t); // after a reconnect
  assert.deepEqual(s.ops('send'), [{ op: 'send', to: 'bob', cid: a, body: 1, resend: true }]);
  assert.deepEqual(s.ops('publish'), [{ op: 'publish', room: 'lobby', cid: p, body: 2 }], 'publishes are not affected');
  s.recv({ op: 'accepted', cid: p, id: '2', offset: 1 });
  s.recv({ op: 'error', code: 'rate_limited', message: 'x', cid: a, retry_ms: 100 });
  t.clock.advance(100); // a retry after a refusal
  assert.deepEqual(s.ops('send').map((f) => [f.cid, f.resend]), [[a, true], [a, true]]);
  const b = t.client.send('bob', 3);
  s.recv({ op: 'accepted', cid: a, id: '1' });
  assert.deepEqual(s.ops('send').at(-1), { op: 'send', to: 'bob', cid: b, body: 3 }, 'a new send: no flag');
  // a reload: the new page's first write of a restored send is a resend
  const r = setup({ storage });
  r.client.start();
  const s2 = r.ws.last();
  s2.open();
  s2.welcome('alice');
  assert.deepEqual(s2.ops('send'), [{ op: 'send', to: 'bob', cid: b, body: 3, resend: true }]);
});

test('order: publishes are held by the same rule, per room, sorted by offset', () => {
  const { t, s, told } = orderSetup();
  const names = (cids) => cids.map((c) => t.events.find((e) => e.event === 'accepted' && e.cid === c)?.offset);
  const [p, q] = [t.client.publish('lobby', 1), t.client.publish('lobby', 2)];
  const r = t.client.publish('hall', 3);
  s.recv({ op: 'accepted', cid: q, id: '9', offset: 34 });
  s.recv({ op: 'accepted', cid: r, id: '8', offset: 2 });
  assert.deepEqual(t.of('accepted').map((e) => e.cid), [r], 'another room is not held');
  s.recv({ op: 'error', code: 'unavailable', message: 'x', cid: p });
  assert.deepEqual(t.of('accepted').map((e) => e.cid), [r], 'a refused publish still holds');
  t.clock.advance(t.clock.nextIn());
  s.recv({ op: 'accepted', cid: p, id: '10', offset: 33 });
  assert.deepEqual(t.of('accepted').map((e) => e.cid), [r, p, q]);
  assert.deepEqual(names([p, q]), [33, 34]);
  assert.equal(told().length, 3);
});

// ---- persistence across a reload ------------------------------------------------------------

test('reload: the outbox is resent with the same cids; the dedup memory and room offsets survive', () => {
  const storage = memoryStorage();
  const t = setup({ storage });
  const s = connect(t);
  const c2 = t.client.send('bob', { text: 'accepted' });
  s.recv({ op: 'accepted', cid: c2, id: '9' }); // told at once: nothing older unanswered
  const c1 = t.client.send('bob', { text: 'kept' });
  s.recv(msg(1, 'bob', 'b-1')); // shown; the page dies before the ack
  t.client.join('lobby');
  s.recv({ op: 'joined', room: 'lobby', offset: 500, recovered: false });
  s.recv({ op: 'room', room: 'lobby', offset: 501, id: '3', from: 'carol', cid: 'r1', ts: 1, body: 1 });
  t.clock.advance(25);
  // reload: a new client on the same storage, the old one simply gone
  const r = setup({ storage });
  assert.deepEqual(r.client.pending(), [], 'nothing restored before start');
  r.client.start();
  assert.deepEqual(r.client.pending().map((p) => p.cid), [c1]);
  const s2 = r.ws.last();
  s2.open();
  s2.welcome('alice');
  assert.deepEqual(s2.ops('send'), [{ op: 'send', to: 'bob', cid: c1, body: { text: 'kept' }, resend: true }], 'sent by the old page');
  s2.recv(msg(1, 'bob', 'b-1')); // replayed: not acked before
  s2.recv(msg(2, 'bob', 'b-2'));
  assert.deepEqual(r.of('message').map((m) => m.cid), ['b-2']);
  r.client.join('lobby');
  assert.deepEqual(s2.ops('join'), [{ op: 'join', room: 'lobby', since: 501 }]);
  const c3 = r.client.send('bob', 3);
  assert.notEqual(c3, c1, 'new cids never reuse an old one');
  assert.notEqual(c3.split('-')[1], c1.split('-')[1], 'a new random prefix per client, even with the same clock');
});

test('reload during a hold: the held answer is told by the next page, in order', () => {
  // b is accepted while a is unanswered: b's answer is held. The page reloads before a is
  // answered; b's accepted must not be lost with the page (its send stays stored as unanswered).
  const storage = memoryStorage();
  const t = setup({ storage });
  const s = connect(t);
  const a = t.client.send('bob', { n: 1 });
  const b = t.client.send('bob', { n: 2 });
  s.recv({ op: 'accepted', cid: b, id: '20' });
  assert.deepEqual(t.of('accepted'), [], 'held behind a');
  const r = setup({ storage });
  r.client.start();
  const s2 = r.ws.last();
  s2.open();
  s2.welcome('alice');
  assert.deepEqual(s2.ops('send').map((f) => [f.cid, f.resend]), [[a, true], [b, true]]);
  s2.recv({ op: 'accepted', cid: b, id: '20' });
  s2.recv({ op: 'accepted', cid: a, id: '10' });
  assert.deepEqual(r.of('accepted').map((e) => [e.cid, e.id]), [[a, '10'], [b, '20']]);
});

test('reload right after a display (before any ack or timer): the message is not shown again', () => {
  // Found by tests/browser_chat.rs in Chromium: the dedup memory was written with the ack,
  // 25 ms after the display, so a reload in between showed the redelivered message twice.
  const storage = memoryStorage();
  const t = setup({ storage });
  const s = connect(t);
  t.client.join('lobby');
  s.recv({ op: 'joined', room: 'lobby', offset: 500, recovered: false });
  s.recv(msg(1, 'bob', 'b-1'));
  s.recv({ op: 'room', room: 'lobby', offset: 501, id: '3', from: 'carol', cid: 'r1', ts: 1, body: 1 });
  // no clock advance: the page goes now
  const r = setup({ storage });
  r.client.start();
  const s2 = r.ws.last();
  s2.open();
  s2.welcome('alice');
  s2.recv(msg(1, 'bob', 'b-1')); // redelivered: it was never acked
  r.client.join('lobby');
  assert.deepEqual(s2.ops('join'), [{ op: 'join', room: 'lobby', since: 501 }]);
  s2.recv({ op: 'joined', room: 'lobby', offset: 501, recovered: true });
  s2.recv({ op: 'room', room: 'lobby', offset: 501, id: '3', from: 'carol', cid: 'r1', ts: 1, body: 1 });
  assert.deepEqual(r.of('message'), []);
  assert.deepEqual(r.of('room'), []);
});

test('storage is namespaced per user (and device)', () => {
  const storage = memoryStorage();
  const a = setup({ storage });
  a.client.start();
  a.client.send('bob', 1);
  const b = setup({ storage, options: { user: 'bob', device: 'tab2' } });
  b.client.start();
  assert.deepEqual(b.client.pending(), []);
  assert.ok(storage.keys().includes('ringgate:alice:outbox'));
  assert.ok(storage.keys().includes('ringgate:bob%2Ftab2:outbox'));
  // a user id that looks like another user's key path gets its own keys
  const c = setup({ storage, options: { user: 'alice:seen/x' } });
  c.client.start();
  c.client.send('bob', 2);
  assert.deepEqual(a.client.pending().length, 1);
  assert.ok(storage.keys().includes('ringgate:alice%3Aseen%2Fx:outbox'));
});

test('a token client restores its namespace from the JWT sub before connecting', async () => {
  const storage = memoryStorage();
  const payload = Buffer.from(JSON.stringify({ sub: 'alice', exp: 9e9 })).toString('base64url');
  const token = `h.${payload}.s`;
  const t = setup({ storage, options: { user: undefined, getToken: async () => token } });
  t.client.start();
  await settle();
  connect(t);
  const cid = t.client.send('bob', 1);
  const r = setup({ storage, options: { user: undefined, getToken: async () => token } });
  r.client.start();
  await settle();
  assert.deepEqual(r.client.pending().map((p) => p.cid), [cid]);
});

test('bounded outbox: over maxOutbox entries or maxOutboxBytes a send throws outbox_full; persisted JSON stays bounded', () => {
  const t = setup({ options: { maxOutbox: 5, maxOutboxBytes: 100000 } });
  t.client.start();
  for (let i = 0; i < 5; i++) t.client.send('bob', i);
  assert.throws(() => t.client.send('bob', 5), (e) => e instanceof RinggateError && e.code === 'outbox_full');
  assert.equal(JSON.parse(t.storage.getItem('ringgate:alice:outbox')).entries.length, 5);
  const u = setup({ options: { maxOutbox: 1000, maxOutboxBytes: 2000 } });
  u.client.start();
  const big = 'x'.repeat(900);
  u.client.send('bob', big);
  u.client.send('bob', big);
  assert.throws(() => u.client.send('bob', big), (e) => e.code === 'outbox_full');
  assert.ok(u.storage.getItem('ringgate:alice:outbox').length < 2100);
  assert.throws(() => u.client.send('bob', 'y'.repeat(70000)), (e) => e.code === 'too_large');
});

test('a storage that throws (quota) is reported and the client goes on in memory', () => {
  const storage = memoryStorage();
  storage.setItem = () => {
    throw new Error('QuotaExceededError');
  };
  const t = setup({ storage });
  const s = connect(t);
  const c = t.client.send('bob', 1);
  assert.equal(t.of('error').at(-1).code, 'storage');
  assert.deepEqual(s.ops('send').map((f) => f.cid), [c]);
});

// ---- rooms ------------------------------------------------------------------------------

test('rooms: re-joined after a reconnect with since = the last offset seen; replay overlap dropped', () => {
  const t = setup();
  let s = connect(t);
  t.client.join('lobby');
  assert.deepEqual(s.ops('join'), [{ op: 'join', room: 'lobby' }]);
  s.recv({ op: 'joined', room: 'lobby', offset: 10, recovered: false });
  for (const o of [11, 12]) s.recv({ op: 'room', room: 'lobby', offset: o, id: `${o}`, from: 'bob', cid: `p${o}`, ts: 1, body: o });
  s.serverClose(1012);
  t.clock.advance(t.clock.nextIn());
  s = connect(t);
  assert.deepEqual(s.ops('join'), [{ op: 'join', room: 'lobby', since: 12 }]);
  for (const o of [12, 13]) s.recv({ op: 'room', room: 'lobby', offset: o, id: `${o}`, from: 'bob', cid: `p${o}`, ts: 1, body: o });
  s.recv({ op: 'joined', room: 'lobby', offset: 13, recovered: true });
  assert.deepEqual(t.of('room').map((r) => r.offset), [11, 12, 13]);
  assert.deepEqual(t.of('joined').map((j) => j.recovered), [false, true]);
});

test('rooms: a gap is reported, recovered by join+since, and the room goes on in offset order', () => {
  const t = setup();
  const s = connect(t);
  t.client.join('lobby');
  s.recv({ op: 'joined', room: 'lobby', offset: 10, recovered: false });
  const room = (o) => ({ op: 'room', room: 'lobby', offset: o, id: `${o}`, from: 'bob', cid: `p${o}`, ts: 1, body: o });
  s.recv(room(11));
  s.recv({ op: 'gap', room: 'lobby', from: 12 }); // 12..14 skipped for us
  assert.deepEqual(t.of('gap'), [{ event: 'gap', room: 'lobby', from: 12 }]);
  assert.deepEqual(s.ops('join').at(-1), { op: 'join', room: 'lobby', since: 11 });
  s.recv(room(15)); // live, before the rejoin's replay
  for (const o of [12, 13, 14, 15]) s.recv(room(o));
  s.recv({ op: 'joined', room: 'lobby', offset: 15, recovered: true });
  s.recv(room(16));
  assert.deepEqual(t.of('room').map((r) => r.offset), [11, 12, 13, 14, 15, 16]);
});

test('rooms: publish is kept and resent like a send; leave forgets the room', () => {
  const t = setup();
  let s = connect(t);
  t.client.join('lobby');
  const p = t.client.publish('lobby', { t: 'hi' });
  assert.deepEqual(s.ops('publish'), [{ op: 'publish', room: 'lobby', cid: p, body: { t: 'hi' } }]);
  s.serverClose(1006);
  t.clock.advance(t.clock.nextIn());
  s = connect(t);
  assert.deepEqual(s.ops('publish').map((f) => f.cid), [p]);
  s.recv({ op: 'accepted', cid: p, id: '7', offset: 33 });
  assert.deepEqual(t.of('accepted').at(-1), { event: 'accepted', cid: p, id: '7', room: 'lobby', offset: 33 });
  t.client.leave('lobby');
  assert.deepEqual(s.ops('leave'), [{ op: 'leave', room: 'lobby' }]);
  s.serverClose(1006);
  t.clock.advance(t.clock.nextIn());
  s = connect(t);
  assert.deepEqual(s.ops('join'), [], 'not re-joined');
});

// ---- receipts, presence, typing, summary ----------------------------------------------------

test('read receipts: sent once, resent after a reconnect until echoed back, events only forward', () => {
  const t = setup();
  let s = connect(t);
  assert.equal(t.client.read('bob', '105'), true);
  assert.equal(t.client.read('bob', '99'), false, 'not backwards');
  assert.equal(t.client.read('carol', '7'), true);
  assert.deepEqual(s.ops('read'), [{ op: 'read', from: 'bob', id: '105' }, { op: 'read', from: 'carol', id: '7' }]);
  s.recv({ op: 'read', seq: 1, by: 'alice', from: 'carol', id: '7', ts: 1 }); // carol's is stored
  s.serverClose(1006);
  t.clock.advance(t.clock.nextIn());
  s = connect(t);
  assert.deepEqual(s.ops('read'), [{ op: 'read', from: 'bob', id: '105' }], 'only the unconfirmed one');
  s.recv({ op: 'read', seq: 1, by: 'bob', from: 'alice', id: '50', ts: 1 });
  s.recv({ op: 'read', seq: 2, by: 'bob', from: 'alice', id: '40', ts: 1 });
  s.recv({ op: 'read', seq: 3, by: 'bob', from: 'alice', id: '50', ts: 1 });
  s.recv({ op: 'read', seq: 4, by: 'bob', from: 'alice', id: '120', ts: 1 });
  assert.deepEqual(t.of('read').filter((r) => r.by === 'bob').map((r) => r.id), ['50', '120']);
  t.clock.advance(25);
  assert.deepEqual(s.ops('ack'), [{ op: 'ack', seq: 4 }]);
});

test('a receipt never echoed is resent at most readResends times', () => {
  const t = setup({ options: { readResends: 2 } });
  connect(t);
  t.client.read('bob', '5');
  const counts = [];
  for (let i = 0; i < 4; i++) {
    t.ws.last().serverClose(1006);
    t.clock.advance(t.clock.nextIn());
    counts.push(connect(t).ops('read').length);
  }
  assert.deepEqual(counts, [1, 1, 0, 0]);
});

test('presence and watch: answered as events; watched users are watched again after a reconnect', () => {
  const t = setup();
  let s = connect(t);
  t.client.presence(['bob']);
  t.client.watch(['bob', 'carol']);
  t.client.unwatch(['carol']);
  assert.deepEqual(s.sent.slice(-3), [
    { op: 'presence', users: ['bob'] },
    { op: 'watch', users: ['bob', 'carol'] },
    { op: 'unwatch', users: ['carol'] },
  ]);
  s.recv({ op: 'presence', online: { bob: true } });
  assert.deepEqual(t.of('presence').at(-1).online, { bob: true });
  assert.throws(() => t.client.watch(Array.from({ length: 100 }, (_, i) => `u${i}`)), RangeError);
  s.serverClose(1006);
  t.clock.advance(t.clock.nextIn());
  s = connect(t);
  assert.deepEqual(s.ops('watch'), [{ op: 'watch', users: ['bob'] }]);
});

test('typing goes out only while connected and comes in as an event', () => {
  const t = setup();
  t.client.start();
  assert.equal(t.client.typing('bob'), false);
  const s = t.ws.last();
  s.open();
  s.welcome('alice');
  assert.equal(t.client.typing('bob'), true);
  assert.deepEqual(s.ops('typing'), [{ op: 'typing', to: 'bob' }]);
  s.recv({ op: 'typing', from: 'bob' });
  assert.deepEqual(t.of('typing'), [{ event: 'typing', from: 'bob' }]);
});

test('big inbox: summary, fetch, fetched, replay, synced', () => {
  const t = setup({ options: { summary: true } });
  const s = connect(t);
  assert.equal(new URL(s.url).searchParams.get('summary'), '1');
  s.recv({ op: 'summary', total: 1500, senders: [{ from: 'bob', count: 1500 }] });
  t.client.fetch('bob', 2);
  s.recv(msg(1, 'bob', 'b1'));
  s.recv(msg(2, 'bob', 'b2'));
  s.recv({ op: 'fetched', from: 'bob', count: 2, more: true });
  t.client.replay();
  s.recv(msg(3, 'bob', 'b3'));
  s.recv({ op: 'synced', count: 1 });
  assert.deepEqual(s.sent.filter((f) => f.op === 'fetch' || f.op === 'replay'), [
    { op: 'fetch', from: 'bob', limit: 2 },
    { op: 'replay' },
  ]);
  assert.deepEqual(t.events.filter((e) => ['summary', 'message', 'fetched', 'synced'].includes(e.event)).map((e) => e.event), [
    'summary', 'message', 'message', 'fetched', 'message', 'synced',
  ]);
});

test('stop: closes, stays stopped, keeps the outbox for the next start', () => {
  const t = setup();
  const s = connect(t);
  const c = t.client.send('bob', 1);
  t.client.stop();
  assert.equal(t.client.state, 'stopped');
  assert.equal(t.of('state').at(-1).reason, 'client');
  assert.equal(s.closedByClient.code, 1000);
  t.clock.advance(1e7);
  assert.equal(t.ws.sockets.length, 1);
  t.client.start();
  const s2 = connect(t);
  assert.deepEqual(s2.ops('send').map((f) => f.cid), [c]);
});

test('compareIds orders decimal u64 strings numerically', () => {
  assert.ok(compareIds('9', '10') < 0);
  assert.ok(compareIds('18446744073709551615', '18446744073709551614') > 0);
  assert.equal(compareIds('42', '42'), 0);
});
