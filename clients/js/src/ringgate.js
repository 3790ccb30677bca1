// ringgate-client: a browser and Node client for ringgate's reliable protocol (v1).
//
// The same guarantees as the Rust client (`ringgate::client`), plus persistence across a page
// reload:
// - every `msg` (and `read`) is acked, cumulatively, after the app's handler ran, and shown at
//   most once, deduplicated by (from, cid) (bounded memory, persisted);
// - every `send` / `publish` is kept in an outbox (persisted) until its `accepted`, and resent
//   with the same cid after a reconnect, a reload, or an `unavailable` / `rate_limited` answer
//   (after `retry_ms` when the gateway gave one); a `send` written before is resent with
//   `"resend":true`;
// - a lost connection is re-established with exponential backoff and full jitter; in-band
//   refusals (close 4001 / 4003 / 4029 / 4503 after an `error` frame) are acted on;
// - rooms are re-joined with `since` = the last offset seen; a `gap` is reported and recovered;
// - `accepted` events are told in server-id order per recipient (offset order per room), also
//   when answers were lost or a refused send had been stored by another attempt (README
//   "Order of accepted").
// Plain modern JavaScript, no dependencies, no build step. Time, randomness, the WebSocket
// constructor and the storage are injectable (the unit tests drive all four).

/** Client-side errors thrown by methods (never for network failures: those are events). */
export class RinggateError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'RinggateError';
    this.code = code;
  }
}

export const DEFAULTS = Object.freeze({
  authInUrl: false,
  summary: false,
  backoffMinMs: 500,
  backoffMaxMs: 30000,
  connectTimeoutMs: 15000,
  ackDelayMs: 25,
  ackBatch: 64,
  holdMaxMs: 10000,
  maxInFlight: 64,
  maxOutbox: 1000,
  maxOutboxBytes: 1048576,
  dedupPerSender: 1000,
  dedupMax: 20000,
  maxRooms: 200,
  maxReads: 1000,
  readResends: 3,
  storagePrefix: 'ringgate:',
});

/** Close codes of in-band refusals (README of the gateway, "Refusals"). */
export const CLOSE = Object.freeze({
  UNAUTHORIZED: 4001,
  FORBIDDEN: 4003,
  RATE_LIMITED: 4029,
  UNAVAILABLE: 4503,
});

/** Exponential backoff with full jitter: uniform in [0, min(max, min * 2^attempt)). */
export function backoffDelay(attempt, minMs, maxMs, random) {
  const cap = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 40));
  return Math.floor(random() * cap);
}

/** A delay the gateway asked for (`retry_ms`), plus up to half of it again as jitter. */
export function retryDelay(retryMs, random) {
  return retryMs + Math.floor((random() * retryMs) / 2);
}

/** Server message ids are decimal strings of a u64: compare them as numbers. */
export function compareIds(a, b) {
  const x = String(a);
  const y = String(b);
  if (x.length !== y.length) return x.length - y.length;
  return x < y ? -1 : x > y ? 1 : 0;
}

/** A storage adapter in memory (the default when there is no `localStorage`). */
export function memoryStorage() {
  const map = new Map();
  return {
    getItem: (k) => (map.has(k) ? map.get(k) : null),
    setItem: (k, v) => void map.set(k, String(v)),
    removeItem: (k) => void map.delete(k),
    get size() {
      return map.size;
    },
    keys: () => [...map.keys()],
  };
}

function defaultStorage() {
  try {
    const ls = globalThis.localStorage;
    if (ls) {
      ls.setItem('ringgate:probe', '1');
      ls.removeItem('ringgate:probe');
      return ls;
    }
  } catch {
    // private mode, disabled storage: memory it is
  }
  return memoryStorage();
}

/** setTimeout fires at once for a delay past 2^31-1 ms (browsers and Node): clamp to it. */
const MAX_DELAY = 2 ** 31 - 1;
const delay = (ms) => Math.min(MAX_DELAY, Math.max(0, ms));

const realClock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (h) => clearTimeout(h),
};

/** The `sub` claim of a JWT (not verified: only to name the storage namespace). */
export function jwtSubject(token) {
  try {
    const part = String(token).split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const json = decodeURIComponent(
      Array.from(atob(b64 + '==='.slice((b64.length + 3) % 4)), (c) =>
        '%' + c.charCodeAt(0).toString(16).padStart(2, '0'),
      ).join(''),
    );
    const sub = JSON.parse(json).sub;
    return typeof sub === 'string' && sub ? sub : null;
  } catch {
    return null;
  }
}

/**
 * Display dedup memory: the last `perSender` keys of each sender, at most `max` keys in all
 * (the senders heard from least recently lose their oldest keys first).
 */
