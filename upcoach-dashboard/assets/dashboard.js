// upcoach dashboard: signs in, then follows the `metrics`, `alerts` and `security` rooms
// over Server-Sent Events and draws them. No framework, no build step, no inline code
// (the page's Content-Security-Policy allows scripts from this origin only).
//
// Tokens: the access token lives in memory only; the refresh token in sessionStorage
// (this tab only, gone when it closes), so a reload stays signed in.
// Everything a server or a client sent is put on the page as text, never as HTML.
'use strict';

(() => {
  const ROOMS = ['metrics', 'alerts', 'security'];
  const POINTS = 60; // snapshots kept per sparkline (5 minutes at one per 5 s)
  const MAX_ITEMS = 50; // alert and security events kept on the page
  const REFRESH_KEY = 'upcoach.refresh_token';
  const SVG = 'http://www.w3.org/2000/svg';

  const $ = (id) => document.getElementById(id);

  const state = {
    config: { providers: [], dev_sign_in: false },
    access: null,
    user: null,
    refreshTimer: null,
    retryTimer: null,
    retryDelay: 1000,
    source: null,
    opened: false,
    cursor: null, // the last SSE id: resumes every room exactly
    seqs: new Map(), // room -> last seq seen
    received: 0,
    missing: 0,
    reconnects: 0,
    series: new Map(), // "METHOD route" -> {rate: [], p95: []}
  };

  // ---- HTTP -------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const headers = {};
    if (body !== undefined) headers['content-type'] = 'application/json';
    if (state.access) headers.authorization = `Bearer ${state.access}`;
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'same-origin',
      cache: 'no-store',
    });
    const text = await response.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      json = null;
    }
    if (!response.ok) {
      const error = json && json.error ? json.error : {};
      throw new ApiError(
        response.status,
        error.code || 'http_error',
        error.message || `${response.status} ${response.statusText}`,
      );
    }
    return json;
  }

  // ---- signing in and out -----------------------------------------------------------

  function showSignIn(message) {
    closeSource();
    $('live').hidden = true;
    $('sign-out').hidden = state.access === null;
    $('sign-in').hidden = false;
    const error = $('sign-in-error');
    error.hidden = !message;
    error.textContent = message || '';
    setConnection('offline', state.access ? 'Not live' : 'Signed out');
  }

  function renderSignIn() {
    const box = $('providers');
    box.replaceChildren();
    for (const provider of state.config.providers) {
      const button = document.createElement('button');
      button.type = 'button';
      button.textContent = `Sign in with ${label(provider)}`;
      button.addEventListener('click', () => {
        const returnTo = `${window.location.origin}/dashboard`;
        const query = new URLSearchParams({ platform: 'web', return_to: returnTo });
        window.location.assign(`/auth/${encodeURIComponent(provider)}/authorize?${query}`);
      });
      box.append(button);
    }
    if (state.config.dev_sign_in) {
      const button = document.createElement('button');
      button.type = 'button';
      button.id = 'dev-sign-in';
      button.className = 'secondary';
      button.textContent = 'Sign in with a dev token (admin)';
      button.addEventListener('click', () =>
        signIn(() => api('POST', '/dev/token', { roles: ['admin'] })),
      );
      box.append(button);
    }
    $('no-providers').hidden = box.childElementCount > 0;
  }

  function label(provider) {
    const known = { google: 'Google', apple: 'Apple', facebook: 'Facebook' };
    return known[provider] || provider.charAt(0).toUpperCase() + provider.slice(1);
  }

  async function signIn(obtain) {
    try {
      accept(await obtain());
      await start();
    } catch (error) {
      forget();
      showSignIn(`Sign-in failed: ${error.message}`);
    }
  }

  function accept(tokens) {
    state.access = tokens.access_token;
    state.user = tokens.user || state.user;
    try {
      window.sessionStorage.setItem(REFRESH_KEY, tokens.refresh_token);
    } catch {
      // Storage may be off; the tab then signs in again after a reload.
    }
    clearTimeout(state.refreshTimer);
    const seconds = Math.max(5, Number(tokens.expires_in || 60) * 0.8);
    state.refreshTimer = setTimeout(renew, seconds * 1000);
  }

  function forget() {
    clearTimeout(state.refreshTimer);
    clearTimeout(state.retryTimer);
    state.access = null;
    state.user = null;
    try {
      window.sessionStorage.removeItem(REFRESH_KEY);
    } catch {
      // nothing stored
    }
  }

  function storedRefreshToken() {
    try {
      return window.sessionStorage.getItem(REFRESH_KEY);
    } catch {
      return null;
    }
  }

  // Rotates the refresh token, then reopens the stream with the new access token (the
  // old stream ends at the old token's expiry); the cursor makes the switch lossless.
  async function renew() {
    const refreshToken = storedRefreshToken();
    if (!refreshToken) {
      forget();
      showSignIn('Your session ended; sign in again.');
      return false;
    }
    try {
      accept(await api('POST', '/auth/refresh', { refresh_token: refreshToken }));
    } catch (error) {
      if (error instanceof ApiError && error.status >= 400 && error.status < 500) {
        forget();
        showSignIn(`Your session ended (${error.code}); sign in again.`);
        return false;
      }
      throw error; // the server could not be reached: try again later
    }
    if (!$('live').hidden) connect();
    return true;
  }

  async function signOut() {
    const refreshToken = storedRefreshToken();
    try {
      await api('POST', '/auth/logout', refreshToken ? { refresh_token: refreshToken } : {});
    } catch {
      // Signed out here whatever the server said; the token expires on its own.
    }
    forget();
    state.cursor = null;
    state.seqs.clear();
    showSignIn('');
  }

  // ---- going live -------------------------------------------------------------------

  async function start() {
    const user = state.user || (await api('GET', '/auth/me'));
    state.user = user;
    $('sign-out').hidden = false;
    if (!(user.roles || []).includes('admin')) {
      showSignIn(`Signed in as ${who(user)}, who does not have the admin role the dashboard needs.`);
      return;
    }
    $('account').textContent = `Signed in as ${who(user)}`;
    $('sign-in').hidden = true;
    $('live').hidden = false;
    try {
      render(normalize(await api('GET', '/api/dashboard/realtime/metrics')));
    } catch {
      // The stream brings a snapshot within seconds anyway.
    }
    connect();
  }

  function who(user) {
    return user.name || user.email || user.id;
  }

  function setConnection(kind, text) {
    const node = $('connection');
    node.dataset.state = kind;
    node.textContent = text;
  }

  function closeSource() {
    if (state.source) {
      state.source.close();
      state.source = null;
    }
  }

  function connect() {
    closeSource();
    clearTimeout(state.retryTimer);
    const query = new URLSearchParams({ rooms: ROOMS.join(','), access_token: state.access });
    if (state.cursor) query.set('last_event_id', state.cursor);
    const source = new EventSource(`/api/dashboard/realtime/sse?${query}`);
    state.source = source;
    if (state.opened) setConnection('reconnecting', 'Reconnecting…');
    source.addEventListener('open', () => {
      if (state.opened) bump('reconnects');
      state.opened = true;
      state.retryDelay = 1000;
      setConnection('live', 'Live');
    });
    source.addEventListener('error', () => {
      if (state.source !== source) return;
      if (source.readyState === EventSource.CLOSED) {
        // Refused (an expired token, the server gone behind a proxy): renew, then
        // reopen from the cursor, backing off while it keeps failing.
        state.source = null;
        setConnection('offline', 'Disconnected; retrying');
        retryLater();
      } else {
        // The browser reconnects by itself, sending Last-Event-ID.
        setConnection('reconnecting', 'Disconnected; reconnecting…');
      }
    });
    source.addEventListener('metrics', (event) => receive(event, (data) => render(normalize(data))));
    source.addEventListener('alert', (event) => receive(event, (data, envelope) => addAlert(envelope)));
    source.addEventListener('security_event', (event) =>
      receive(event, (data, envelope) => addSecurity(envelope)),
    );
    source.addEventListener('message', (event) => receive(event, (data, envelope) => other(envelope)));
    source.addEventListener('reset', (event) => {
      const data = parse(event.data);
      if (event.lastEventId) state.cursor = event.lastEventId;
      if (data && typeof data.room === 'string') {
        state.seqs.delete(data.room);
        note(data.room, `History no longer reached back (${data.reason || 'reset'}); some events were skipped.`);
      }
    });
  }

  function retryLater() {
    clearTimeout(state.retryTimer);
    const delay = state.retryDelay;
    state.retryDelay = Math.min(delay * 2, 30000);
    state.retryTimer = setTimeout(async () => {
      try {
        if (await renew()) return; // renew reconnects
      } catch {
        retryLater();
      }
    }, delay);
  }

  function parse(text) {
    try {
      return JSON.parse(text);
    } catch {
      return null;
    }
  }

  // Each event once, in order: a seq at or below the last one seen in its room is a
  // repeat (dropped), one above the next expected counts the events that never came.
  function receive(event, show) {
    const envelope = parse(event.data);
    if (!envelope || typeof envelope.room !== 'string' || !Number.isSafeInteger(envelope.seq)) return;
    if (event.lastEventId) state.cursor = event.lastEventId;
    const last = state.seqs.get(envelope.room);
    if (last !== undefined && envelope.seq <= last) return;
    if (last !== undefined && envelope.seq > last + 1) {
      state.missing += envelope.seq - last - 1;
      $('missing').textContent = String(state.missing);
    }
    state.seqs.set(envelope.room, envelope.seq);
    bump('received');
    show(envelope.data, envelope);
  }

  function bump(name) {
    state[name] += 1;
    $(name).textContent = String(state[name]);
  }

  // ---- drawing ----------------------------------------------------------------------

  // The JSON snapshot (GET .../metrics) and the `metrics` event differ in shape; both
  // become one.
  function normalize(data) {
    const routes = (data.routes || [])
      .map((route) =>
        route.window
          ? { method: route.method, route: route.route, rate_per_s: route.window.rate_per_s, p95_ms: route.window.p95_ms, errors: route.window.errors, count: route.window.count }
          : route,
      )
      .filter((route) => route.count === undefined || route.count > 0);
    return { ...data, routes };
  }

  function render(data) {
    const routes = data.routes || [];
    const total = routes.reduce((sum, route) => sum + (route.rate_per_s || 0), 0);
    $('rate').textContent = total.toFixed(1);
    $('p95').textContent = data.overall ? ms(data.overall.p95_ms) : '–';
    const realtime = data.realtime || {};
    $('ws').textContent = String(realtime.ws_connections ?? '–');
    $('sse').textContent = String(realtime.sse_connections ?? '–');
    const cache = data.cache || {};
    const l1 = cache.l1_hits || 0;
    const l2 = cache.l2_hits || 0;
    const misses = cache.misses || 0;
    // No reads yet: no rate, rather than 0 %.
    $('hit-rate').textContent = l1 + l2 + misses > 0 ? percent(cache.hit_rate) : '–';
    $('tiers').textContent = `L1 ${percent(l1 / (l1 + l2 + misses))} · L2 ${percent(l2 / (l2 + misses))} of L1 misses`;
    const postgres = data.pools && data.pools.postgres;
    $('waiters').textContent = postgres ? String(postgres.waiting) : '–';
    $('pool').textContent = postgres
      ? `Postgres: ${postgres.size} of ${postgres.max} connections, ${postgres.idle} idle`
      : 'No Postgres pool (in memory)';
    renderRoutes(routes);
    renderFiring(data.alerts || []);
    $('updated').textContent = new Date().toLocaleTimeString();
  }

  function renderRoutes(routes) {
    const seen = new Set();
    for (const route of routes) {
      const key = `${route.method} ${route.route}`;
      seen.add(key);
      const series = state.series.get(key) || { rate: [], p95: [] };
      push(series.rate, route.rate_per_s || 0);
      push(series.p95, route.p95_ms || 0);
      series.last = route;
      state.series.set(key, series);
    }
    for (const [key, series] of state.series) {
      if (seen.has(key)) continue;
      push(series.rate, 0);
      push(series.p95, 0);
      series.last = { ...series.last, rate_per_s: 0, errors: 0 };
      if (series.rate.every((value) => value === 0)) state.series.delete(key);
    }
    const rows = [...state.series.entries()].sort(
      (a, b) => (b[1].last.rate_per_s || 0) - (a[1].last.rate_per_s || 0) || a[0].localeCompare(b[0]),
    );
    const body = $('routes');
    body.replaceChildren(
      ...rows.map(([key, series]) => {
        const row = document.createElement('tr');
        const name = cell('name');
        name.textContent = key;
        const rate = cell('rate');
        rate.append(chart(series.rate, 'rate', `${key}: requests per second`), text((series.last.rate_per_s || 0).toFixed(1)));
        const p95 = cell('p95');
        p95.append(chart(series.p95, 'p95', `${key}: p95 latency`), text(ms(series.last.p95_ms)));
        const errors = cell('errors');
        errors.textContent = String(series.last.errors || 0);
        row.append(name, wrap(rate), wrap(p95), errors);
        return row;
      }),
    );
    $('no-routes').hidden = rows.length > 0;
  }

  // A table cell; on a phone each row stacks, and the cell's label shows beside it.
  function cell(kind) {
    const labels = { rate: 'Requests/s', p95: 'p95', errors: 'Errors' };
    const td = document.createElement('td');
    td.className = kind;
    if (labels[kind]) td.dataset.label = labels[kind];
    return td;
  }

  function wrap(td) {
    const box = document.createElement('div');
    box.className = 'cell';
    box.append(...td.childNodes);
    td.append(box);
    return td;
  }

  function text(value) {
    const span = document.createElement('span');
    span.textContent = value;
    return span;
  }

  function push(list, value) {
    list.push(Number.isFinite(value) ? value : 0);
    if (list.length > POINTS) list.shift();
  }

  // A sparkline: the last POINTS values scaled to the highest.
  function chart(values, kind, description) {
    const svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('class', `spark ${kind}`);
    svg.setAttribute('viewBox', '0 0 100 30');
    svg.setAttribute('preserveAspectRatio', 'none');
    svg.setAttribute('role', 'img');
    svg.setAttribute('aria-label', description);
    const max = Math.max(...values, 1e-9);
    const y = (value) => (29 - (value / max) * 28).toFixed(2);
    // One value draws a level line; more spread over the width, the newest at the right.
    const drawn = values.length === 1 ? [values[0], values[0]] : values;
    const step = 100 / (drawn.length - 1);
    const points = drawn.map((value, i) => `${(i * step).toFixed(2)},${y(value)}`).join(' ');
    const line = document.createElementNS(SVG, 'polyline');
    line.setAttribute('points', points);
    svg.append(line);
    return svg;
  }

  function renderFiring(alerts) {
    const list = $('firing');
    list.replaceChildren(
      ...alerts.map((alert) => {
        const item = document.createElement('li');
        const head = text(`${alert.rule}: ${alert.level}`);
        head.className = `level-${alert.level}`;
        item.append(head, text(` (value ${round(alert.value)}, threshold ${round(alert.threshold)})`), when(alert.since));
        return item;
      }),
    );
    $('no-firing').hidden = alerts.length > 0;
  }

  function addAlert(envelope) {
    const data = envelope.data || {};
    const item = document.createElement('li');
    item.dataset.seq = String(envelope.seq);
    if (typeof data.rule === 'string') {
      const head = text(`${data.rule}: ${data.state || envelope.event}`);
      head.className = `state-${data.state}`;
      item.append(head);
      if (data.value !== undefined) item.append(text(` (value ${round(data.value)}, threshold ${round(data.threshold)})`));
    } else {
      item.append(text(`${envelope.event}: ${summary(data)}`));
    }
    item.append(when(envelope.ts));
    prepend(listOf(envelope.room), item);
  }

  function addSecurity(envelope) {
    const data = envelope.data || {};
    const item = document.createElement('li');
    item.dataset.seq = String(envelope.seq);
    const head = text(data.event_type || envelope.event);
    head.className = 'level-warning';
    const parts = [];
    if (data.user_id) parts.push(`user ${data.user_id}`);
    if (data.ip_address) parts.push(`from ${data.ip_address}`);
    if (data.platform) parts.push(data.platform);
    item.append(head, text(parts.length ? ` (${parts.join(', ')})` : ''), when(envelope.ts));
    prepend($('security'), item);
  }

  function other(envelope) {
    const item = document.createElement('li');
    item.dataset.seq = String(envelope.seq);
    item.append(text(`${envelope.room} · ${envelope.event}: ${summary(envelope.data)}`), when(envelope.ts));
    prepend(listOf(envelope.room), item);
  }

  function note(room, message) {
    const item = document.createElement('li');
    item.append(text(message));
    prepend(listOf(room), item);
  }

  // The list a room's events go to (threat alerts come to both `alerts` and `security`).
  function listOf(room) {
    return room === 'security' ? $('security') : $('alerts');
  }

  function prepend(list, item) {
    list.prepend(item);
    if (list.id === 'security') $('no-security').hidden = true;
    while (list.childElementCount > MAX_ITEMS) list.lastElementChild.remove();
  }

  function summary(data) {
    const json = JSON.stringify(data);
    return json && json.length > 200 ? `${json.slice(0, 200)}…` : String(json);
  }

  function when(ts) {
    const span = document.createElement('span');
    span.className = 'when';
    const date = typeof ts === 'number' || typeof ts === 'string' ? new Date(ts) : new Date();
    span.textContent = Number.isNaN(date.getTime()) ? '' : date.toLocaleString();
    return span;
  }

  function ms(value) {
    return Number.isFinite(value) ? `${value < 10 ? value.toFixed(1) : Math.round(value)} ms` : '–';
  }

  function percent(value) {
    return Number.isFinite(value) ? `${(value * 100).toFixed(1)} %` : '–';
  }

  function round(value) {
    return Number.isFinite(value) ? Math.round(value * 100) / 100 : value;
  }

  // ---- boot -------------------------------------------------------------------------

  async function boot() {
    $('sign-out').addEventListener('click', signOut);
    try {
      state.config = await api('GET', '/dashboard/config.json');
    } catch {
      // No settings: no buttons, and the page says so.
    }
    renderSignIn();
    // A web sign-in returns here with a one-time code: take it out of the address bar
    // (and so out of history) before anything else, then trade it for tokens.
    const url = new URL(window.location.href);
    const code = url.searchParams.get('login_code');
    if (code !== null) {
      url.searchParams.delete('login_code');
      window.history.replaceState(null, '', url.pathname + url.search + url.hash);
      await signIn(() => api('POST', '/auth/exchange', { login_code: code }));
      return;
    }
    if (storedRefreshToken()) {
      try {
        if (await renew()) {
          await start();
          return;
        }
      } catch {
        showSignIn('The server could not be reached; try again.');
        return;
      }
      return;
    }
    showSignIn('');
  }

  boot();
})();
