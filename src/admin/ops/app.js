// The ringgate operator page. Reads /api/live (server-sent events, one JSON snapshot a
// second) with fetch() and a stream reader, because EventSource cannot send the
// Authorization header. The key comes from the URL fragment (#key=..., never sent to the
// server) or the form, and is kept in sessionStorage (this tab only).
'use strict';

const KEY_STORE = 'ringgate-ops-key';
const HISTORY = 300; // points kept for the charts: 5 minutes at one a second
const SPAN_MIN = 60; // the charts' x axis: at least a minute, growing to HISTORY
const STALE_MS = 5000; // no snapshot for this long: the stream is dead, reconnect
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 10000;

const $ = (id) => document.getElementById(id);
const COLUMNS = [
  // [snapshot field, is a rate, total field shown as the cell's title]
  ['connections', false],
  ['parked', false],
  ['frames_in_s', true, 'frames_in'],
  ['frames_out_s', true, 'frames_out'],
  ['msgs_in_s', true, 'msgs_in'],
  ['msgs_out_s', true, 'msgs_out'],
  ['acks_pending', false],
  ['retransmits', false],
  ['spilled', false],
  ['replayed', false],
  ['cross_shard', false],
  ['redis_ms', true],
  ['rate_limited', false],
];

// The page's state: one owner, this object.
const state = {
  generation: 0, // bumped by every connect(); an older stream's end is ignored
  controller: null,
  retryMs: RETRY_MIN_MS,
  retryTimer: null,
  lastEventAt: 0,
  seq: 0,
  history: [],
  store: '',
};

function takeKeyFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const key = params.get('key');
  if (key) {
    sessionStorage.setItem(KEY_STORE, key);
    // Out of the address bar and the history once read.
    history.replaceState(null, '', location.pathname + location.search);
  }
}

function setStatus(kind, text) {
  const el = $('status');
  el.dataset.state = kind;
  el.textContent = text;
}

function showForm(show) {
  $('keyform').hidden = !show;
  if (show) $('key').focus();
}

function retry(why, retryAfterS) {
  const wait = retryAfterS ? Number(retryAfterS) * 1000 : state.retryMs / 2 + Math.random() * state.retryMs / 2;
  state.retryMs = Math.min(state.retryMs * 2, RETRY_MAX_MS);
  setStatus('error', `${why}; reconnecting in ${Math.round(wait / 1000)} s`);
  console.warn('ringgate ops:', why);
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(connect, wait);
}

async function connect() {
  clearTimeout(state.retryTimer);
  if (state.controller) state.controller.abort();
  const key = sessionStorage.getItem(KEY_STORE);
  if (!key) {
    setStatus('idle', 'enter the API key');
    showForm(true);
    return;
  }
  const gen = ++state.generation;
  const controller = new AbortController();
  state.controller = controller;
  setStatus('connecting', 'connecting…');
  let res;
  try {
    res = await fetch('/api/live', {
      headers: { Authorization: `Bearer ${key}` },
      cache: 'no-store',
      signal: controller.signal,
    });
  } catch (e) {
    if (gen === state.generation) retry(`cannot reach /api/live: ${e.message}`);
    return;
  }
  if (!res.ok) {
    let why = res.statusText;
    try { why = (await res.json()).error || why; } catch (_) { /* not JSON */ }
    if (res.status === 401 || res.status === 403) {
      // A wrong or missing key does not get better by retrying.
      setStatus('unauthorized', `authorization error (HTTP ${res.status}): ${why}`);
      console.error('ringgate ops: authorization error', res.status, why);
      showForm(true);
      return;
    }
    if (gen === state.generation) retry(`HTTP ${res.status}: ${why}`, res.headers.get('retry-after'));
    return;
  }
  showForm(false);
  setStatus('live', 'live');
  state.lastEventAt = Date.now();
  let why = 'stream ended';
  try {
    await readEvents(res.body, onSnapshot);
  } catch (e) {
    why = `stream broke: ${e.message}`;
  }
  if (gen === state.generation) retry(why);
}

// Server-sent events: blank-line separated, `data:` lines joined.
async function readEvents(body, onData) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n/g, '\n');
    let at;
    while ((at = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, at);
      buf = buf.slice(at + 2);
      const data = event.split('\n')
        .filter((l) => l.startsWith('data:'))
        .map((l) => l.slice(5).replace(/^ /, ''))
        .join('\n');
      if (data) onData(JSON.parse(data));
    }
  }
}

function fmt(v, rate) {
  if (v === null || v === undefined) return '–';
  return rate ? v.toFixed(1) : String(v);
}

