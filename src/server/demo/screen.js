// The trading screen served at `/`: a watchlist, a live chart of the selected instrument, the
// top of book and a status bar, all fed by one TickgateStream (the JS client, served by this
// server at /tickgate-client.js). No framework: the DOM is updated once per animation frame
// from plain per-instrument state, so a busy feed costs one layout per frame, not per record.
import { TickgateStream, fetchToken, TokenError, ControlError, StreamClosed, HandshakeRefused }
  from '/tickgate-client.js';

const $ = (id) => document.getElementById(id);
const HISTORY = 1500; // chart points kept per instrument (a ring)
const FLASH_MS = 150;
// A cell flashes at most this often: on a busy feed every trade changes the price, and a
// cell lit all the time tells nothing.
const FLASH_EVERY_MS = 2000;
// Updates per second per instrument asked of the server (protocol v1.1 throttled
// subscriptions, §6a): a screen cannot show more. It repaints once per animation frame and a
// reader follows a few changes a second per cell, so the quotes in between would only be
// decoded and drawn over. The server sends every trade still (the chart loses nothing) and
// the latest quote, at most 10 times a second per instrument.
const MAX_RATE = 10;

/** Formats a price with two decimals (DEMO prices are dollars), or a dash. */
const px = (v) => (v === undefined || Number.isNaN(v) ? '—' : v.toFixed(2));
/** Sizes are fixed-point too; whole units read best on a screen. */
const sz = (v) => (v === undefined ? '' : Math.round(v).toLocaleString('en-US'));

/** The last values of one instrument and the DOM cells that show them. */
class Instrument {
  constructor(symbol, id, tr) {
    this.symbol = symbol; this.id = id; this.tr = tr;
    this.cells = {};
    for (const td of tr.cells) this.cells[td.className] = td;
    this.last = undefined; this.ref = undefined; this.dir = 0;
    this.bid = undefined; this.ask = undefined; this.bidSz = undefined; this.askSz = undefined;
    this.t = new Float64Array(HISTORY); this.p = new Float64Array(HISTORY);
    this.n = 0; this.head = 0; // ring of (event time ms, trade price)
    this.dirty = true; this.flashAt = 0; this.flashDir = 0;
  }
  trade(price, tMs) {
    if (this.ref === undefined) this.ref = price; // the session's first price: change is counted from it
    const now = performance.now();
    if (this.last !== undefined && price !== this.last && now - this.flashAt >= FLASH_EVERY_MS) {
      this.flashDir = price > this.last ? 1 : -1; this.flashAt = now;
    }
    this.last = price;
    this.t[this.head] = tMs; this.p[this.head] = price;
    this.head = (this.head + 1) % HISTORY; if (this.n < HISTORY) this.n++;
    this.dirty = true;
  }
  quote(bid, bidSz, ask, askSz) {
    this.bid = bid; this.bidSz = bidSz; this.ask = ask; this.askSz = askSz; this.dirty = true;
  }
  render(now) {
    const c = this.cells;
    if (this.dirty) {
      this.dirty = false;
      const chg = this.last !== undefined && this.ref !== undefined ? this.last - this.ref : undefined;
      const cls = chg === undefined || chg === 0 ? 'flat' : chg > 0 ? 'up' : 'down';
      c.last.textContent = px(this.last);
      c.chg.textContent = chg === undefined ? '' : (chg > 0 ? '+' : '') + chg.toFixed(2);
      c.pct.textContent = chg === undefined ? '' : (chg > 0 ? '+' : '') + ((chg / this.ref) * 100).toFixed(2) + '%';
      c.chg.className = 'chg ' + cls; c.pct.className = 'pct ' + cls;
      c.bid.textContent = px(this.bid); c.ask.textContent = px(this.ask);
      c.bidsz.textContent = sz(this.bidSz); c.asksz.textContent = sz(this.askSz);
      c.spread.textContent = this.bid !== undefined && this.ask !== undefined ? (this.ask - this.bid).toFixed(2) : '';
    }
    // The flash: the cell gets the colour at once and loses it through the CSS transition.
    const flashing = this.flashDir !== 0 && now - this.flashAt < FLASH_MS;
    c.last.classList.toggle('flash-up', flashing && this.flashDir > 0);
    c.last.classList.toggle('flash-down', flashing && this.flashDir < 0);
    if (!flashing) this.flashDir = 0;
  }
}

