// The library against a REAL gateway (target/release/ringgate or target/debug/ringgate, dev
// mode, free loopback ports): alice and bob chat both ways; alice's connection is cut
// abruptly (TCP destroyed, no close frame) with sends in flight, and later her page is
// "reloaded" (the client stopped mid-flight and a new one started on the same storage).
// Afterwards every accepted message was displayed exactly once, in the order its sender
// was told `accepted`, with the id the sender was told.
//
// Time is real here, but it only bounds the test: every wait is for an event, with a
// deadline whose expiry is a failure.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import crypto from 'node:crypto';
import { RinggateClient, memoryStorage } from '../src/ringgate.js';
import { NetWebSocket } from '../test-support/netws.js';
import { gatewayBinary, startGateway } from '../test-support/gateway.js';

/** Does this gateway upgrade /ws?auth=frame without a token (first-frame auth)? Asked with a raw request. */
function acceptsFirstFrameAuth(wsUrl) {
  const u = new URL(wsUrl);
  return new Promise((resolve, reject) => {
    const s = net.connect(Number(u.port), u.hostname, () =>
      s.write(`GET /ws?auth=frame HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n`),
    );
    let head = '';
    s.on('data', (d) => {
      head += d.toString('latin1');
      if (head.includes('\r\n')) {
        s.destroy();
        resolve(/^HTTP\/1\.1 101 /.test(head));
      }
    });
    s.on('error', reject);
    setTimeout(() => {
      s.destroy();
      reject(new Error('no answer to the probe'));
    }, 5000).unref();
  });
}

/** Resolve when `check()` holds; checked after every client event and every 20 ms. */
function until(what, check, ms, clients) {
  return new Promise((resolve, reject) => {
    const offs = [];
    const done = (err) => {
      clearInterval(iv);
      clearTimeout(deadline);
      for (const off of offs) off();
      err ? reject(err) : resolve();
    };
    const test = () => {
      if (check()) done();
    };
    for (const c of clients().filter(Boolean)) for (const ev of ['message', 'accepted', 'state']) offs.push(c.on(ev, test));
    const iv = setInterval(test, 20);
    const deadline = setTimeout(() => done(new Error(`timed out after ${ms} ms waiting for: ${what}`)), ms);
    test();
  });
}

/** One user as an app would hold it: a client (replaced on reload) and what it showed. */
function user(name, gw, { authInUrl, WebSocketImpl, storage }) {
  const u = { name, accepted: [], shown: [], errors: [], client: null, instances: 0, resent: 0, msgFrames: 0 };
  u.open = () => {
    const c = new RinggateClient({
      url: gw.ws,
      user: name,
      authInUrl,
      WebSocket: WebSocketImpl,
      storage,
      backoffMinMs: 20,
      backoffMaxMs: 300,
    });
    c.on('accepted', (e) => u.accepted.push(e));
    c.on('message', (m) => u.shown.push(m));
    c.on('error', (e) => u.errors.push(e));
    c.on('state', (s) => s.state === 'open' && (u.resent += s.resent));
    c.on('frame', (f) => f.op === 'msg' && u.msgFrames++);
    u.client = c;
    u.instances++;
    c.start();
    return c;
  };
  return u;
}

