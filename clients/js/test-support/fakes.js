// Injected time, randomness and WebSocket for the unit tests: nothing here reads the real
// clock or sleeps; a test moves time with `clock.advance(ms)`.

export class FakeClock {
  constructor(start = 1_000_000) {
    this.t = start;
    this.timers = [];
    this.nextId = 1;
  }
  now() {
    return this.t;
  }
  setTimeout(fn, ms) {
    const id = this.nextId++;
    if (!(ms <= 2 ** 31 - 1)) throw new Error(`setTimeout(${ms}): a real timer would fire at once`);
    this.timers.push({ id, at: this.t + Math.max(0, Math.floor(ms)), fn });
    return id;
  }
  clearTimeout(id) {
    this.timers = this.timers.filter((x) => x.id !== id);
  }
  /** Run every timer due within `ms` (in time order, also ones they set), then be at +ms. */
  advance(ms) {
    const end = this.t + ms;
    for (let i = 0; i < 100_000; i++) {
      let due = null;
      for (const x of this.timers) if (x.at <= end && (!due || x.at < due.at || (x.at === due.at && x.id < due.id))) due = x;
      if (!due) break;
      this.timers = this.timers.filter((x) => x !== due);
      this.t = due.at;
      due.fn();
    }
    this.t = end;
  }
  /** Time until the next timer, or null. */
  nextIn() {
    if (!this.timers.length) return null;
    return Math.min(...this.timers.map((x) => x.at)) - this.t;
  }
}

/** A random source returning the given values in turn (then the last one forever). */
export function seqRandom(...values) {
  let i = 0;
  return () => values[Math.min(i++, values.length - 1)];
}

/** A WebSocket class whose instances the test plays the server of. */
export function fakeWebSocket() {
  const sockets = [];
  class FakeWS {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.readyState = 0;
      this.closedByClient = null;
      sockets.push(this);
    }
    send(text) {
      if (this.readyState !== 1) throw new Error('InvalidStateError: not open');
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closedByClient = { code, reason };
      this.readyState = 3;
    }
    // ---- the test's side (the server) ----
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    recv(frame) {
      this.onmessage?.({ data: typeof frame === 'string' ? frame : JSON.stringify(frame) });
    }
    welcome(user, extra = {}) {
      this.recv({ op: 'welcome', v: 1, user, conn: 'n-0-1', heartbeat_ms: 30000, max_frame: 65536, ...extra });
    }
    serverClose(code, reason = '') {
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: code !== 1006 });
    }
    ops(op) {
      return this.sent.filter((f) => f.op === op);
    }
  }
  return { WS: FakeWS, sockets, last: () => sockets[sockets.length - 1] };
}

/** Let promise callbacks run (getToken is async); no timers, no real time. */
export function settle() {
  return new Promise((resolve) => setImmediate(resolve));
}