class Screen {
  constructor() {
    this.stream = null;       // the one live TickgateStream, or null
    this.bySymbol = new Map(); this.byId = new Map();
    this.feed = null; this.selected = null; this.chartDirty = true;
    this.closedByUser = false;
    $('login').addEventListener('submit', (e) => { e.preventDefault(); this.connect(); });
    $('disconnect').addEventListener('click', () => this.disconnect());
    $('rows').addEventListener('click', (e) => {
      const tr = e.target.closest('tr[data-symbol]');
      if (tr) this.select(tr.dataset.symbol);
    });
    new ResizeObserver(() => { this.chartDirty = true; }).observe($('chart-wrap'));
    const frame = () => { this.render(); requestAnimationFrame(frame); };
    requestAnimationFrame(frame);
    setInterval(() => this.renderStatus(), 250);
  }

  /** A token: the read-only demo token when the secret is empty, else client credentials. */
  async token() {
    const clientId = $('cid').value.trim(); const clientSecret = $('secret').value;
    if (clientSecret === '') {
      const r = await fetch('/demo/token', { method: 'POST' });
      const body = await r.json().catch(() => ({}));
      if (!r.ok) {
        throw new TokenError(r.status, body.error || 'demo_token', r.status === 404
          ? 'this server has configured clients: enter a client id and secret'
          : body.error_description || '');
      }
      return body.access_token;
    }
    const t = await fetchToken('/oauth2/token', { clientId, clientSecret });
    return t.accessToken;
  }

  connect() {
    // One socket at a time: Connect while a stream exists (connecting, live or reconnecting)
    // does nothing, however often it is pressed.
    if (this.stream) return;
    this.showError(null);
    const feed = $('feed').value.trim() || 'DEMO';
    const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/v1/stream';
    const s = new TickgateStream({ url, token: () => this.token(), feed, symbols: ['*'], snapshot: true, maxRate: MAX_RATE });
    this.stream = s; this.closedByUser = false;
    if (this.feed !== feed) this.resetBoard(); this.feed = feed;
    $('connect').disabled = true; $('disconnect').disabled = false;
    s.addEventListener('subscribed', (e) => this.onSubscribed(e.detail.msg));
    s.addEventListener('batch', (e) => this.onBatch(e.detail.batch));
    s.addEventListener('reconnecting', (e) => { this.reconnectAt = Date.now() + e.detail.delayMs; });
    s.addEventListener('open', () => { this.reconnectAt = 0; });
    s.addEventListener('reconnected', () => this.showError(null));
    s.addEventListener('error', (e) => this.showError(describe(e.detail.error)));
    s.addEventListener('closed', (e) => {
      if (this.stream !== s) return;
      this.stream = null; this.reconnectAt = 0;
      $('connect').disabled = false; $('disconnect').disabled = true;
      const { code, reason } = e.detail;
      if (!this.closedByUser && code !== 1000 && code !== undefined && !$('error').classList.contains('shown')) {
        this.showError(`closed by the server: ${code}${reason ? ' ' + reason : ''}`);
      }
      this.renderStatus();
    });
    s.start();
    this.renderStatus();
  }

  disconnect() {
    if (!this.stream) return;
    this.closedByUser = true;
    this.stream.stop();
  }

  showError(text) {
    const el = $('error');
    el.textContent = text || '';
    el.classList.toggle('shown', Boolean(text));
  }

  resetBoard() {
    $('rows').textContent = ''; this.bySymbol.clear(); this.byId.clear(); this.selected = null;
    this.chartDirty = true;
  }