async function conversation(t, authInUrl) {
  const gw = await startGateway();
  t.after(() => gw.child.kill('SIGKILL'));
  if (!authInUrl) {
    // A gateway without it is too old for this client: a failure, never a skip.
    assert.ok(await acceptsFirstFrameAuth(gw.ws), `${gatewayBinary()} does not take the token in the first frame: rebuild it`);
  }
  const BrowserWS = globalThis.WebSocket || NetWebSocket; // Node 20 --experimental-websocket: undici's
  const alice = user('alice', gw, { authInUrl, WebSocketImpl: NetWebSocket, storage: memoryStorage() });
  const bob = user('bob', gw, { authInUrl, WebSocketImpl: BrowserWS, storage: memoryStorage() });
  const clients = () => [alice.client, bob.client];
  t.after(() => {
    alice.client?.stop();
    bob.client?.stop();
  });
  alice.open();
  bob.open();
  await until('both open', () => alice.client.state === 'open' && bob.client.state === 'open', 10000, clients);

  const ROUNDS = 30;
  let cut = 0;
  for (let r = 0; r < ROUNDS; r++) {
    alice.client.send('bob', { text: `a${r}` });
    bob.client.send('alice', { text: `b${r}` });
    if (r === 10 || r === 16) {
      // sends in flight, then the network goes: no close frame, answers lost
      for (let k = 0; k < 3; k++) alice.client.send('bob', { text: `a${r}.${k}` });
      alice.client.dropConnection();
      cut++;
    }
    if (r === 22) {
      // a page reload: the old page dies mid-flight, a new one starts on the same storage
      for (let k = 0; k < 3; k++) alice.client.send('bob', { text: `a${r}.${k}` });
      alice.client.stop();
      alice.open();
    }
    // a conversation: alice reads bob's line before the next round (she may be reconnecting)
    await until(`alice shows b${r}`, () => alice.shown.some((m) => m.body.text === `b${r}`), 10000, clients);
  }
  const sentByAlice = ROUNDS + 3 * 3;
  await until(
    'every send accepted and shown',
    () =>
      alice.client.pending().length === 0 &&
      bob.client.pending().length === 0 &&
      new Set(bob.shown.map((m) => m.cid)).size >= sentByAlice &&
      new Set(alice.shown.map((m) => m.cid)).size >= ROUNDS,
    20000,
    clients,
  );

  for (const [sender, recipient, count] of [[alice, bob, sentByAlice], [bob, alice, ROUNDS]]) {
    const told = [];
    const seen = new Set();
    for (const a of sender.accepted) if (!seen.has(a.cid)) seen.add(a.cid) && told.push(a);
    assert.equal(told.length, count, `${sender.name}: every send accepted once`);
    const shown = recipient.shown.filter((m) => m.from === sender.name);
    assert.equal(shown.length, count, `${recipient.name} showed each of ${sender.name}'s messages exactly once`);
    assert.deepEqual(
      shown.map((m) => `${m.cid}#${m.id}`),
      told.map((a) => `${a.cid}#${a.id}`),
      `${recipient.name} showed ${sender.name}'s messages in the order ${sender.name} was told accepted, with those ids`,
    );
  }
  assert.equal(alice.instances, 2, 'alice was reloaded once');
  assert.equal(cut, 2);
  assert.ok(alice.resent >= 12, `alice resent what was in flight at each cut and at the reload (${alice.resent})`);
  const unexpected = [...alice.errors, ...bob.errors].filter((e) => e.code !== 'rate_limited' && e.code !== 'unavailable');
  assert.deepEqual(unexpected, [], 'no error other than a refusal for now');
  alice.client.stop();
  bob.client.stop();
  t.diagnostic(
    `alice sent ${sentByAlice}, bob ${ROUNDS}; all accepted and shown once in acceptance order; 2 cuts, 1 reload ` +
      `(auth ${authInUrl ? 'in the URL' : 'in the first frame'}); alice resent ${alice.resent} sends; ` +
      `msg frames received / shown: alice ${alice.msgFrames} / ${alice.shown.length}, bob ${bob.msgFrames} / ${bob.shown.length}; ` +
      `bob's WebSocket: ${globalThis.WebSocket ? 'Node (undici)' : 'node:net'}`,
  );
}

test('integration: two clients chat both ways through a real gateway, one cut and reloaded mid-conversation (auth in the URL)', (t) =>
  conversation(t, true));

test('integration: the same with the token in the first frame', (t) => conversation(t, false));