function fmtUptime(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${s % 60}s`;
}

function row(r, cell) {
  const tr = document.createElement('tr');
  tr.dataset.shard = String(r.shard);
  const first = document.createElement(cell);
  first.textContent = r.shard === 'all' ? 'total' : String(r.shard);
  tr.appendChild(first);
  for (const [field, rate, total] of COLUMNS) {
    const td = document.createElement('td');
    td.dataset.col = field;
    td.textContent = fmt(r[field], rate);
    if (total) td.title = `${r.totals[total]} since start`;
    tr.appendChild(td);
  }
  return tr;
}

function onSnapshot(s) {
  state.lastEventAt = Date.now();
  state.retryMs = RETRY_MIN_MS;
  state.seq += 1;
  const n = s.node;
  state.store = n.store;
  $('node').textContent = `${n.node_id} · v${n.version} · up ${fmtUptime(n.uptime_s)} · ${n.shards} shard${n.shards === 1 ? '' : 's'} · store ${n.store}`;
  const dl = $('config');
  dl.replaceChildren();
  for (const [k, v] of Object.entries(s.config)) {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = String(v);
    dd.dataset.key = k;
    dl.append(dt, dd);
  }
  const table = $('shards');
  table.tBodies[0].replaceChildren(...s.shards.map((r) => row(r, 'td')));
  table.tFoot.replaceChildren(row(s.total, 'td'));
  setStatus('live', `live · ${new Date(s.ts_ms).toLocaleTimeString()} · ${s.live.open}/${s.live.max} streams`);
  // Last: a reader of these attributes sees a table that is already complete.
  table.dataset.ts = String(s.ts_ms);
  table.dataset.seq = String(state.seq);

  const t = s.total;
  state.history.push({
    conns: t.connections,
    msgsIn: t.msgs_in_s, msgsOut: t.msgs_out_s,
    framesIn: t.frames_in_s, framesOut: t.frames_out_s,
    redis: t.redis_ms,
  });
  if (state.history.length > HISTORY) state.history.shift();
  drawCharts();
}

const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

// A line chart of the last points (the axis spans SPAN_MIN to HISTORY seconds), newest at
// the right; null values break the line; `empty` is written when there is nothing to draw.
function drawChart(canvas, series, empty) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const g = canvas.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  let max = 0;
  for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
  max = niceMax(max);
  const top = 14, bottom = h - 4, left = 2, right = w - 2;
  g.strokeStyle = css('--line');
  g.lineWidth = 1;
  g.setLineDash([]);
  for (const f of [0, 0.5, 1]) {
    const y = Math.round(bottom - (bottom - top) * f) + 0.5;
    g.beginPath(); g.moveTo(left, y); g.lineTo(right, y); g.stroke();
  }
  g.fillStyle = css('--dim');
  g.font = '10px ui-monospace, monospace';
  g.fillText(String(max), left + 2, 10);
  const span = Math.min(HISTORY, Math.max(SPAN_MIN, state.history.length));
  const spanText = span >= 120 ? `${Math.round(span / 60)} min` : `${span} s`;
  g.fillText(spanText, right - g.measureText(spanText).width - 2, 10);
  if (empty) g.fillText(empty, left + 2, (top + bottom) / 2);
  const step = (right - left) / (span - 1);
  for (const s of series) {
    g.strokeStyle = s.color;
    g.lineWidth = 1.5;
    // "out" dashed, so equal in and out lines both show.
    g.setLineDash(s.dash || []);
    g.beginPath();
    let pen = false;
    const offset = span - s.values.length;
    s.values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      const x = left + (offset + i) * step;
      const y = bottom - (bottom - top) * (max ? v / max : 0);
      if (pen) g.lineTo(x, y); else g.moveTo(x, y);
      pen = true;
    });
    g.stroke();
  }
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function drawCharts() {
  const h = state.history;
  const pick = (f) => h.map((p) => (p[f] === undefined ? null : p[f]));
  drawChart($('chart-conns'), [{ values: pick('conns'), color: css('--ok') }]);
  drawChart($('chart-msgs'), [{ values: pick('msgsIn'), color: css('--in') }, { values: pick('msgsOut'), color: css('--out'), dash: [4, 3] }]);
  drawChart($('chart-frames'), [{ values: pick('framesIn'), color: css('--in') }, { values: pick('framesOut'), color: css('--out'), dash: [4, 3] }]);
  const redis = pick('redis');
  const noRedis = state.store === 'embedded' ? 'no Redis: embedded store'
    : redis.every((v) => v === null) ? 'no Redis batches' : '';
  drawChart($('chart-redis'), [{ values: redis, color: css('--out') }], noRedis);
}

function start() {
  takeKeyFromFragment();
  $('keyform').addEventListener('submit', (e) => {
    e.preventDefault();
    const key = $('key').value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $('key').value = '';
    connect();
  });
  $('forget').addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORE);
    state.generation += 1;
    if (state.controller) state.controller.abort();
    setStatus('idle', 'key forgotten');
    showForm(true);
  });
  window.addEventListener('hashchange', () => { takeKeyFromFragment(); connect(); });
  window.addEventListener('resize', drawCharts);
  // A stream that stopped sending without closing (a dead proxy, a suspended laptop).
  setInterval(() => {
    if ($('status').dataset.state === 'live' && Date.now() - state.lastEventAt > STALE_MS && state.controller) {
      state.controller.abort();
    }
  }, 1000);
  connect();
}

start();
