// A small RFC 6455 client over node:net with the browser WebSocket's surface (onopen,
// onmessage, onclose, send, close, readyState) and one thing a browser cannot do:
// `terminate()`, which destroys the TCP socket without a close frame (a network cut).
// The integration test uses it to drop a client abruptly with sends in flight. ws:// only.
import net from 'node:net';
import crypto from 'node:crypto';

export class NetWebSocket {
  /** `headers`: extra request headers, e.g. `{ Origin: 'https://app.example' }`. */
  constructor(url, headers = {}) {
    const u = new URL(url);
    this.url = url;
    this.readyState = 0;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    this._buf = Buffer.alloc(0);
    this._upgraded = false;
    this._frags = [];
    this._close = null;
    const key = crypto.randomBytes(16).toString('base64');
    this._sock = net.connect(Number(u.port || 80), u.hostname);
    this._sock.setNoDelay(true);
    this._sock.on('connect', () => {
      this._sock.write(
        `GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\n` +
          `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n` +
          Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join('') +
          '\r\n',
      );
    });
    this._sock.on('data', (d) => this._data(d));
    this._sock.on('error', () => {});
    this._sock.on('close', () => this._closed());
  }

  _data(d) {
    this._buf = Buffer.concat([this._buf, d]);
    if (!this._upgraded) {
      const end = this._buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      const head = this._buf.subarray(0, end).toString('latin1');
      this._buf = this._buf.subarray(end + 4);
      if (!/^HTTP\/1\.1 101 /.test(head)) {
        this.httpStatus = Number(head.split(' ')[1]);
        this._sock.destroy(); // as a browser: a refused upgrade is a 1006
        return;
      }
      this._upgraded = true;
      this.readyState = 1;
      this.onopen?.({});
    }
    for (;;) {
      const b = this._buf;
      if (b.length < 2) return;
      const fin = (b[0] & 0x80) !== 0;
      const op = b[0] & 0x0f;
      let len = b[1] & 0x7f;
      let off = 2;
      if (len === 126) {
        if (b.length < 4) return;
        len = b.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        if (b.length < 10) return;
        len = Number(b.readBigUInt64BE(2));
        off = 10;
      }
      if (b[1] & 0x80) off += 4; // a server never masks; tolerate it
      if (b.length < off + len) return;
      const payload = b.subarray(off, off + len);
      this._buf = b.subarray(off + len);
      if (op === 0 || op === 1 || op === 2) {
        this._frags.push(payload);
        if (fin) {
          const text = Buffer.concat(this._frags).toString('utf8');
          this._frags = [];
          if (this.readyState === 1) this.onmessage?.({ data: text });
        }
      } else if (op === 8) {
        const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
        this._close = { code, reason: payload.subarray(2).toString('utf8') };
        if (this.readyState === 1) this._frame(8, payload.subarray(0, 2));
        this.readyState = 2;
        this._sock.end();
      } else if (op === 9) {
        this._frame(10, payload);
      }
    }
  }

  _frame(op, payload) {
    const mask = crypto.randomBytes(4);
    const len = payload.length;
    const head = len < 126 ? Buffer.alloc(2) : len < 65536 ? Buffer.alloc(4) : Buffer.alloc(10);
    head[0] = 0x80 | op;
    if (len < 126) head[1] = 0x80 | len;
    else if (len < 65536) {
      head[1] = 0x80 | 126;
      head.writeUInt16BE(len, 2);
    } else {
      head[1] = 0x80 | 127;
      head.writeBigUInt64BE(BigInt(len), 2);
    }
    const body = Buffer.from(payload);
    for (let i = 0; i < body.length; i++) body[i] ^= mask[i & 3];
    this._sock.write(Buffer.concat([head, mask, body]));
  }

  send(text) {
    if (this.readyState !== 1) throw new Error('InvalidStateError: the socket is not open');
    this._frame(1, Buffer.from(String(text), 'utf8'));
  }

  close(code = 1000, reason = '') {
    if (this.readyState >= 2) return;
    if (this.readyState === 1) {
      const p = Buffer.alloc(2 + Buffer.byteLength(reason));
      p.writeUInt16BE(code, 0);
      p.write(reason, 2);
      this._frame(8, p);
    }
    this.readyState = 2;
    this._sock.end();
    // the gateway answers and closes; do not wait for it longer than it lingers
    setTimeout(() => this._sock.destroy(), 3000).unref();
  }

  /** Cut the connection: no close frame, the TCP socket is destroyed. */
  terminate() {
    this._sock.destroy();
  }

  _closed() {
    if (this.readyState === 3) return;
    this.readyState = 3;
    const c = this._close || { code: 1006, reason: '' };
    this.onclose?.({ code: c.code, reason: c.reason, wasClean: c.code !== 1006 });
  }
}
