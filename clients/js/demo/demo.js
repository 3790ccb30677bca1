// The demo page: two users side by side, each a RinggateClient (dev mode), showing sends,
// accepted / delivered / read ticks, typing and presence. Served by the gateway itself in dev
// mode (http://127.0.0.1:8080/demo/, then the gateway is this page's host) or from any static
// server (then ws://<this host>:8080); ?gw=ws://host:port says otherwise.
import { RinggateClient } from '../src/ringgate.js';

const params = new URLSearchParams(location.search);
const servedByGateway = String(location.pathname || '').startsWith('/demo/') && /^https?:$/.test(location.protocol || '');
const sameHost = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}`;
const fallback = `ws://${location.hostname || '127.0.0.1'}:8080`;
const gw = (params.get('gw') || (servedByGateway ? sameHost : fallback)).replace(/\/+$/, '');
const url = /\/ws$/.test(gw) ? gw : `${gw}/ws`;
document.getElementById('gw').textContent = url;

/** For the console (and the tests): `ringgateDemo.alice.client()`. */
const panes = (globalThis.ringgateDemo = {});

function pane(me, peer) {
  const root = document.getElementById(me);
  root.innerHTML = `
    <header><b>${me}</b><span class="state">idle</span><span class="peer">${peer}: ?</span>
      <button data-act="cut" title="drop the connection as a network failure would">cut</button>
      <button data-act="reload" title="a new client on the same storage, as after a page reload">reload</button></header>
    <ol></ol>
    <div class="typing"></div>
    <div class="log"></div>
    <form><input placeholder="message to ${peer}" autocomplete="off"><button>send</button></form>`;
  const $ = (s) => root.querySelector(s);
  const list = $('ol');
  const bubbles = new Map(); // cid -> li of my messages
  let client = null;
  let typingTimer = null;
  let lastTyping = 0;

  const log = (text) => ($('.log').textContent = text);
  const scroll = () => (list.scrollTop = list.scrollHeight);
  function bubble(text, mine, cid) {
    const li = document.createElement('li');
    li.className = mine ? 'mine pending' : '';
    li.textContent = text;
    const tick = document.createElement('span');
    tick.className = 'tick';
    tick.textContent = mine ? '…' : '';
    li.append(tick);
    if (cid) bubbles.set(cid, li);
    list.append(li);
    scroll();
    return li;
  }
  // ticks only move forward: a read receipt can come before `delivered` (the reader reads
  // at once and acks a moment later)
  const RANK = { '…': 0, '✓': 1, '✓✓': 2, read: 3 };
  const mark = (cid, cls, tick) => {
    const li = bubbles.get(cid);
    if (!li) return;
    const el = li.querySelector('.tick');
    if (RANK[tick] <= RANK[el.textContent]) return;
    li.classList.remove('pending');
    if (cls) li.classList.add(cls);
    el.textContent = tick;
  };
  const myIds = new Map(); // message id -> cid, for read receipts

  function start() {
    client = new RinggateClient({ url, user: me });
    client.on('state', (s) => {
      const el = $('.state');
      el.className = `state ${s.state}`;
      el.textContent = s.state + (s.reason ? ` (${s.reason})` : '') + (s.delayMs != null ? ` in ${s.delayMs} ms` : '');
      if (s.state === 'open') log(`open; resent ${s.resent}`);
      if (s.state === 'reconnecting') log(`lost (close ${s.code}${s.reason ? ' ' + s.reason : ''})`);
    });
    client.on('message', (m) => {
      bubble(typeof m.body?.text === 'string' ? m.body.text : JSON.stringify(m.body), false);
      $('.typing').textContent = '';
      // shown: tell the sender it was read (the page is in front of a person)
      if (document.visibilityState !== 'hidden') client.read(m.from, m.id);
    });
    client.on('accepted', (a) => {
      myIds.set(a.id, a.cid);
      mark(a.cid, '', '✓');
    });
    client.on('delivered', (d) => mark(d.cid, 'delivered', '✓✓'));
    client.on('read', (r) => {
      if (r.from !== me) return; // my other device read something
      // every message of mine up to r.id was read
      for (const [id, cid] of myIds) if (id.length < r.id.length || (id.length === r.id.length && id <= r.id)) mark(cid, 'read', 'read');
    });
    client.on('typing', (t) => {
      $('.typing').textContent = `${t.from} is typing…`;
      clearTimeout(typingTimer);
      typingTimer = setTimeout(() => ($('.typing').textContent = ''), 3000);
    });
    client.on('presence', (p) => {
      if (peer in p.online) $('.peer').textContent = `${peer}: ${p.online[peer] ? 'online' : 'offline'}`;
    });
    client.on('error', (e) => log(`error ${e.code}: ${e.message}`));
    client.start();
    client.watch([peer]); // sent once connected, renewed by the client after every reconnect
    // what the last page left unaccepted is resent; show it again
    for (const p of client.pending()) if (!bubbles.has(p.cid)) bubble(p.body?.text ?? JSON.stringify(p.body), true, p.cid);
  }

  $('form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const input = $('input');
    const text = input.value.trim();
    if (!text) return;
    input.value = '';
    try {
      const cid = client.send(peer, { text });
      bubble(text, true, cid);
    } catch (e) {
      log(`not sent: ${e.message}`);
    }
  });
  $('input').addEventListener('input', () => {
    const now = Date.now();
    if (now - lastTyping > 2000) {
      lastTyping = now;
      client.typing(peer);
    }
  });
  root.querySelector('[data-act=cut]').addEventListener('click', () => client.dropConnection());
  root.querySelector('[data-act=reload]').addEventListener('click', () => {
    client.stop();
    start();
  });
  start();
  panes[me] = { client: () => client };
}

pane('alice', 'bob');
pane('bob', 'alice');