export class SeenSet {
  constructor(perSender, max) {
    this.perSender = perSender;
    this.max = max;
    this.senders = new Map(); // from -> { list: [key], set: Set<key> }, least recent first
    this.size = 0;
    /** Senders whose keys changed since the owner last took this (to write them back). */
    this.changed = new Set();
  }
  has(from, key) {
    const s = this.senders.get(from);
    return !!s && s.set.has(key);
  }
  add(from, key) {
    let s = this.senders.get(from);
    if (s) this.senders.delete(from);
    else s = { list: [], set: new Set() };
    this.senders.set(from, s);
    if (s.set.has(key)) return;
    s.list.push(key);
    s.set.add(key);
    this.changed.add(from);
    this.size++;
    if (s.list.length > this.perSender) {
      s.set.delete(s.list.shift());
      this.size--;
    }
    while (this.size > this.max) {
      const [oldFrom, old] = this.senders.entries().next().value;
      old.set.delete(old.list.shift());
      this.changed.add(oldFrom);
      this.size--;
      if (old.list.length === 0) this.senders.delete(oldFrom);
    }
  }
  toJSON() {
    return [...this.senders].map(([from, s]) => [from, s.list]);
  }
  load(json) {
    for (const [from, keys] of json) for (const k of keys) this.add(from, k);
  }
}

const KEY_SEP = '\u0000';

/** 64 random bits as base 36 (crypto when there is one; never the injected `random`). */
function randomTag() {
  const c = globalThis.crypto;
  if (c && typeof c.getRandomValues === 'function') {
    const w = c.getRandomValues(new Uint32Array(2));
    return w[0].toString(36) + w[1].toString(36);
  }
  return Math.floor(Math.random() * 2 ** 32).toString(36) + Math.floor(Math.random() * 2 ** 32).toString(36);
}

export class RinggateClient {
  /** @param {import('./ringgate').RinggateOptions} options */
  constructor(options) {
    const o = { ...DEFAULTS, ...options };
    if (!o.url) throw new TypeError('ringgate: `url` is required (ws://host:port/ws)');
    if (o.token == null && !o.getToken && !o.user) {
      throw new TypeError('ringgate: one of `token`, `getToken` or `user` (dev mode) is required');
    }
    this.opts = o;
    this._clock = o.clock || realClock;
    this._random = o.random || Math.random;
    this._storage = o.storage || defaultStorage();
    this._listeners = new Map();
    /** 'idle' | 'connecting' | 'open' | 'reconnecting' | 'stopped' */
    this.state = 'idle';
    /** The user id the gateway welcomed us as (or the dev-mode user). */
    this.user = o.user || null;
    this._token = o.token ?? null;
    this._ws = null;
    this._gen = 0; // bumped per connection attempt: events of older sockets are ignored
    this._welcomed = false;
    this._lostAt = null; // when the last welcomed connection was lost (holds count from it)
    this._maxFrame = 65536;
    this._heartbeatMs = 30000;
    this._lastRx = 0;
    this._timers = { reconnect: null, connect: null, heartbeat: null, ack: null, retry: null };
    this._retryAt = 0;
    this._attempt = 0;
    this._refusalAttempt = 0;
    this._authRetry = false;
    this._lastError = null;
    this._outbox = new Map(); // cid -> entry, in send order
    this._outboxBytes = 0;
    this._refused = new Set(); // cids waiting for the retry timer
    this._inFlight = new Set(); // cids sent on this connection, not answered yet
    this._window = o.maxInFlight; // how many may be: 1 after a refusal, doubling per accepted
    this._conn = 0; // serial of the welcomed connection (entry.sent names the one it went on)
    // Order of `accepted` (README "Order of accepted"): `_txCount` counts transmissions, what
    // "before" means between sends; per order key, the entries written (or restored) and not
    // answered yet (each with its firstTx, lastTx), and the answers held back.
    this._txCount = 0;
    this._unanswered = new Map(); // order key -> Map<cid, entry>
    this._held = new Map(); // order key -> [{ ev, lastTx, delivered: [] }]
    this._holdTimers = new Map();
    this._telling = []; // [event, data] to tell in this order (see _tell)
    this._draining = false;
    // cids are unique per sender across reloads and devices: the server drops a cid it has
    // accepted before (its dedup window), so a reused one would lose a message.
    this._cidPrefix = Date.now().toString(36) + '-' + randomTag();
    this._nextCid = 0;
    this._seen = new SeenSet(o.dedupPerSender, o.dedupMax);
    this._offsets = new Map(); // room -> last offset seen (persisted, least recent first)
    this._rooms = new Map(); // room -> { buffer: Map<offset, frame> | null } (rooms we are in)
    this._watching = new Set();
    this._reads = new Map(); // from -> { id, resends }: receipts not yet seen echoed back
    this._readsSeen = new Map(); // by \0 from -> highest id told
    this._handledSeq = 0;
    this._ackedSeq = 0;
    this._dirty = new Set();
    // Senders whose dedup keys are in storage. Each sender's keys are their own entry,
    // written at once after a display (a reload right after a message was shown must not
    // show it again), so one display costs one sender's keys (<= dedupPerSender), not the
    // whole memory (`SeenSet.changed` says which to write).
    this._seenStored = new Set();
    this._ns = null;
  }

  // ---- events ------------------------------------------------------------------------

