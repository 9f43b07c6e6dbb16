// upcoach dashboard: signs in, then follows the `metrics`, `alerts` and `security` rooms
// over Server-Sent Events and draws them. No framework, no build step, no inline code
// (the page's Content-Security-Policy allows scripts from this origin only).
//
// Tokens live in memory only: a reload signs in again. (In sessionStorage a duplicated
// tab would share the refresh token, and the first rotation would make the other's a
// reuse, which revokes the session.) One rotation at a time; a sign-out discards any
// answer still on its way.
// Everything a server or a client sent is put on the page as text, never as HTML.
'use strict';

(() => {
  // A web sign-in returns with a one-time code in the address: take it out (and so out
  // of history) before anything else runs.
  const landing = new URL(window.location.href);
  const loginCode = landing.searchParams.get('login_code');
  if (loginCode !== null) {
    landing.searchParams.delete('login_code');
    window.history.replaceState(null, '', landing.pathname + landing.search + landing.hash);
  }

  const ROOMS = ['metrics', 'alerts', 'security'];
  const POINTS = 60; // snapshots kept per sparkline (5 minutes at one per 5 s)
  const MAX_ITEMS = 50; // alert and security events kept on the page
  const SVG = 'http://www.w3.org/2000/svg';

  const $ = (id) => document.getElementById(id);

  const state = {
    config: { providers: [], dev_sign_in: false },
    access: null,
    accessExpiresAt: 0, // ms since the epoch
    refreshToken: null,
    renewing: null, // the rotation under way, which every caller shares
    generation: 0, // bumped by sign-out: answers of an older one are dropped
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
    state.refreshToken = tokens.refresh_token;
    state.user = tokens.user || state.user;
    const seconds = Number(tokens.expires_in || 60);
    state.accessExpiresAt = Date.now() + seconds * 1000;
    clearTimeout(state.refreshTimer);
    const generation = state.generation;
    state.refreshTimer = setTimeout(() => {
      renew().catch(() => {
        if (generation === state.generation) retryLater();
      });
    }, Math.max(5, seconds * 0.8) * 1000);
  }

  function forget() {
    state.generation += 1;
    clearTimeout(state.refreshTimer);
    clearTimeout(state.retryTimer);
    closeSource();
    state.access = null;
    state.refreshToken = null;
    state.user = null;
    state.renewing = null;
  }

  // Rotates the refresh token, then reopens the stream with the new access token (the
  // old stream ends at the old token's expiry); the cursor makes the switch lossless.
  // Concurrent callers share one rotation: two with the same token would be a reuse.
  // Resolves false when signed out (a 401: the session is over); rejects when the
  // server could not be reached or asked to wait (a 429, a 5xx): try again later.
  function renew() {
    if (!state.renewing) {
      const generation = state.generation;
      state.renewing = rotate(generation).finally(() => {
        if (generation === state.generation) state.renewing = null;
      });
    }
    return state.renewing;
  }

  async function rotate(generation) {
    if (!state.refreshToken) return false;
    let tokens;
    try {
      tokens = await api('POST', '/auth/refresh', { refresh_token: state.refreshToken });
    } catch (error) {
      if (generation !== state.generation) return false;
      if (error instanceof ApiError && error.status === 401) {
        forget();
        showSignIn(`Your session ended (${error.code}); sign in again.`);
        return false;
      }
      throw error;
    }
    if (generation !== state.generation) return false; // signed out meanwhile
    accept(tokens);
    if (!$('live').hidden) connect();
    return true;
  }

  async function signOut() {
    const refreshToken = state.refreshToken;
    const access = state.access;
    forget();
    state.cursor = null;
    state.seqs.clear();
    state.opened = false;
    showSignIn('');
    if (access) {
      try {
        // The token is taken from the state above: send it explicitly.
        await fetch('/auth/logout', {
          method: 'POST',
          headers: { authorization: `Bearer ${access}`, 'content-type': 'application/json' },
          body: JSON.stringify(refreshToken ? { refresh_token: refreshToken } : {}),
          credentials: 'same-origin',
        });
      } catch {
        // Signed out here whatever the server said; the access token expires on its own.
      }
    }
  }

  // ---- going live -------------------------------------------------------------------

  async function start() {
    const user = state.user || (await api('GET', '/auth/me'));
    state.user = user;
    $('sign-out').hidden = false;
    if (!(user.roles || []).includes('admin')) {
      clearTimeout(state.refreshTimer); // nothing to keep alive: sign out, or in again
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
    if (state.opened && !state.cursor) {
      // The stream's opening position reaches the browser only (an id with no data),
      // so a reopen before the first event starts from the live head: say so.
      note('alerts', 'Reconnected before any event arrived; events sent meanwhile may be missing.');
    }
    const source = new EventSource(streamUrl());
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
        // Refused (an expired token, the server gone behind a proxy): find out why,
        // then reopen from the cursor, backing off while it keeps failing.
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

  function streamUrl() {
    const query = new URLSearchParams({ rooms: ROOMS.join(','), access_token: state.access });
    if (state.cursor) query.set('last_event_id', state.cursor);
    return `/api/dashboard/realtime/sse?${query}`;
  }

  function retryLater() {
    clearTimeout(state.retryTimer);
    const delay = state.retryDelay;
    state.retryDelay = Math.min(delay * 2, 30000);
    const generation = state.generation;
    state.retryTimer = setTimeout(() => {
      reopen(generation).catch(() => {
        if (generation === state.generation) retryLater();
      });
    }, delay);
  }

  // EventSource does not say why it was refused, so ask once with fetch: a 401 renews
  // the token, a 400 for the cursor starts afresh (saying events may be missing), a 403
  // stops with the reason; a 429, a 5xx or no answer rejects, to be tried again later.
  async function reopen(generation) {
    if (generation !== state.generation) return;
    if (Date.now() > state.accessExpiresAt - 60_000) {
      await renew(); // reconnects when it succeeds
      return;
    }
    const abort = new AbortController();
    const response = await fetch(streamUrl(), { signal: abort.signal, cache: 'no-store' });
    if (generation !== state.generation) return abort.abort();
    if (response.ok) {
      abort.abort();
      connect();
      return;
    }
    const body = parse(await response.text());
    const error = (body && body.error) || {};
    if (response.status === 401) {
      await renew();
    } else if (response.status === 400 && state.cursor) {
      state.cursor = null;
      state.seqs.clear();
      for (const room of ROOMS) note(room, `The stream could not resume (${error.code}); events may have been skipped.`);
      connect();
    } else if (response.status === 400 || response.status === 403) {
      setConnection('offline', `Refused: ${error.message || response.status}`);
    } else {
      throw new ApiError(response.status, error.code || 'http_error', error.message || '');
    }
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
    if (!data || typeof data !== 'object') return { routes: [] };
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
        head.className = known(alert.level, LEVELS, 'level');
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
      head.className = known(data.state, STATES, 'state');
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

  const LEVELS = ['info', 'warning', 'error', 'critical'];
  const STATES = ['firing', 'resolved'];

  // A class for a value the server sent, from a fixed list only.
  function known(value, list, prefix) {
    return list.includes(value) ? `${prefix}-${value}` : '';
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
    if (loginCode !== null) {
      await signIn(() => api('POST', '/auth/exchange', { login_code: loginCode }));
      return;
    }
    showSignIn('');
  }

  boot();
})();