/** An HS256 JWT as the gateway checks it (`sub`, `exp`). */
function jwt(secret, sub, expSeconds) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + expSeconds })}`;
  return `${head}.${crypto.createHmac('sha256', secret).update(head).digest('base64url')}`;
}

test('integration: in-band refusals from a real gateway: 4001 refreshes the token then stops, 4003 stops', async (t) => {
  const SECRET = 'integration-test-secret-0123';
  const gw = await startGateway(['--jwt-secret', SECRET, '--allowed-origins', 'https://app.example']);
  t.after(() => gw.child.kill('SIGKILL'));
  // With allowed_origins set the probe (no Origin) is refused in-band too: upgraded all the same.
  assert.ok(
    await acceptsFirstFrameAuth(gw.ws).catch(() => false),
    `${gatewayBinary()} does not upgrade /ws?auth=frame: rebuild it`,
  );
  const sockets = [];
  const from = (origin) =>
    class extends NetWebSocket {
      constructor(url) {
        super(url, { Origin: origin });
        sockets.push(this);
      }
    };
  const run = (origin, tokens) => {
    let calls = 0;
    const c = new RinggateClient({
      url: gw.ws,
      getToken: async () => tokens[Math.min(calls++, tokens.length - 1)],
      WebSocket: from(origin),
      storage: memoryStorage(),
      backoffMinMs: 20,
      backoffMaxMs: 200,
    });
    const states = [];
    const errors = [];
    c.on('state', (s) => states.push(s));
    c.on('error', (e) => errors.push(e));
    c.start();
    return { c, states, errors, calls: () => calls };
  };
  const settled = (r) =>
    until('open or stopped', () => r.c.state === 'open' || r.c.state === 'stopped', 10000, () => [r.c]);

  // An expired token, then a good one: refreshed once, then welcomed.
  const ok = run('https://app.example', [jwt(SECRET, 'alice', -3600), jwt(SECRET, 'alice', 3600)]);
  await settled(ok);
  assert.equal(ok.c.state, 'open');
  assert.equal(ok.c.user, 'alice');
  assert.equal(ok.calls(), 2, 'getToken asked again after the 4001');
  assert.ok(ok.states.some((s) => s.state === 'reconnecting' && s.code === 4001), 'closed 4001 first');
  assert.deepEqual(ok.errors.map((e) => e.code), ['unauthorized']);
  ok.c.stop();

  // Tokens that stay bad: a fresh one refused at once stops the client.
  const n = sockets.length;
  const bad = run('https://app.example', [jwt('another-secret-of-enough-length', 'alice', 3600)]);
  await settled(bad);
  assert.equal(bad.c.state, 'stopped');
  assert.equal(bad.states.at(-1).reason, 'unauthorized');
  assert.equal(bad.states.at(-1).error.code, 'unauthorized');
  assert.equal(bad.calls(), 2);
  assert.equal(sockets.length - n, 2, 'two attempts, no more');

  // An origin not allowed: permanent.
  const m = sockets.length;
  const evil = run('https://evil.example', [jwt(SECRET, 'alice', 3600)]);
  await settled(evil);
  assert.equal(evil.c.state, 'stopped');
  assert.equal(evil.states.at(-1).reason, 'forbidden');
  assert.equal(sockets.length - m, 1, 'one attempt only');
  t.diagnostic('4001 -> getToken -> welcome; 4001 twice -> stopped unauthorized; 4003 -> stopped forbidden');
});

test('integration: a burst over the send limit is refused with retry_ms and resent until all is accepted, in order, without a 1008', async (t) => {
  const gw = await startGateway(['--user-send-rate', '20', '--user-send-burst', '5']);
  t.after(() => gw.child.kill('SIGKILL'));
  const alice = user('alice', gw, { authInUrl: true, WebSocketImpl: NetWebSocket, storage: memoryStorage() });
  const bob = user('bob', gw, { authInUrl: true, WebSocketImpl: NetWebSocket, storage: memoryStorage() });
  const clients = () => [alice.client, bob.client];
  t.after(() => {
    alice.client?.stop();
    bob.client?.stop();
  });
  alice.open();
  bob.open();
  await until('both open', () => alice.client.state === 'open' && bob.client.state === 'open', 10000, clients);
  const states = [];
  alice.client.on('state', (s) => states.push(s));
  const N = 60; // 5 at once, then 20 a second: about 3 s
  for (let i = 0; i < N; i++) alice.client.send('bob', { text: `burst ${i}` });
  await until('every send accepted and shown', () => alice.client.pending().length === 0 && bob.shown.length >= N, 20000, clients);
  const limited = alice.errors.filter((e) => e.code === 'rate_limited');
  assert.ok(limited.length > 0, 'the limit was met');
  assert.ok(limited.every((e) => e.willRetry && e.retryMs > 0), 'each refusal carried retry_ms and is retried');
  assert.deepEqual(states, [], 'never closed (no 1008 for pushing past the limit)');
  // after a refusal the client probes with one send, then 2, 4...: it does not hammer (resending
  // every refused send at each retry_ms made ~750 refusals here)
  assert.ok(limited.length <= 5 * N, `${limited.length} refusals for ${N} sends`);
  assert.deepEqual(bob.shown.map((m) => `${m.cid}#${m.id}`), alice.accepted.map((a) => `${a.cid}#${a.id}`), 'shown once each, in acceptance order');
  t.diagnostic(`${N} sends, ${limited.length} refusals with retry_ms, all accepted and shown once in order`);
});