  /** Subscribe; returns a function that unsubscribes. */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }
  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }
  _emit(event, data) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(data);
      } catch (e) {
        if (event === 'error') continue;
        this._emit('error', { code: 'handler', message: `a '${event}' handler threw: ${e}` });
      }
    }
  }
  _setState(state, extra = {}) {
    this.state = state;
    this._emit('state', { state, ...extra });
  }

  // ---- lifecycle -----------------------------------------------------------------------

  /** Connect (and keep connected until `stop()` or a permanent refusal). */
  start() {
    if (this.state !== 'idle' && this.state !== 'stopped') return;
    if (!(this.opts.WebSocket || globalThis.WebSocket)) {
      throw new TypeError(
        'ringgate: no WebSocket: pass the `WebSocket` option (Node 20: run with --experimental-websocket)',
      );
    }
    const ns = this.opts.namespace ?? (this._token != null ? jwtSubject(this._token) : null) ?? this.opts.user;
    if (ns) this._restore(ns);
    this._attempt = 0;
    this._authRetry = false;
    this._connect();
  }

  /** Close and stay closed. The outbox stays persisted (resent by the next start). */
  stop() {
    this._stopWith('client');
  }

  _stopWith(reason, error) {
    const ws = this._detach();
    for (const k of ['reconnect', 'retry']) this._clear(k);
    // answers held for order are told now (sorted): from here on order is best effort
    for (const k of [...this._held.keys()]) this._release(k, true);
    this._flush(false);
    try {
      ws?.close(1000, 'bye');
    } catch {
      // already closed
    }
    if (this.state === 'stopped') return;
    this._setState('stopped', error ? { reason, error } : { reason });
  }

  /** Simulate a network failure (tests, demos): drop the socket, then reconnect as for 1006. */
  dropConnection() {
    if (!this._ws) return;
    const ws = this._detach();
    try {
      if (typeof ws.terminate === 'function') ws.terminate();
      else ws.close(4000, 'dropped by the client');
    } catch {
      // already closed
    }
    this._lost(1006, 'dropped');
  }

  _clear(name) {
    if (this._timers[name] != null) this._clock.clearTimeout(this._timers[name]);
    this._timers[name] = null;
  }
  _timer(name, ms, fn) {
    this._clear(name);
    this._timers[name] = this._clock.setTimeout(() => {
      this._timers[name] = null;
      fn();
    }, delay(ms));
  }

  _connect() {
    this._setState('connecting', { attempt: this._attempt });
    if (!this.opts.getToken) return this._open();
    const gen = ++this._gen;
    Promise.resolve()
      .then(() => this.opts.getToken())
      .then(
        (token) => {
          if (gen !== this._gen || this.state === 'stopped') return;
          this._token = token;
          if (!this._ns) {
            const sub = jwtSubject(token);
            if (sub) this._restore(this.opts.namespace ?? sub);
          }
          this._open();
        },
        (e) => {
          if (gen !== this._gen || this.state === 'stopped') return;
          this._emit('error', { code: 'token', message: `getToken failed: ${e}` });
          this._reconnectLater(backoffDelay(this._attempt++, this.opts.backoffMinMs, this.opts.backoffMaxMs, this._random), 0, 'getToken failed');
        },
      );
  }

  _url() {
    const o = this.opts;
    const u = new URL(o.url);
    if (o.authInUrl) {
      if (this._token != null) u.searchParams.set('token', this._token);
      else u.searchParams.set('user', o.user);
    } else {
      // first-frame auth is opt-in on the gateway: no credentials in the URL, only this
      u.searchParams.set('auth', 'frame');
    }
    if (o.device) u.searchParams.set('device', o.device);
    if (o.summary) u.searchParams.set('summary', '1');
    return u.toString();
  }

  _open() {
    const gen = ++this._gen;
    const WS = this.opts.WebSocket || globalThis.WebSocket;
    this._welcomed = false;
    this._lastError = null;
    this._handledSeq = 0;
    this._ackedSeq = 0;
    let ws;
    try {
      ws = new WS(this._url());
    } catch (e) {
      this._emit('error', { code: 'connect', message: String(e) });
      return this._lost(1006, String(e));
    }
    this._ws = ws;
    ws.onopen = () => {
      if (gen !== this._gen) return;
      this._lastRx = this._clock.now();
      if (!this.opts.authInUrl) {
        const auth = this._token != null ? { op: 'auth', token: this._token } : { op: 'auth', user: this.opts.user };
        this._sendFrame(auth);
      }
    };
    ws.onmessage = (ev) => {
      if (gen !== this._gen) return;
      this._lastRx = this._clock.now();
      this._onText(typeof ev.data === 'string' ? ev.data : String(ev.data));
    };
    ws.onclose = (ev) => {
      if (gen !== this._gen) return;
      this._detach();
      this._lost(ev.code ?? 1006, ev.reason || '');
    };
    ws.onerror = () => {}; // a close event follows
    this._timer('connect', this.opts.connectTimeoutMs, () => {
      if (gen !== this._gen || this._welcomed) return;
      this._drop(4000, 'no welcome in time');
    });
  }

  /** Forget the current socket (its late events are ignored); returns it. */
  _detach() {
    const ws = this._ws;
    if (this._welcomed) this._lostAt = this._clock.now();
    this._ws = null;
    this._gen++;
    this._welcomed = false;
    for (const k of ['connect', 'heartbeat', 'ack']) this._clear(k);
    // Acks of this connection die with it: what was shown and not acked comes again and the
    // dedup memory drops it. Persist that memory now.
    this._flush(false);
    // Refused sends go out with the whole outbox after the reconnect.
    this._clear('retry');
    this._refused.clear();
    this._inFlight.clear();
    return ws;
  }

  _drop(code, reason) {
    const ws = this._detach();
    try {
      ws?.close(4000, reason);
    } catch {
      // already closed
    }
    this._lost(code, reason);
  }

  _lost(code, reason) {
    if (this.state === 'stopped') return;
    const err = this._lastError;
    this._lastError = null;
    const o = this.opts;
    const backoff = () => backoffDelay(this._attempt++, o.backoffMinMs, o.backoffMaxMs, this._random);
    switch (code) {
      case CLOSE.UNAUTHORIZED:
        // With `retry_ms` the token may pass soon as it is (the gateway is fetching the key
        // that signed it: a key rotation): come back then, with backoff, and do not stop.
        if (err && Number.isFinite(err.retry_ms)) {
          return this._reconnectLater(Math.max(retryDelay(err.retry_ms, this._random), backoff()), code, reason);
        }
        if (!o.getToken || this._authRetry) return this._stopWith('unauthorized', err);
        this._authRetry = true; // a fresh token refused at once stops
        return this._reconnectLater(0, code, reason);
      case CLOSE.FORBIDDEN:
        return this._stopWith('forbidden', err);
      case CLOSE.RATE_LIMITED:
      case CLOSE.UNAVAILABLE: {
        const told = err && Number.isFinite(err.retry_ms) ? retryDelay(err.retry_ms, this._random) : null;
        const delay = told ?? backoff();
        if (told != null) this._attempt++;
        return this._reconnectLater(delay, code, reason);
      }
      default:
        return this._reconnectLater(backoff(), code, reason);
    }
  }

  _reconnectLater(delayMs, code, reason) {
    this._setState('reconnecting', { delayMs, code, reason });
    this._timer('reconnect', delayMs, () => this._connect());
  }

  _sendFrame(frame) {
    const ws = this._ws;
    if (!ws) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false; // the close event follows; the outbox keeps what matters
    }
  }

  get _live() {
    return this._ws != null && this._welcomed;
  }

  // ---- persistence -------------------------------------------------------------------

  _key(part) {
    // Escaped: user ids may hold `:` and `/`, and one user's keys must never be another's.
    return `${this.opts.storagePrefix}${encodeURIComponent(this._ns)}:${part}`;
  }
  _load(part) {
    try {
      const text = this._storage.getItem(this._key(part));
      return text == null ? null : JSON.parse(text);
    } catch (e) {
      this._emit('error', { code: 'storage', message: `cannot read ${part}: ${e}` });
      return null;
    }
  }
  _save(part, value) {
    if (!this._ns) return;
    try {
      this._storage.setItem(this._key(part), JSON.stringify(value));
    } catch (e) {
      this._emit('error', { code: 'storage', message: `cannot write ${part}: ${e}` });
    }
  }

  _restore(user) {
    if (this._ns) return;
    this._ns = this.opts.device ? `${user}/${this.opts.device}` : user;
    const out = this._load('outbox');
    if (out && out.v === 1) {
      const mine = [...this._outbox.values()];
      this._outbox.clear();
      this._outboxBytes = 0;
      for (const [cid, op, target, body, bytes] of out.entries) {
        // Written by an earlier page, when is unknown: before anything this page writes (the
        // order rule), and resent with `resend:true`.
        const entry = { cid, op, target, body, bytes, tx: 1, firstTx: 0, lastTx: 0 };
        this._outbox.set(cid, entry);
        this._outboxBytes += bytes;
        this._unansweredOf(orderKey(entry)).set(cid, entry);
      }
      for (const e of mine) {
        this._outbox.set(e.cid, e);
        this._outboxBytes += e.bytes;
      }
    }
    const seen = this._load('seen');
    if (seen && (seen.v === 1 || seen.v === 2)) {
      const mine = this._seen.toJSON();
      this._seen = new SeenSet(this.opts.dedupPerSender, this.opts.dedupMax);
      if (seen.v === 1) this._seen.load(seen.senders);
      else {
        for (const from of seen.senders) {
          const keys = this._load(`seen/${encodeURIComponent(from)}`);
          if (Array.isArray(keys)) this._seen.load([[from, keys]]);
          this._seenStored.add(from);
        }
      }
      this._seen.load(mine);
    }
    for (const from of this._seen.senders.keys()) this._seen.changed.add(from);
    const rooms = this._load('rooms');
    if (rooms && rooms.v === 1) {
      for (const [room, offset] of rooms.offsets) if (!this._offsets.has(room)) this._offsets.set(room, offset);
    }
    const reads = this._load('reads');
    if (reads && reads.v === 1) {
      for (const [from, id] of reads.pending) if (!this._reads.has(from)) this._reads.set(from, { id, resends: 0 });
    }
    this._saveOutbox();
    for (const p of ['seen', 'rooms', 'reads']) this._dirty.add(p);
    this._flush(false);
  }

  /**
   * Persist the sends not told `accepted` yet: the outbox and the answers held for order (a
   * page that reloads during a hold resends those too, and tells their answers again).
   */
  _saveOutbox() {
    const entries = [...this._outbox.values()];
    for (const held of this._held.values()) for (const h of held) entries.push(h.entry);
    this._save('outbox', { v: 1, entries: entries.map((e) => [e.cid, e.op, e.target, e.body, e.bytes]) });
  }

  /** Persist what changed; then (when `ack`) ack what was handled. */
  _flush(ack = true) {
    this._clear('ack');
    this._persistSeen();
    if (this._dirty.has('rooms')) this._save('rooms', { v: 1, offsets: [...this._offsets] });
    if (this._dirty.has('reads')) this._save('reads', { v: 1, pending: [...this._reads].map(([f, r]) => [f, r.id]) });
    this._dirty.clear();
    if (ack && this._ws && this._handledSeq > this._ackedSeq) {
      this._ackedSeq = this._handledSeq;
      this._sendFrame({ op: 'ack', seq: this._handledSeq });
    }
  }

  /** Write the dedup keys of the senders that changed (and the list of senders). */
  _persistSeen() {
    this._dirty.delete('seen');
    const changed = this._seen.changed;
    if (!this._ns || changed.size === 0) return;
    const senders = this._seen.senders;
    for (const from of changed) {
      const s = senders.get(from);
      if (s) {
        this._save(`seen/${encodeURIComponent(from)}`, s.list);
        this._seenStored.add(from);
      }
    }
    changed.clear();
    for (const from of this._seenStored) {
      if (!senders.has(from)) {
        this._seenStored.delete(from);
        try {
          this._storage.removeItem(this._key(`seen/${encodeURIComponent(from)}`));
        } catch (_) {
          // a leftover entry is only read back for a sender still listed: harmless
        }
      }
    }
    this._save('seen', { v: 2, senders: [...senders.keys()] });
  }

  /** A `msg` / `read` frame was handled: ack it soon (cumulative), after persisting. */
  _handled(seq) {
    if (!Number.isSafeInteger(seq) || seq <= this._handledSeq) return;
    this._handledSeq = seq;
    if (this._handledSeq - this._ackedSeq >= this.opts.ackBatch) this._flush();
    else if (this._timers.ack == null) this._timer('ack', this.opts.ackDelayMs, () => this._flush());
  }

  // ---- sending -------------------------------------------------------------------------

  _newCid() {
    this._nextCid += 1;
    return `${this._cidPrefix}-${this._nextCid}`;
  }

  _enqueue(op, target, body) {
    const cid = this._newCid();
    const frame = op === 'send' ? { op, to: target, cid, body } : { op, room: target, cid, body };
    const text = JSON.stringify(frame);
    if (text === undefined) throw new RinggateError('bad_request', 'body is not JSON');
    const bytes = text.length;
    if (bytes > this._maxFrame) {
      throw new RinggateError('too_large', `frame of ${bytes} bytes over max_frame ${this._maxFrame}`);
    }
    if (this._outbox.size >= this.opts.maxOutbox || this._outboxBytes + bytes > this.opts.maxOutboxBytes) {
      throw new RinggateError(
        'outbox_full',
        `outbox full (${this._outbox.size} sends, ${this._outboxBytes} bytes not accepted yet)`,
      );
    }
    const entry = { cid, op, target, body, bytes, tx: 0, firstTx: null, lastTx: null };
    this._outbox.set(cid, entry);
    this._outboxBytes += bytes;
    this._saveOutbox(); // before it leaves: a reload from here on resends it
    this._pump();
    return cid;
  }

  /** Send `body` (any JSON) to user `to`. Returns the cid. Kept until `accepted`. */
  send(to, body) {
    if (typeof to !== 'string' || !to) throw new TypeError('ringgate: send(to, body) needs a user id');
    return this._enqueue('send', to, body);
  }

  /** Publish `body` to `room`. Returns the cid. Kept until `accepted` (with its offset). */
  publish(room, body) {
    if (typeof room !== 'string' || !room) throw new TypeError('ringgate: publish(room, body) needs a room');
    return this._enqueue('publish', room, body);
  }

  /**
   * Send what may go: in send order, what has not gone out on this connection, while fewer
   * than the window are unanswered, and nothing while a refusal's retry time runs (sends made
   * meanwhile wait behind the refused ones). The window keeps a reconnect with a full outbox
   * within the gateway's burst, and after a refusal probes with one send, then 2, 4...
   */
  _pump() {
    if (!this._live || this._timers.retry != null) return;
    for (const e of this._outbox.values()) {
      if (this._inFlight.size >= this._window) return;
      if (e.sent !== this._conn) this._transmit(e);
    }
  }

  _transmit(entry) {
    if (!this._live) return;
    entry.sent = this._conn;
    this._inFlight.add(entry.cid);
    const frame =
      entry.op === 'send'
        ? { op: 'send', to: entry.target, cid: entry.cid, body: entry.body }
        : { op: 'publish', room: entry.target, cid: entry.cid, body: entry.body };
    // Written before (another connection, a refused attempt, an earlier page): another
    // attempt of it may be stored already, so the gateway never shows it live past the store
    // (docs/protocol.md). Publishes always go through the room's history: no flag.
    if (entry.op === 'send' && entry.tx > 0) frame.resend = true;
    if (!this._sendFrame(frame)) return;
    entry.tx++;
    const tx = ++this._txCount;
    if (entry.firstTx == null) entry.firstTx = tx;
    entry.lastTx = tx;
    entry.lastAt = this._clock.now();
    this._unansweredOf(orderKey(entry)).set(entry.cid, entry);
  }

  _unansweredOf(k) {
    let m = this._unanswered.get(k);
    if (!m) this._unanswered.set(k, (m = new Map()));
    return m;
  }

  /** `cid` of order key `k` has its last answer (accepted, or refused for good). */
  _answered(k, cid) {
    const m = this._unanswered.get(k);
    if (!m) return;
    m.delete(cid);
    if (m.size === 0) this._unanswered.delete(k);
  }

  /** Sends not accepted yet, in send order. */
  pending() {
    return [...this._outbox.values()].map((e) =>
      e.op === 'send' ? { cid: e.cid, to: e.target, body: e.body } : { cid: e.cid, room: e.target, body: e.body },
    );
  }

  _refuse(cid, retryMs) {
    this._refused.add(cid);
    this._inFlight.delete(cid);
    this._window = 1;
    const o = this.opts;
    const delay = Number.isFinite(retryMs)
      ? retryDelay(retryMs, this._random)
      : backoffDelay(this._refusalAttempt++, o.backoffMinMs, o.backoffMaxMs, this._random);
    const at = this._clock.now() + delay;
    if (this._timers.retry != null && at <= this._retryAt) return;
    this._retryAt = at;
    this._timer('retry', delay, () => {
      for (const cid of this._refused) {
        const e = this._outbox.get(cid);
        if (e) e.sent = -1; // to go again
      }
      this._refused = new Set();
      this._pump();
    });
  }

  // ---- other ops -----------------------------------------------------------------------

  /** Join `room`; recovers from the last offset seen (or `since`). Re-joined after reconnects. */
  join(room, { since } = {}) {
    if (typeof room !== 'string' || !room) throw new TypeError('ringgate: join(room) needs a room');
    if (Number.isSafeInteger(since)) this._setOffset(room, since);
    this._rooms.set(room, { buffer: null });
    if (this._live) this._sendJoin(room);
  }

  leave(room) {
    this._rooms.delete(room);
    this._offsets.delete(room);
    this._dirty.add('rooms');
    this._flush(false);
    if (this._live) this._sendFrame({ op: 'leave', room });
  }

  _sendJoin(room) {
    const r = this._rooms.get(room);
    r.buffer = new Map(); // room frames wait for `joined` (replay and live, sorted by offset)
    const since = this._offsets.get(room);
    this._sendFrame(since != null ? { op: 'join', room, since } : { op: 'join', room });
  }

  _setOffset(room, offset) {
    this._offsets.delete(room);
    this._offsets.set(room, offset);
    while (this._offsets.size > this.opts.maxRooms) this._offsets.delete(this._offsets.keys().next().value);
    this._dirty.add('rooms');
  }

  /** Which of `users` (at most 100) are online: answered with a `presence` event. */
  presence(users) {
    if (users.length > 100) throw new RangeError('ringgate: presence asks about at most 100 users');
    return this._live && this._sendFrame({ op: 'presence', users });
  }

  /** Be told (`presence` events) when any of `users` comes online or goes offline. */
  watch(users) {
    const all = new Set([...this._watching, ...users]);
    if (all.size > 100) throw new RangeError('ringgate: at most 100 users watched per connection');
    this._watching = all;
    return this._live && this._sendFrame({ op: 'watch', users });
  }

  unwatch(users) {
    for (const u of users) this._watching.delete(u);
    return this._live && this._sendFrame({ op: 'unwatch', users });
  }

  /** I have read every message of `from` up to `id`. Resent after reconnects until echoed. */
  read(from, id) {
    id = String(id);
    const cur = this._reads.get(from);
    if (cur && compareIds(id, cur.id) <= 0) return false;
    this._reads.delete(from);
    this._reads.set(from, { id, resends: 0 });
    while (this._reads.size > this.opts.maxReads) this._reads.delete(this._reads.keys().next().value);
    this._dirty.add('reads');
    this._flush(false);
    return this._live && this._sendFrame({ op: 'read', from, id });
  }

  /** Tell `to` this user is typing (ephemeral: dropped when not connected). */
  typing(to) {
    return this._live && this._sendFrame({ op: 'typing', to });
  }

  /** After a `summary`: the next `limit` (1..1000) waiting messages of `from`. */
  fetch(from, limit = 50) {
    return this._live && this._sendFrame({ op: 'fetch', from, limit });
  }

  /** After a `summary`: replay the whole inbox (then `synced`). */
  replay() {
    return this._live && this._sendFrame({ op: 'replay' });
  }

  // ---- receiving -------------------------------------------------------------------------

  _onText(text) {
    let f;
    try {
      f = JSON.parse(text);
    } catch (e) {
      const m = /^\{"op":"(?:msg|read)","seq":(\d+)/.exec(text);
      if (m) this._handled(Number(m[1]));
      this._emit('error', { code: 'unreadable', message: `${e}`, start: text.slice(0, 200) });
      return;
    }
    if (!f || typeof f !== 'object') return;
    this._emit('frame', f);
    switch (f.op) {
      case 'welcome':
        return this._onWelcome(f);
      case 'msg':
        return this._onMsg(f);
      case 'accepted':
        return this._onAccepted(f);
      case 'delivered':
        return this._onDelivered(f);
      case 'read':
        return this._onRead(f);
      case 'room':
        return this._onRoom(f);
      case 'joined':
        return this._onJoined(f);
      case 'left':
        return this._emit('left', { room: f.room });
      case 'gap':
        return this._onGap(f);
      case 'error':
        return this._onError(f);
      case 'typing':
        return this._emit('typing', { from: f.from });
      case 'presence':
        return this._emit('presence', { online: f.online || {} });
      case 'synced':
        return this._emit('synced', { count: f.count });
      case 'summary':
        return this._emit('summary', { total: f.total, senders: f.senders });
      case 'fetched':
        return this._emit('fetched', { from: f.from, count: f.count, more: f.more });
      default:
        return; // pong, and ops a newer gateway may add
    }
  }

  _onWelcome(f) {
    this._clear('connect');
    this.user = f.user;
    this._restore(this.opts.namespace ?? f.user);
    this._welcomed = true;
    this._attempt = 0;
    this._authRetry = false;
    if (Number.isSafeInteger(f.max_frame)) this._maxFrame = f.max_frame;
    if (Number.isSafeInteger(f.heartbeat_ms) && f.heartbeat_ms > 0) this._heartbeatMs = f.heartbeat_ms;
    this._heartbeat();
    // Resend the outbox in send order (its answers may come out of store order: _onAccepted).
    const resent = this._outbox.size;
    this._conn++;
    this._inFlight.clear();
    this._window = this.opts.maxInFlight;
    this._pump();
    for (const [from, r] of [...this._reads]) {
      if (r.resends >= this.opts.readResends) {
        this._reads.delete(from);
        this._dirty.add('reads');
        continue;
      }
      r.resends++;
      this._sendFrame({ op: 'read', from, id: r.id });
    }
    const watched = [...this._watching];
    for (let i = 0; i < watched.length; i += 100) this._sendFrame({ op: 'watch', users: watched.slice(i, i + 100) });
    for (const room of this._rooms.keys()) this._sendJoin(room);
    this._emit('welcome', { user: f.user, conn: f.conn, v: f.v });
    this._setState('open', { resent });
  }

  _heartbeat() {
    const hb = this._heartbeatMs;
    this._timer('heartbeat', Math.max(1, Math.floor(hb / 2)), () => {
      const silent = this._clock.now() - this._lastRx;
      if (silent >= 2 * hb) return this._drop(4000, 'no frame from the gateway');
      if (silent >= hb) this._sendFrame({ op: 'ping' });
      this._heartbeat();
    });
  }

  _onMsg(f) {
    const key = JSON.stringify(f.cid);
    if (!this._seen.has(f.from, key)) {
      this._seen.add(f.from, key);
      const ev = { from: f.from, cid: f.cid, id: f.id, ts: f.ts, body: f.body };
      if (f.type != null) ev.type = f.type;
      this._emit('message', ev);
      // Before anything else can run (a reload is a later task): shown means remembered.
      this._persistSeen();
    }
    this._handled(f.seq);
  }

  _onRead(f) {
    if (f.by === this.user) {
      const mine = this._reads.get(f.from);
      if (mine && compareIds(f.id, mine.id) >= 0) {
        this._reads.delete(f.from);
        this._dirty.add('reads');
      }
    }
    const k = f.by + KEY_SEP + f.from;
    const told = this._readsSeen.get(k);
    if (told == null || compareIds(f.id, told) > 0) {
      if (this._readsSeen.size >= 10000) this._readsSeen.clear();
      this._readsSeen.set(k, f.id);
      this._emit('read', { by: f.by, from: f.from, id: f.id, ts: f.ts });
    }
    this._handled(f.seq);
  }

  _onAccepted(f) {
    const e = this._outbox.get(f.cid);
    if (!e) return; // told already (a second answer to a resend)
    this._outbox.delete(f.cid);
    this._outboxBytes -= e.bytes;
    this._refused.delete(f.cid);
    this._inFlight.delete(f.cid);
    this._window = Math.min(this.opts.maxInFlight, this._window * 2);
    this._refusalAttempt = 0;
    const ev = { cid: f.cid, id: f.id };
    if (e.op === 'send') ev.to = e.target;
    else ev.room = e.target;
    if (f.offset != null) ev.offset = f.offset;
    const k = orderKey(e);
    this._answered(k, f.cid);
    if (!this._held.has(k)) this._held.set(k, []);
    const item = { ev, lastTx: e.lastTx ?? 0, delivered: [], entry: e };
    this._held.get(k).push(item);
    // Told at once: _release saved the outbox without it. Held: saved with the holds.
    if (!this._release(k, false).includes(item)) this._saveOutbox();
    if (this._held.has(k) && !this._holdTimers.has(k)) this._armHold(k);
    this._pump();
  }

  /**
   * The hold on `k` lasts while the client is connected (the gateway owes every send written
   * to it an answer, and a refused one is resent, so a long outage keeps the order). Without
   * a connection it ends holdMaxMs after the connection was lost or the earliest send of `k`
   * still without `accepted` (the one that holds the others back) was last written, whichever
   * came later: what is held is then told, sorted all the same.
   */
  _armHold(k) {
    let earliest = null;
    for (const e of this._unanswered.get(k)?.values() ?? []) {
      if (earliest == null || e.firstTx < earliest.firstTx) earliest = e;
    }
    const now = this._clock.now();
    const lastAt = this._live ? now : Math.max(earliest?.lastAt ?? now, this._lostAt ?? -Infinity);
    const due = lastAt + this.opts.holdMaxMs - now;
    if (due <= 0) return this._release(k, true);
    const h = this._clock.setTimeout(() => {
      this._holdTimers.delete(k);
      if (this._held.has(k)) this._armHold(k);
    }, delay(due));
    this._holdTimers.set(k, h);
  }

  /**
   * Tell the held answers of `k` sorted by id (by offset for a room): all of them when `all`
   * (the hold ran out, or stop), else as far as no unanswered send may have been stored
   * before the next one, i.e. while its last transmission came before the first
   * transmission of every send of `k` still without `accepted` (in flight, or refused and
   * waiting: a refusal says this attempt was not taken, not that no other attempt was).
   * Returns the held answers it told.
   */
  _release(k, all) {
    const held = this._held.get(k);
    if (!held) return [];
    held.sort((a, b) =>
      a.ev.offset != null && b.ev.offset != null ? a.ev.offset - b.ev.offset : compareIds(a.ev.id, b.ev.id),
    );
    let free = held.length;
    if (!all) {
      let earliest = Infinity;
      for (const e of this._unanswered.get(k)?.values() ?? []) earliest = Math.min(earliest, e.firstTx);
      free = 0;
      while (free < held.length && held[free].lastTx < earliest) free++;
    }
    const told = held.splice(0, free);
    if (held.length === 0) {
      if (this._holdTimers.has(k)) this._clock.clearTimeout(this._holdTimers.get(k));
      this._holdTimers.delete(k);
      this._held.delete(k);
    }
    if (told.length) this._saveOutbox();
    const events = [];
    for (const { ev, delivered } of told) {
      events.push(['accepted', ev]);
      for (const d of delivered) events.push(['delivered', d]);
    }
    this._tell(events);
    return told;
  }

  /**
   * Emit `accepted` / `delivered` events in this order, also when a handler causes more
   * (a `stop()` in a handler releases what is held: after the rest of this list).
   */
  _tell(events) {
    this._telling.push(...events);
    if (this._draining) return;
    this._draining = true;
    try {
      while (this._telling.length) {
        const [name, data] = this._telling.shift();
        this._emit(name, data);
      }
    } finally {
      this._draining = false;
    }
  }

  _onDelivered(f) {
    const d = { cid: f.cid, id: f.id, to: f.to };
    for (const held of this._held.values()) {
      const h = held.find((x) => x.ev.cid === f.cid);
      if (h) return void h.delivered.push(d);
    }
    this._tell([['delivered', d]]);
  }

  _onError(f) {
    this._lastError = f;
    const e = f.cid != null ? this._outbox.get(f.cid) : undefined;
    const ev = { code: f.code, message: f.message };
    if (f.cid != null) ev.cid = f.cid;
    if (f.retry_ms != null) ev.retryMs = f.retry_ms;
    if (e) {
      if (f.code === 'unavailable' || f.code === 'rate_limited') {
        this._refuse(f.cid, f.retry_ms);
        ev.willRetry = true;
      } else {
        // bad_request, too_large, forbidden...: resending cannot help
        this._outbox.delete(f.cid);
        this._outboxBytes -= e.bytes;
        this._inFlight.delete(f.cid);
        this._saveOutbox();
        ev.dropped = true;
        // Never told: it holds no answer any more. (A refusal for now keeps holding.)
        const k = orderKey(e);
        this._answered(k, f.cid);
        this._release(k, false);
      }
    }
    this._emit('error', ev);
    if (e) this._pump();
  }

  _onRoom(f) {
    const r = this._rooms.get(f.room);
    if (!r) return; // left meanwhile
    if (r.buffer) return void r.buffer.set(f.offset, f);
    this._deliverRoom(f);
  }

  _deliverRoom(f) {
    const last = this._offsets.get(f.room);
    if (last != null && f.offset <= last) return;
    this._setOffset(f.room, f.offset);
    const sender = f.from + KEY_SEP + '#' + f.room;
    const key = JSON.stringify(f.cid);
    if (this._seen.has(sender, key)) return;
    this._seen.add(sender, key);
    this._emit('room', { room: f.room, offset: f.offset, id: f.id, from: f.from, cid: f.cid, ts: f.ts, body: f.body });
    // As for `msg`: shown means remembered, and the offset to re-join from moves with it.
    this._persistSeen();
    if (this._dirty.delete('rooms')) this._save('rooms', { v: 1, offsets: [...this._offsets] });
    if (this._timers.ack == null) this._timer('ack', this.opts.ackDelayMs, () => this._flush());
  }

  _onJoined(f) {
    const r = this._rooms.get(f.room);
    if (r && r.buffer) {
      const frames = [...r.buffer.values()].sort((a, b) => a.offset - b.offset);
      r.buffer = null;
      for (const x of frames) this._deliverRoom(x);
    }
    if (r) {
      const last = this._offsets.get(f.room);
      if (last == null || f.offset > last) this._setOffset(f.room, f.offset);
      this._flush(false);
    }
    this._emit('joined', { room: f.room, offset: f.offset, recovered: f.recovered });
  }

  _onGap(f) {
    this._emit('gap', { room: f.room, from: f.from });
    const r = this._rooms.get(f.room);
    if (!r || r.buffer || !this._live) return; // a join is on its way already
    // Recover what was skipped: join again from the last offset shown.
    this._sendJoin(f.room);
  }
}

function orderKey(e) {
  return (e.op === 'send' ? 'u:' : 'r:') + e.target;
}

/** `new RinggateClient(options)`. */
export function createClient(options) {
  return new RinggateClient(options);
}