  onSubscribed(msg) {
    $('wl-hint').style.display = 'none';
    for (const { symbol, id } of msg.instruments) {
      if (this.bySymbol.has(symbol)) { // a resubscribe after a reconnect: the ids can change with the epoch
        const inst = this.bySymbol.get(symbol);
        this.byId.delete(inst.id); inst.id = id; this.byId.set(id, inst);
        continue;
      }
      const tr = document.createElement('tr');
      tr.dataset.symbol = symbol;
      for (const cls of ['sym', 'last', 'chg', 'pct', 'bidsz', 'bid', 'ask', 'asksz', 'spread']) {
        const td = document.createElement('td'); td.className = cls;
        tr.appendChild(td);
      }
      tr.cells[0].textContent = symbol;
      $('rows').appendChild(tr);
      const inst = new Instrument(symbol, id, tr);
      this.bySymbol.set(symbol, inst); this.byId.set(id, inst);
    }
    $('wl-count').textContent = `${this.bySymbol.size} instruments`;
    // The rate the server agreed to (a server without v1.1 echoes none: every record).
    $('st-rate').textContent = typeof msg.max_rate === 'number' && msg.max_rate > 0
      ? `${msg.max_rate} updates/s per instrument` : 'every update';
    if (!this.selected && msg.instruments.length) this.select(msg.instruments[0].symbol);
  }

  onBatch(batch) {
    const feedId = this.stream ? this.stream.feedId : undefined;
    const t = batch.trades;
    for (let i = 0; i < t.length; i++) {
      if (t.feedId[i] !== feedId) continue;
      const inst = this.byId.get(t.instrumentId[i]);
      if (inst) { inst.trade(t.price[i], t.tsEventNs[i] / 1e6); if (inst === this.selected) this.chartDirty = true; }
    }
    const q = batch.quotes;
    for (let i = 0; i < q.length; i++) {
      if (q.feedId[i] !== feedId) continue;
      const inst = this.byId.get(q.instrumentId[i]);
      if (inst) inst.quote(q.bidPx[i], q.bidSz[i], q.askPx[i], q.askSz[i]);
    }
  }

  select(symbol) {
    const inst = this.bySymbol.get(symbol);
    if (!inst) return;
    if (this.selected) this.selected.tr.classList.remove('selected');
    this.selected = inst; inst.tr.classList.add('selected');
    $('chart-sym').textContent = symbol; $('book-sym').textContent = symbol;
    this.chartDirty = true;
  }

  render() {
    const now = performance.now();
    for (const inst of this.bySymbol.values()) inst.render(now);
    const s = this.selected;
    if (s) {
      $('chart-px').textContent = px(s.last);
      $('book-bid').textContent = px(s.bid); $('book-ask').textContent = px(s.ask);
      $('book-bidsz').textContent = sz(s.bidSz); $('book-asksz').textContent = sz(s.askSz);
      $('book-spread').textContent = s.bid !== undefined && s.ask !== undefined ? (s.ask - s.bid).toFixed(2) : '—';
    }
    if (this.chartDirty) { this.chartDirty = false; drawChart($('chart'), s); }
  }

  renderStatus() {
    const s = this.stream; const conn = $('st-conn');
    let text = 'disconnected'; let cls = 'bad';
    if (s) {
      if (s.connection && s.session) { text = 'connected'; cls = 'ok'; } else { text = 'connecting…'; cls = 'wait'; }
      if (this.reconnectAt) {
        const left = Math.max(0, this.reconnectAt - Date.now());
        text = `reconnecting in ${(left / 1000).toFixed(1)} s`; cls = 'wait';
      }
    }
    conn.className = cls; conn.lastChild.textContent = text;
    $('st-session').textContent = s && s.session ? s.session : '—';
    if (s && s.exp) {
      const left = Math.max(0, s.exp - Date.now() / 1000);
      $('st-exp').textContent = left >= 60 ? `${Math.floor(left / 60)}m ${String(Math.floor(left % 60)).padStart(2, '0')}s` : `${Math.floor(left)}s`;
    } else $('st-exp').textContent = '—';
    const st = s ? s.stats : this.lastStats;
    if (s) this.lastStats = s.stats;
    if (st) {
      $('st-refreshes').textContent = st.refreshes; $('st-gaps').textContent = st.gaps;
      $('st-reconnects').textContent = st.reconnects; $('st-records').textContent = st.records.toLocaleString('en-US');
      $('st-latency').textContent = st.lastLatencyMs === undefined || st.lastLatencyMs === null ? '—' : `${st.lastLatencyMs.toFixed(1)} ms`;
    }
  }
}

