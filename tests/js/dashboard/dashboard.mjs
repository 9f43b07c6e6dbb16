// The dashboard page in Debian's headless Chromium, driven by playwright-core.
//
//   node dashboard.mjs <upcoach-server binary> <artifact dir>
//
// Starts the reference server in --dev mode (with REDIS_URL and DATABASE_URL when they
// are set, so that a restarted process keeps the rooms' history and the refresh tokens)
// behind a small TCP proxy this script controls, then:
//   0. with GOOGLE_ISSUER_URL set (an OpenID provider the test started): signs in with
//      the "Sign in with Google" button, through the provider and back with a one-time
//      login code, and sees the page refuse the account for want of the admin role;
//   1. opens /dashboard, signs in with the dev token and waits for "Live";
//   2. makes requests and waits for the figures and the route table to show them;
//   3. broadcasts an alert and waits for it to appear, and a security event too;
//      then jumps the page's clock to its token renewal and checks that the page
//      rotated once (no reuse) and reopened its stream without loss;
//   4. cuts the connection, broadcasts while the page is away, restores it, and checks
//      that the page resumed with every event once (no gap, no repeat);
//   5. with the services set: stops the server (which ends the stream) while the proxy
//      answers 502 as a load balancer would (so the browser gives the stream up and the
//      page itself renews its token and reopens from its cursor), broadcasts on a new
//      process, and checks the page resumed there without loss;
//   6. saves screenshots at desktop and phone widths, and signs out.
// Any console error (a Content-Security-Policy violation among them) fails the run,
// except network errors while the script itself has the connection cut.
// Exits 0 when all passed; prints what failed otherwise.

import { spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [serverBinary, artifacts] = process.argv.slice(2);
if (!serverBinary || !artifacts) {
  console.error('usage: node dashboard.mjs <upcoach-server binary> <artifact dir>');
  process.exit(2);
}
mkdirSync(artifacts, { recursive: true });
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const services = Boolean(process.env.REDIS_URL && process.env.DATABASE_URL);
const deadline = setTimeout(() => fail('gave up after 150 s'), 150_000);

function log(message) {
  console.log(`[dashboard] ${message}`);
}

let cleanup = async () => {};
async function fail(message) {
  console.error(`FAILED: ${message}`);
  await cleanup().catch(() => {});
  process.exit(1);
}

// ---- the server ----------------------------------------------------------------------

// A signing key shared by every process this script starts, so tokens outlive a restart.
const SIGNING_KEY = Buffer.alloc(32, 7).toString('base64url');

// The server's public URL is the proxy's, so a provider's redirect comes back through it
// to the page's origin, and the page is where a web sign-in may return.
function startServer(publicUrl) {
  return new Promise((resolve, reject) => {
    const env = {
      ...process.env,
      UPCOACH_ADDR: '127.0.0.1:0',
      UPCOACH_PUBLIC_URL: publicUrl,
      AUTH_RETURN_TO_ALLOWLIST: `${publicUrl}/dashboard`,
      AUTH_SIGNING_KEY: SIGNING_KEY,
      RUST_LOG: process.env.RUST_LOG || 'info',
      NO_COLOR: '1',
    };
    if (!services) {
      delete env.REDIS_URL;
      delete env.DATABASE_URL;
    }
    const child = spawn(serverBinary, ['--dev'], { env, stdio: ['ignore', 'ignore', 'pipe'] });
    let seen = '';
    const timer = setTimeout(() => reject(new Error(`the server did not start: ${seen}`)), 30_000);
    child.stderr.on('data', (chunk) => {
      seen += chunk.toString();
      const found = seen.match(/listening on http:\/\/([0-9.]+:[0-9]+)/);
      if (found && !child.address) {
        child.address = found[1];
        clearTimeout(timer);
        resolve(child);
      }
      if (seen.length > 100_000) seen = seen.slice(-50_000);
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      if (!child.address) reject(new Error(`the server exited (${code}): ${seen}`));
    });
  });
}

function stopServer(child) {
  return new Promise((resolve) => {
    if (child.exitCode !== null) return resolve();
    child.on('exit', () => resolve());
    child.kill('SIGTERM');
  });
}

// ---- a proxy the script can cut ------------------------------------------------------

function startProxy() {
  const sockets = new Set();
  const proxy = { target: null, down: null };
  const server = net.createServer((client) => {
    if (proxy.down === 'refuse') return client.destroy();
    if (proxy.down === 'bad-gateway') {
      // As a load balancer answers while no server is up.
      client.on('error', () => {});
      client.once('data', () =>
        client.end('HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n'),
      );
      return;
    }
    const [host, port] = proxy.target.split(':');
    const upstream = net.connect(Number(port), host);
    sockets.add(client);
    sockets.add(upstream);
    const close = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('error', close).on('close', close);
    upstream.on('error', close).on('close', close);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  // Ends every connection; new ones are refused, or answered 502 with 'bad-gateway'.
  proxy.cut = (mode = 'refuse') => {
    proxy.down = mode;
    for (const socket of sockets) socket.destroy();
    sockets.clear();
  };
  proxy.restore = () => {
    proxy.down = null;
  };
  proxy.close = () => {
    proxy.cut();
    server.close();
  };
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => {
    proxy.address = `127.0.0.1:${server.address().port}`;
    resolve(proxy);
  }));
}

// ---- HTTP from the script ------------------------------------------------------------

async function call(base, method, route, token, body) {
  const headers = {};
  if (token) headers.authorization = `Bearer ${token}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const response = await fetch(`http://${base}${route}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${method} ${route}: ${response.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

async function waitFor(what, check, ms = 20_000) {
  const started = Date.now();
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() - started > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// ---- the run -------------------------------------------------------------------------

async function main() {
  const proxy = await startProxy();
  const origin = `http://${proxy.address}`;
  let server = await startServer(origin);
  proxy.target = server.address;
  log(`server at ${server.address}, page through ${proxy.address}, services: ${services}`);

  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  cleanup = async () => {
    await browser.close().catch(() => {});
    proxy.close();
    await stopServer(server);
  };
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  // The page's timers on a clock the script can jump (it runs in real time otherwise).
  await context.clock.install();
  const page = await context.newPage();
  const problems = [];
  let outage = false;
  page.on('console', (message) => {
    // While the script has the connection cut, failed loads and the proxy's 502s are
    // expected; anything else is a problem.
    const cut = outage && /net::ERR_|status of 502/.test(message.text());
    if (message.type() === 'error' && !cut) {
      problems.push(message.text());
    }
  });
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  const text = (selector) => page.locator(selector).textContent();
  const admin = (await call(server.address, 'POST', '/dev/token', null, { roles: ['admin'] })).access_token;

  // 1. The page, its policy, and signing in.
  const response = await page.goto(`${origin}/dashboard`);
  const policy = response.headers()['content-security-policy'] || '';
  if (!policy.includes("script-src 'self'") || policy.includes('unsafe-inline')) {
    throw new Error(`weak or missing Content-Security-Policy: ${policy}`);
  }
  if (process.env.GOOGLE_ISSUER_URL) {
    await page.locator('button', { hasText: 'Sign in with Google' }).click();
    await page.locator('#sign-in-error', { hasText: 'does not have the admin role' }).waitFor({ timeout: 15_000 });
    const landed = new URL(page.url());
    if (landed.pathname !== '/dashboard' || landed.search !== '') {
      throw new Error(`after the provider the page is at ${page.url()}: the login code must be gone`);
    }
    log(`provider sign-in: ${await text('#sign-in-error')}`);
    await page.locator('#sign-out').click();
    await page.locator('#sign-out').waitFor({ state: 'hidden' });
  } else {
    log('GOOGLE_ISSUER_URL unset: the provider sign-in step needs it, skipped');
  }
  await page.locator('#dev-sign-in').click();
  await page.locator('#connection[data-state="live"]').waitFor({ timeout: 15_000 });
  const account = await text('#account');
  if (!account.startsWith('Signed in as')) throw new Error(`account line: ${account}`);
  log(`signed in: ${account}`);

  // 2. The figures follow the requests the script makes.
  for (let i = 0; i < 40; i++) await call(proxy.address, 'GET', '/health');
  await waitFor('the /health route in the table', async () =>
    (await text('#routes')).includes('GET /health'),
  );
  const rate = Number(await text('#rate'));
  if (!(rate > 0)) throw new Error(`requests/s still ${rate} after 40 requests`);
  const sse = Number(await text('#sse'));
  if (!(sse >= 1)) throw new Error(`the page's own stream is not counted: SSE ${sse}`);
  const p95 = await text('#p95');
  if (!/^[0-9.]+ ms$/.test(p95)) throw new Error(`p95 tile: ${p95}`);
  const waiters = await text('#waiters');
  if (waiters !== (services ? '0' : '–')) throw new Error(`pool waiters tile: ${waiters}`);
  const hits = await text('#hit-rate');
  if (!/^(–|[0-9.]+ %)$/.test(hits)) throw new Error(`cache hit tile: ${hits}`);
  log(`figures: ${rate} requests/s, p95 ${p95}, ${sse} SSE, pool waiters ${waiters}, cache hits ${hits}`);

  // 3. A broadcast alert appears.
  const broadcast = (n) =>
    call(server.address, 'POST', '/api/dashboard/realtime/broadcast/alerts', admin, {
      event: 'alert',
      data: { rule: `browser-test-${n}`, state: 'firing', level: 'warning', value: n, threshold: 1 },
    });
  const shown = (n) => page.locator('#alerts li', { hasText: `browser-test-${n}:` }).count();
  await broadcast(1);
  await waitFor('the broadcast alert on the page', async () => (await shown(1)) === 1);

  // What a client sends is shown as text: markup in an alert stays characters.
  const hostile = '<img src=x id=injected onerror=alert(1)><b>bold</b>';
  await call(server.address, 'POST', '/api/dashboard/realtime/broadcast/alerts', admin, {
    event: 'alert',
    data: { rule: hostile, state: 'firing', level: 'warning', value: 1, threshold: 1 },
  });
  await waitFor('the hostile alert as text', async () => (await text('#alerts')).includes(hostile));
  if ((await page.locator('#injected, #alerts b').count()) !== 0) {
    throw new Error('markup from an alert became elements');
  }

  // ... and so does a security event: a refresh token used twice.
  const victim = await call(server.address, 'POST', '/dev/token', null, { roles: [] });
  const reuse = { refresh_token: victim.refresh_token };
  await call(server.address, 'POST', '/auth/refresh', null, reuse);
  await call(server.address, 'POST', '/auth/refresh', null, reuse).then(
    () => { throw new Error('a reused refresh token was accepted'); },
    (error) => { if (!String(error.message).includes('401')) throw error; },
  );
  await waitFor('the reuse on the page', async () =>
    (await text('#security')).includes('refresh_token_reused'),
  );
  await page.screenshot({ path: path.join(artifacts, 'dashboard-desktop.png'), fullPage: true });

  // ... and the renewal at 80% of the token's 15 minutes: one rotation, no reuse, the
  // stream reopened from its cursor.
  const reuses = () => page.locator('#security li', { hasText: 'refresh_token_reused' }).count();
  const [reusedBefore, reconnectsBefore] = [await reuses(), Number(await text('#reconnects'))];
  await page.clock.fastForward('12:01');
  await waitFor('the stream reopened after the renewal', async () =>
    Number(await text('#reconnects')) > reconnectsBefore,
  );
  await page.locator('#connection[data-state="live"]').waitFor({ timeout: 15_000 });
  await broadcast(11);
  await waitFor('an alert after the renewal', async () => (await shown(11)) === 1);
  if ((await reuses()) !== reusedBefore) throw new Error('the renewal was taken for a reuse');
  if ((await text('#missing')) !== '0') throw new Error(`missing after the renewal: ${await text('#missing')}`);
  log(`renewed: reconnects ${await text('#reconnects')}`);

  // 4. Cut the connection; what is published meanwhile arrives after it comes back.
  const seqsBefore = await page.locator('#alerts li').evaluateAll((items) => items.map((i) => Number(i.dataset.seq)));
  outage = true;
  proxy.cut();
  await page.locator('#connection:not([data-state="live"])').waitFor({ timeout: 15_000 });
  log(`cut: the page says "${await text('#connection')}"`);
  for (const n of [2, 3, 4]) await broadcast(n);
  await new Promise((r) => setTimeout(r, 500));
  for (const n of [2, 3, 4]) {
    if ((await shown(n)) !== 0) throw new Error(`alert ${n} arrived while the connection was cut`);
  }
  proxy.restore();
  await page.locator('#connection[data-state="live"]').waitFor({ timeout: 30_000 });
  await waitFor('the alerts published while away', async () =>
    (await Promise.all([2, 3, 4].map(shown))).every((count) => count === 1),
  );
  await checkNoLoss(page, seqsBefore, 3);
  outage = false;
  log(`resumed after a cut: reconnects ${await text('#reconnects')}, missing ${await text('#missing')}`);

  // 5. The server ends the stream: a new process takes over, and the page resumes there.
  if (services) {
    const before = await page.locator('#alerts li').evaluateAll((items) => items.map((i) => Number(i.dataset.seq)));
    outage = true;
    proxy.cut('bad-gateway');
    await stopServer(server);
    await page.locator('#connection[data-state="offline"]').waitFor({ timeout: 15_000 });
    log(`server gone: the page says "${await text('#connection')}"`);
    server = await startServer(origin);
    proxy.target = server.address;
    for (const n of [5, 6]) await broadcast(n);
    proxy.restore();
    await page.locator('#connection[data-state="live"]').waitFor({ timeout: 45_000 });
    await waitFor('the alerts published on the new process', async () =>
      (await Promise.all([5, 6].map(shown))).every((count) => count === 1),
    30_000);
    await checkNoLoss(page, before, 2);
    outage = false;
    log(`resumed on a new process: missing ${await text('#missing')}`);
  } else {
    log('REDIS_URL and DATABASE_URL unset: the restart step needs them, skipped');
  }

  // 6. Phone width, then sign out.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.screenshot({ path: path.join(artifacts, 'dashboard-phone.png'), fullPage: true });
  await page.locator('#sign-out').click();
  await page.locator('#sign-in').waitFor({ state: 'visible' });
  await page.screenshot({ path: path.join(artifacts, 'dashboard-signed-out.png') });

  if (problems.length) throw new Error(`console errors:\n${problems.join('\n')}`);
  await cleanup();
  clearTimeout(deadline);
  log('all passed');
}

// The alerts room's seqs on the page: every one from the first, each once, in order,
// the ones seen `before` among them and at least `added` more; and the page counted no
// gap. (A threat alert the script's refresh-token reuse raised may be among them.)
async function checkNoLoss(page, before, added) {
  const seqs = await page
    .locator('#alerts li')
    .evaluateAll((items) => items.map((i) => Number(i.dataset.seq)).filter(Number.isFinite));
  const ascending = [...seqs].reverse();
  const expected = Array.from({ length: ascending.length }, (_, i) => ascending[0] + i);
  if (JSON.stringify(ascending) !== JSON.stringify(expected)) {
    throw new Error(`alert seqs ${JSON.stringify(ascending)}: not each once, in order`);
  }
  if (!before.every((seq) => ascending.includes(seq)) || ascending.length < before.length + added) {
    throw new Error(`alert seqs ${JSON.stringify(ascending)} after ${JSON.stringify(before)}, ${added} more expected`);
  }
  const missing = await page.locator('#missing').textContent();
  if (missing !== '0') throw new Error(`the page counted ${missing} missing events`);
}

main().catch((error) => fail(error.stack || String(error)));
