// The demo page's script (demo/demo.js) against a real gateway, with a small stand-in for the
// few DOM calls it makes (no browser here; the page itself is to be tested in Chromium with
// the gateway's /demo route). alice types and sends; bob shows it and reads it; alice's
// bubble ends at "read" (ticks only move forward: the receipt can beat `delivered`).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startGateway } from '../test-support/gateway.js';
import { NetWebSocket } from '../test-support/netws.js';
import { memoryStorage } from '../src/ringgate.js';

/** An element with what demo.js uses: innerHTML (its fixed pane), querySelector, classList... */
class El {
  constructor(tag) {
    this.tag = tag;
    this.children = [];
    this.listeners = {};
    this.textContent = '';
    this.value = '';
    this.sel = {};
    this.classes = new Set();
    const self = this;
    this.classList = {
      add(c) {
        if (!c) throw new Error('SyntaxError: an empty token'); // as DOMTokenList does
        self.classes.add(c);
      },
      remove(c) {
        self.classes.delete(c);
      },
    };
  }
  get className() {
    return [...this.classes].join(' ');
  }
  set className(v) {
    this.classes = new Set(String(v).split(' ').filter(Boolean));
  }
  set innerHTML(html) {
    // the pane's template: every selector demo.js asks for must be in it
    for (const s of ['.state', '.peer', 'ol', '.typing', '.log', 'form', 'input', '[data-act=cut]', '[data-act=reload]']) {
      const probe = s.startsWith('.') ? `class="${s.slice(1)}` : s.startsWith('[') ? s.slice(1, -1).replace('=', '="') : `<${s}`;
      assert.ok(html.includes(probe), `the pane has ${s}`);
      this.sel[s] = new El(s);
    }
  }
  querySelector(s) {
    return s === '.tick' ? this.children.find((c) => c.className === 'tick') : this.sel[s];
  }
  append(c) {
    this.children.push(c);
  }
  addEventListener(ev, fn) {
    this.listeners[ev] = fn;
  }
}

async function until(what, check, ms = 10000) {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) assert.fail(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

test('demo page script: two panes chat through a real gateway with ticks, typing and presence', async (t) => {
  const gw = await startGateway();
  t.after(() => gw.child.kill('SIGKILL'));
  t.after(() => {
    for (const p of Object.values(globalThis.ringgateDemo || {})) p.client().stop();
  });
  const els = { alice: new El('section'), bob: new El('section'), gw: new El('code') };
  globalThis.document = { getElementById: (id) => els[id], createElement: (tag) => new El(tag), visibilityState: 'visible' };
  globalThis.location = { search: `?gw=${gw.ws.replace(/\/ws$/, '')}`, hostname: '127.0.0.1' };
  globalThis.localStorage = memoryStorage();
  globalThis.WebSocket ??= NetWebSocket;
  await import('../demo/demo.js');
  const A = els.alice.sel;
  const B = els.bob.sel;
  assert.equal(els.gw.textContent, gw.ws);
  await until('both open', () => A['.state'].textContent === 'open' && B['.state'].textContent === 'open');
  await until('each sees the other online', () => A['.peer'].textContent === 'bob: online' && B['.peer'].textContent === 'alice: online');

  A.input.value = 'hello bob';
  A.input.listeners.input();
  await until('bob sees alice typing', () => B['.typing'].textContent === 'alice is typing…');
  const delivered = [];
  globalThis.ringgateDemo.alice.client().on('delivered', (d) => delivered.push(d));
  A.form.listeners.submit({ preventDefault() {} });
  const mine = A.ol.children[0];
  assert.equal(mine.textContent, 'hello bob');
  assert.equal(mine.querySelector('.tick').textContent, '…', 'pending until accepted');
  await until('bob shows it', () => B.ol.children.length === 1);
  assert.equal(B.ol.children[0].textContent, 'hello bob');
  await until('alice told delivered and read', () => delivered.length === 1 && globalThis.ringgateDemo.bob.client()._reads.size === 0);
  await until('alice\'s bubble marked read', () => mine.querySelector('.tick').textContent === 'read');
  assert.equal(mine.querySelector('.tick').textContent, 'read', 'and it stays read once delivered came too');
  assert.ok(mine.className.includes('mine') && !mine.className.includes('pending'));

  // cut and reload buttons: both come back, nothing shown twice
  A['[data-act=cut]'].listeners.click();
  B['[data-act=reload]'].listeners.click();
  await until('both open again', () => A['.state'].textContent === 'open' && B['.state'].textContent === 'open');
  B.input.value = 'hi alice';
  B.form.listeners.submit({ preventDefault() {} });
  await until('alice shows bob\'s reply', () => A.ol.children.length === 2);
  assert.equal(B.ol.children.length, 2, 'bob: one received, one sent');
  for (const c of ['alice', 'bob']) globalThis.ringgateDemo[c].client().stop();
});