/** The text the error banner shows for an error of the client library. */
function describe(err) {
  if (err instanceof TokenError) {
    return err.status === 0 ? `token request failed: ${err.message}`
      : `token refused (${err.status} ${err.error}): ${err.description || err.message}`;
  }
  if (err instanceof ControlError) return `${err.error}: ${err.description || err.message}`;
  if (err instanceof StreamClosed) return `closed by the server: ${err.code}${err.reason ? ' ' + err.reason : ''}`;
  if (err instanceof HandshakeRefused) return `connection refused: ${err.description || err.message}`;
  return String(err && err.message ? err.message : err);
}

/** Draws the trade prices of `inst` as a line over the time they cover, with a price grid. */
function drawChart(canvas, inst) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth; const h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  }
  const g = canvas.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  if (!inst || inst.n < 2) {
    g.fillStyle = '#7d8895'; g.font = '12px system-ui'; g.fillText('waiting for trades…', 14, 24); return;
  }
  const n = inst.n; const start = (inst.head - n + HISTORY) % HISTORY;
  let lo = Infinity, hi = -Infinity;
  for (let k = 0; k < n; k++) { const p = inst.p[(start + k) % HISTORY]; if (p < lo) lo = p; if (p > hi) hi = p; }
  if (hi - lo < 0.02) { const m = (hi + lo) / 2; lo = m - 0.01; hi = m + 0.01; }
  const pad = (hi - lo) * 0.08; lo -= pad; hi += pad;
  const t0 = inst.t[start]; const t1 = inst.t[(start + n - 1) % HISTORY];
  const left = 8, right = 64, top = 10, bottom = 22;
  const X = (t) => left + ((t - t0) / Math.max(1, t1 - t0)) * (w - left - right);
  const Y = (p) => top + (1 - (p - lo) / (hi - lo)) * (h - top - bottom);
  // Grid and price labels.
  g.strokeStyle = '#232a33'; g.fillStyle = '#7d8895'; g.font = '11px ui-monospace, monospace'; g.lineWidth = 1;
  // Enough decimals that the grid's labels differ on a narrow range.
  const decimals = hi - lo < 0.08 ? 3 : 2;
  for (let i = 0; i <= 4; i++) {
    const p = lo + ((hi - lo) * i) / 4; const y = Math.round(Y(p)) + 0.5;
    g.beginPath(); g.moveTo(left, y); g.lineTo(w - right, y); g.stroke();
    g.fillText(p.toFixed(decimals), w - right + 6, y + 4);
  }
  const secs = (t1 - t0) / 1000;
  g.fillText(secs >= 1 ? `last ${secs.toFixed(0)} s` : '', left, h - 6);
  // The price line, coloured by the move since the session's first price.
  const up = inst.last >= inst.ref;
  g.strokeStyle = up ? '#2fbf71' : '#f0524f'; g.lineWidth = 1.5; g.beginPath();
  for (let k = 0; k < n; k++) {
    const i = (start + k) % HISTORY; const x = X(inst.t[i]); const y = Y(inst.p[i]);
    if (k === 0) g.moveTo(x, y); else g.lineTo(x, y);
  }
  g.stroke();
  // Area under the line, faint.
  g.lineTo(X(t1), h - bottom); g.lineTo(X(t0), h - bottom); g.closePath();
  g.fillStyle = up ? 'rgba(47,191,113,.08)' : 'rgba(240,82,79,.08)'; g.fill();
  // The last price as a tag on the axis.
  const y = Y(inst.last);
  g.fillStyle = up ? '#2fbf71' : '#f0524f'; g.fillRect(w - right + 2, y - 8, right - 4, 16);
  g.fillStyle = '#0e1116'; g.fillText(inst.last.toFixed(2), w - right + 6, y + 4);
}

window.tickgateScreen = new Screen();