test('integration: rooms recover with since across a cut; receipts, typing and presence watch through a real gateway', async (t) => {
  const gw = await startGateway();
  t.after(() => gw.child.kill('SIGKILL'));
  const aliceStore = memoryStorage();
  const alice = user('alice', gw, { authInUrl: true, WebSocketImpl: NetWebSocket, storage: aliceStore });
  const bob = user('bob', gw, { authInUrl: true, WebSocketImpl: NetWebSocket, storage: memoryStorage() });
  const clients = () => [alice.client, bob.client];
  t.after(() => {
    alice.client?.stop();
    bob.client?.stop();
  });
  const seen = { room: [], joined: [], read: [], typing: [], presence: [] };
  alice.open();
  for (const ev of Object.keys(seen)) alice.client.on(ev, (e) => seen[ev].push(e));
  await until('alice open', () => alice.client.state === 'open', 10000, clients);
  alice.client.watch(['bob']);
  alice.client.join('lobby');
  await until('alice joined and told bob is offline', () => seen.joined.length === 1 && seen.presence.length === 1, 10000, clients);
  assert.deepEqual(seen.presence[0].online, { bob: false });
  bob.open();
  await until('bob online, told to alice', () => seen.presence.some((p) => p.online.bob === true), 10000, clients);

  // room: 3 publishes, alice cut, 3 more while she is away, she comes back with since
  for (let i = 0; i < 3; i++) bob.client.publish('lobby', { n: i });
  await until('alice has 3 room messages', () => seen.room.length === 3, 10000, clients);
  alice.client.dropConnection();
  for (let i = 3; i < 6; i++) bob.client.publish('lobby', { n: i });
  await until('bob\'s publishes accepted', () => bob.client.pending().length === 0, 10000, clients);
  await until('alice recovered the room', () => seen.joined.length === 2 && seen.room.length >= 6, 10000, clients);
  assert.deepEqual(seen.room.map((r) => r.body.n), [0, 1, 2, 3, 4, 5], 'each once, in order');
  const offsets = seen.room.map((r) => r.offset);
  assert.deepEqual(offsets, [...offsets].sort((a, b) => a - b));
  assert.equal(seen.joined[1].recovered, true, 'the re-join with since recovered everything');
  assert.equal(JSON.parse(aliceStore.getItem('ringgate:alice:rooms')).offsets[0][1], offsets[5], 'last offset persisted');

  // receipts and typing
  bob.client.typing('alice');
  await until('alice told bob types', () => seen.typing.length === 1, 10000, clients);
  const cid = bob.client.send('alice', { text: 'read me' });
  await until('alice shows it', () => alice.shown.some((m) => m.cid === cid), 10000, clients);
  const m = alice.shown.find((x) => x.cid === cid);
  const bobReads = [];
  bob.client.on('read', (r) => bobReads.push(r));
  alice.client.read('bob', m.id);
  await until('bob told alice read it, alice\'s receipt echoed', () => bobReads.length === 1 && seen.read.length === 1, 10000, clients);
  assert.deepEqual([bobReads[0].by, bobReads[0].from, bobReads[0].id], ['alice', 'bob', m.id]);
  // confirmed by the echo, so not resent after a reconnect (persisted with the echo's ack)
  await until('alice\'s receipt confirmed', () => JSON.parse(aliceStore.getItem('ringgate:alice:reads')).pending.length === 0, 10000, clients);
  t.diagnostic('room: 6 publishes across a cut recovered once in order; typing, read receipt and its echo, presence watch online');
});
