// Real-browser end-to-end test of Portcullis: headless Debian Chromium driven by playwright-core.
//
// Started by tests/it/browser.rs (`cargo test --test it browser`), which runs a gateway in-process with the
// real clock, creates the users and passes everything through the environment:
//
//   PORTCULLIS_URL        gateway base URL, e.g. http://127.0.0.1:41234 (also [mail] public_url)
//   PORTCULLIS_APP_PATH   a protected path on the two_factor app (upstream echoes the request as JSON)
//   PORTCULLIS_USER / PORTCULLIS_USER_PASSWORD / PORTCULLIS_USER_EMAIL     a normal user (no 2FA yet)
//   PORTCULLIS_ADMIN / PORTCULLIS_ADMIN_PASSWORD                          a user in group "admins" (no 2FA yet)
//   PORTCULLIS_OUTBOX     [mail] outbox_dir
//   PORTCULLIS_CLI / PORTCULLIS_CONFIG   the portcullis binary and its -c config path
//   PORTCULLIS_SCREENSHOTS   directory for the PNGs (docs/screenshots)
//   CHROMIUM (optional)   browser binary, default /usr/bin/chromium
//
// Exits 0 when every step passed; otherwise prints the failing step and exits 1.

import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`environment variable ${name} is not set (run through cargo test --test it browser)`);
  return v;
};

const BASE = env('PORTCULLIS_URL');
const APP_PATH = env('PORTCULLIS_APP_PATH');
const USER = env('PORTCULLIS_USER');
const USER_PW = env('PORTCULLIS_USER_PASSWORD');
const USER_EMAIL = env('PORTCULLIS_USER_EMAIL');
const ADMIN = env('PORTCULLIS_ADMIN');
const ADMIN_PW = env('PORTCULLIS_ADMIN_PASSWORD');
const OUTBOX = env('PORTCULLIS_OUTBOX');
const CLI = env('PORTCULLIS_CLI');
const CONFIG = env('PORTCULLIS_CONFIG');
const SHOTS = env('PORTCULLIS_SCREENSHOTS');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const P = '/_portcullis';

const STEP_TIMEOUT = 30_000;
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };

const started = Date.now();
let currentStep = '(start)';
const log = (...a) => console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(6)}s]`, ...a);
function step(name) {
  currentStep = name;
  log(`STEP ${name}`);
}
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}
/** The page's HTML must contain `text`; on failure the error shows the page's visible text. */
async function checkContains(page, text, what) {
  const html = await page.content();
  if (!html.includes(text)) {
    const body = await bodyText(page);
    throw new Error(`check failed: ${what}: page ${page.url()} lacks ${JSON.stringify(text)}; it shows: ${body}`);
  }
}
function checkEq(actual, expected, what) {
  if (actual !== expected) {
    throw new Error(`check failed: ${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
  }
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Poll `f` until it returns a truthy value or `ms` elapse. */
async function pollUntil(what, ms, f, every = 200) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${typeof what === 'function' ? what() : what}`);
    await sleep(every);
  }
}

// ------------------------------------------------------------------------------------------------
// TOTP through oathtool (independent implementation), with replay avoidance
// ------------------------------------------------------------------------------------------------

function oathtool(secret) {
  return execFileSync('oathtool', ['--totp', '-b', secret], { encoding: 'utf8' }).trim();
}

/** Codes already submitted per secret: the gateway rejects a time step that was used once. */
const usedCodes = new Map();

/** A TOTP code for `secret` that has not been submitted before; waits (bounded) for the next 30 s step. */
async function freshTotp(secret) {
  const used = usedCodes.get(secret) || new Set();
  usedCodes.set(secret, used);
  const code = await pollUntil('a TOTP code not used before (next 30 s step)', 35_000, () => {
    const c = oathtool(secret);
    return used.has(c) ? null : c;
  }, 500);
  // Keep away from the very end of a step so the code is still current when the server checks it
  // (the gateway allows skew, but do not depend on it).
  const left = 30 - (Math.floor(Date.now() / 1000) % 30);
  if (left <= 2) {
    log(`  (${left}s left in this TOTP step; waiting for the next one)`);
    used.add(code);
    return freshTotp(secret);
  }
  used.add(code);
  return code;
}

// ------------------------------------------------------------------------------------------------
// Outbox
// ------------------------------------------------------------------------------------------------

function outboxFiles() {
  if (!fs.existsSync(OUTBOX)) return [];
  return fs.readdirSync(OUTBOX).filter((f) => f.endsWith('.eml')).sort();
}

/** Wait for a message not in `seen` whose To: contains `to` and whose body matches `re`; returns the match. */
/** Parse an .eml: headers (unfolded, lower-case names) and the body decoded as a mail client would. */
function readMail(file) {
  const raw = fs.readFileSync(path.join(OUTBOX, file), 'utf8');
  const sep = raw.search(/\r?\n\r?\n/);
  const headText = sep < 0 ? raw : raw.slice(0, sep);
  let body = sep < 0 ? '' : raw.slice(sep).replace(/^\r?\n\r?\n/, '');
  const headers = {};
  for (const line of headText.replace(/\r?\n[ \t]+/g, ' ').split(/\r?\n/)) {
    const i = line.indexOf(':');
    if (i > 0) headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
  }
  const cte = (headers['content-transfer-encoding'] || '7bit').toLowerCase();
  if (cte === 'quoted-printable') {
    body = Buffer.from(
      body.replace(/=\r?\n/g, '').replace(/=([0-9A-Fa-f]{2})/g, (_, h) => String.fromCharCode(parseInt(h, 16))),
      'latin1',
    ).toString('utf8');
  } else if (cte === 'base64') {
    body = Buffer.from(body.replace(/\s+/g, ''), 'base64').toString('utf8');
  }
  return { file, headers, cte, body };
}

function outboxSummary() {
  return outboxFiles().map((f) => {
    const m = readMail(f);
    const links = m.body.match(/https?:\/\/\S+/g) || [];
    return `${f}: To: ${m.headers.to} | Subject: ${m.headers.subject} | ${m.cte} | links: ${links.join(' ')}`;
  }).join('\n    ') || '(empty)';
}

async function waitForMail(what, seen, to, re) {
  return pollUntil(() => `email (${what}) to ${to} in ${OUTBOX}; the outbox holds:\n    ${outboxSummary()}\n`, 30_000, () => {
    for (const f of outboxFiles().reverse()) {
      if (seen.has(f)) continue;
      const mail = readMail(f);
      if (!(mail.headers.to || '').toLowerCase().includes(to.toLowerCase())) continue;
      const m = mail.body.match(re);
      if (!m) continue;
      log(`  mail ${f}: Subject: ${mail.headers.subject} (Content-Transfer-Encoding: ${mail.cte})`);
      if (mail.cte !== '7bit') {
        notes.push(`CONTRACT: the ${what} email is ${mail.cte}-encoded (contract: 7bit body, links verbatim on one line); link decoded as a mail client would`);
      }
      return m;
    }
    return null;
  });
}

// ------------------------------------------------------------------------------------------------
// Browser helpers
// ------------------------------------------------------------------------------------------------

/** Console errors and page errors of every page, except HTTP error statuses we asked for on purpose. */
const consoleProblems = [];
const expectedErrorUrls = new Set();
/** The last form POST of each page, for diagnostics. */
const lastPost = new WeakMap();
/** Findings worth reporting that do not fail the run. */
const notes = [];

function watch(page, label) {
  page.setDefaultTimeout(STEP_TIMEOUT);
  page.setDefaultNavigationTimeout(STEP_TIMEOUT);
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const url = msg.location()?.url || '';
    const text = msg.text();
    if (/^Failed to load resource: the server responded with a status of 4\d\d/.test(text)) {
      if (expectedErrorUrls.has(url)) return;
      // Chromium asks for /favicon.ico on its own; the portal pages declare no icon, so the request reaches
      // the protected app and is refused. Not a page error: noted once and reported at the end.
      if (new URL(url, BASE).pathname === '/favicon.ico') {
        if (!notes.some((n) => n.includes('favicon'))) notes.push(`/favicon.ico is requested by Chromium and answered ${text.match(/status of (\d+)/)[1]} (portal pages declare no icon)`);
        return;
      }
    }
    consoleProblems.push(`[${label}] ${currentStep}: console error at ${url || page.url()}: ${text}`);
  });
  page.on('request', (r) => {
    if (r.method() === 'POST' && r.isNavigationRequest()) lastPost.set(page, r);
  });
  page.on('pageerror', (err) => consoleProblems.push(`[${label}] ${currentStep}: page error at ${page.url()}: ${err.message}`));
  return page;
}

function assertNoConsoleErrors() {
  if (consoleProblems.length) {
    throw new Error(`console errors in the portal pages:\n  ${consoleProblems.join('\n  ')}`);
  }
}

function pathOf(page) {
  const u = new URL(page.url());
  return u.pathname;
}

async function expectPath(page, p, what) {
  await page.waitForURL((u) => u.pathname === p, { timeout: STEP_TIMEOUT }).catch(() => {});
  checkEq(pathOf(page), p, `${what}: page path (URL ${page.url()})`);
}

const shotsTaken = [];
async function shot(page, name) {
  const file = path.join(SHOTS, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true, animations: 'disabled', caret: 'hide' });
  shotsTaken.push(name);
}

/** Phone-width check: nothing wider than the viewport. */
async function assertNoHorizontalOverflow(page, what) {
  const { sw, iw, wide } = await page.evaluate(() => {
    const iw = window.innerWidth;
    const wide = [];
    for (const el of document.querySelectorAll('body *')) {
      const r = el.getBoundingClientRect();
      if (r.right > iw + 0.5 && r.width > 0) wide.push(`${el.tagName.toLowerCase()}${el.className ? '.' + el.className : ''} (right ${Math.round(r.right)})`);
    }
    return { sw: document.documentElement.scrollWidth, iw, wide: wide.slice(0, 5) };
  });
  check(sw <= iw, `${what}: no horizontal overflow at phone width (scrollWidth ${sw} > innerWidth ${iw}; widest: ${wide.join(', ')})`);
}

/** The upstream echo for the app page the browser is on, from the navigation response. */
async function appEcho(navResponse, what) {
  check(navResponse, `${what}: a navigation response`);
  checkEq(navResponse.status(), 200, `${what}: app status (URL ${navResponse.url()})`);
  const j = await navResponse.json();
  check(j && j.headers, `${what}: upstream JSON echo`);
  return j;
}

async function bodyText(page) {
  return (await page.locator('body').innerText().catch(() => '')).replace(/\s+/g, ' ').slice(0, 600);
}

/** After a form POST: a CSRF refusal ("Form expired") is reported with the headers the browser sent. */
async function failOnCsrfRefusal(page, what) {
  if ((await page.locator('h1', { hasText: 'Form expired' }).count()) === 0) return;
  const req = lastPost.get(page);
  let detail = '';
  if (req) {
    const h = await req.allHeaders();
    const resp = await req.response();
    detail = ` POST ${req.url()} -> ${resp ? resp.status() : '?'}; the browser sent Origin: ${h.origin}, ` +
      `Sec-Fetch-Site: ${h['sec-fetch-site']}, Referer: ${h.referer || '(none)'}, Cookie names: ` +
      `${(h.cookie || '').split(/;\s*/).map((c) => c.split('=')[0]).join(',') || '(none)'}`;
  }
  throw new Error(`${what}: the gateway refused a same-origin form POST from the browser as CSRF ("Form expired").${detail}`);
}

/** Click a submit button (or link) and wait for the resulting page. */
async function submit(page, selector, what) {
  await Promise.all([page.waitForNavigation(), page.click(selector)]);
  await failOnCsrfRefusal(page, what);
}

/** Click something that ends on an app page (after redirects); return the request the app echoed. */
async function clickToApp(page, selector, what) {
  const navs = [];
  const onResp = (r) => {
    if (r.request().isNavigationRequest() && r.frame() === page.mainFrame()) navs.push(r);
  };
  page.on('response', onResp);
  try {
    await submit(page, selector, what);
  } finally {
    page.off('response', onResp);
  }
  if (pathOf(page).startsWith(P + '/')) {
    throw new Error(`${what}: expected to reach the app, but the browser is on ${page.url()}, which shows: ${await bodyText(page)}`);
  }
  const last = navs.filter((r) => !new URL(r.url()).pathname.startsWith(P + '/')).pop();
  return appEcho(last, what);
}

function assertIdentity(echo, user, what, groups) {
  const h = echo.headers;
  checkEq((h['remote-user'] || []).join(','), user, `${what}: Remote-User seen by the app`);
  if (groups !== undefined) checkEq((h['remote-groups'] || []).join(','), groups, `${what}: Remote-Groups seen by the app`);
}

async function login(page, user, pass) {
  check(pathOf(page) === `${P}/login`, `on the login page before signing in as ${user} (URL ${page.url()})`);
  await page.fill('#username', user);
  await page.fill('#password', pass);
  await submit(page, 'button[type=submit]:has-text("Sign in")', currentStep);
}

/** On the enrolment page: read the secret, confirm with a TOTP code; ends on the recovery codes page. */
async function enrol(page, what, screenshot) {
  await expectPath(page, `${P}/enroll`, `${what}: forced enrolment`);
  check(await page.locator('.qr svg').count() === 1, `${what}: inline SVG QR code on the enrolment page`);
  const href = await page.locator('a[href^="otpauth://"]').getAttribute('href');
  check(href && href.startsWith('otpauth://totp/'), `${what}: otpauth:// link (${href})`);
  const secret = (await page.locator('.secret').textContent()).replace(/\s+/g, '');
  check(/^[A-Z2-7]{16,}=*$/.test(secret), `${what}: base32 secret in .secret (${secret})`);
  check(href.includes(`secret=${secret}`), `${what}: otpauth link carries the shown secret`);
  if (screenshot) await shot(page, screenshot);
  const code = await freshTotp(secret);
  await page.fill('#code', code);
  await submit(page, 'button[type=submit]:has-text("Confirm")', currentStep);
  await expectPath(page, `${P}/enroll/confirm`, `${what}: recovery codes page after confirming`);
  await checkContains(page, 'Two-factor authentication is on', `${what}: "Two-factor authentication is on"`);
  const codes = (await page.locator('#codes li').allTextContents()).map((s) => s.trim());
  checkEq(codes.length, 10, `${what}: number of recovery codes`);
  for (const c of codes) check(/^[0-9a-hjkmnp-tv-z]{5}-[0-9a-hjkmnp-tv-z]{5}-[0-9a-hjkmnp-tv-z]{5}$/.test(c), `${what}: recovery code format (${c})`);
  return { secret, codes };
}

async function signOutFromSettings(page, what) {
  await page.goto(BASE + `${P}/settings`);
  await expectPath(page, `${P}/settings`, `${what}: settings`);
  await submit(page, 'button:has-text("Sign out")', currentStep);
  await expectPath(page, `${P}/login`, `${what}: login page after signing out`);
}

async function signOutFromLogoutPage(page, what, screenshot) {
  await page.goto(BASE + `${P}/logout`);
  await expectPath(page, `${P}/logout`, `${what}: logout confirmation page`);
  if (screenshot) await shot(page, screenshot);
  await submit(page, 'main button[type=submit]:has-text("Sign out")', currentStep);
  await expectPath(page, `${P}/login`, `${what}: login page after signing out`);
}

/** Open the protected app URL; it must send the browser to the login page. */
async function openProtected(page, what) {
  const resp = await page.goto(BASE + APP_PATH);
  await expectPath(page, `${P}/login`, `${what}: protected URL redirects to login`);
  const rd = new URL(page.url()).searchParams.get('rd');
  checkEq(rd, APP_PATH, `${what}: rd parameter of the login redirect`);
  checkEq(resp.status(), 200, `${what}: login page status`);
}

function cli(args, input) {
  return execFileSync(CLI, [...args, '-c', CONFIG], { encoding: 'utf8', input: input === undefined ? '' : input + '\n' });
}

// ------------------------------------------------------------------------------------------------
// The scenario
// ------------------------------------------------------------------------------------------------

async function main() {
  fs.mkdirSync(SHOTS, { recursive: true });
  step('launch Chromium');
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // playwright-core gives every launch a fresh temporary user-data-dir.
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: 60_000,
  });
  log(`  Chromium ${browser.version()}`);
  try {
    await scenario(browser);
  } finally {
    await browser.close();
  }
}

const MOBILE = { user: 'mobile', email: 'mobile@example.com', password: 'Mobile-passw0rd!' };

/** Phone viewport (390x844): login, enrolment, recovery codes, settings for a fresh user; no horizontal overflow. */
async function phoneEnrol(browser) {
  step('phone viewport (390x844): login, enrolment, recovery codes, settings');
  cli(['user', 'add', MOBILE.user, '--email', MOBILE.email, '--name', 'Mobile User', '--password-stdin'], MOBILE.password);
  const ctx = await browser.newContext({ viewport: PHONE, isMobile: true, hasTouch: true, deviceScaleFactor: 2 });
  const ph = watch(await ctx.newPage(), 'phone');
  await openProtected(ph, 'phone');
  await assertNoHorizontalOverflow(ph, 'phone login');
  await shot(ph, 'phone-login');
  await login(ph, MOBILE.user, MOBILE.password);
  await expectPath(ph, `${P}/enroll`, 'phone: enrolment');
  await assertNoHorizontalOverflow(ph, 'phone enrolment');
  const { secret } = await enrol(ph, 'phone', 'phone-enroll');
  await assertNoHorizontalOverflow(ph, 'phone recovery codes');
  await shot(ph, 'phone-recovery-codes');
  const echo = await clickToApp(ph, 'a:has-text("I have saved my recovery codes")', 'phone after enrolment');
  assertIdentity(echo, MOBILE.user, 'phone');
  await ph.goto(BASE + `${P}/settings`);
  await assertNoHorizontalOverflow(ph, 'phone settings');
  await shot(ph, 'phone-settings');
  await signOutFromSettings(ph, 'phone');
  return { ctx, ph, secret };
}

/** Phone viewport: sign in again through the TOTP challenge. */
async function phoneChallenge({ ctx, ph, secret }) {
  step('phone viewport: challenge');
  await ph.goto(BASE + `${P}/login?rd=${encodeURIComponent(APP_PATH)}`);
  await login(ph, MOBILE.user, MOBILE.password);
  await expectPath(ph, `${P}/challenge`, 'phone: challenge');
  await assertNoHorizontalOverflow(ph, 'phone challenge');
  await shot(ph, 'phone-challenge');
  await ph.fill('#code', await freshTotp(secret));
  const echo = await clickToApp(ph, 'button:has-text("Verify")', 'phone TOTP login');
  assertIdentity(echo, MOBILE.user, 'phone TOTP login');
  await ctx.close();
}

async function scenario(browser) {
  const ctx = await browser.newContext({ viewport: DESKTOP, acceptDownloads: true });
  await ctx.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: BASE });
  const page = watch(await ctx.newPage(), 'desktop');

  // 1. Protected URL -> login -> forced enrolment -> recovery codes -> app.
  step('open a protected URL: redirected to the login page');
  await openProtected(page, 'first visit');
  check(await page.locator(`a[href="${P}/forgot"]`).count() === 1, 'login page links to "Forgot password?"');
  check(await page.locator(`a[href="${P}/invite"]`).count() === 1, 'login page links to "Create new account"');
  await shot(page, 'login');

  step('wrong password shows an error on the login page');
  expectedErrorUrls.add(BASE + `${P}/login`);
  await login(page, USER, 'not-the-password');
  await checkContains(page, 'Invalid username or password', 'wrong password: "Invalid username or password"');
  await shot(page, 'login-error');
  await page.goto(BASE + `${P}/login?rd=${encodeURIComponent(APP_PATH)}`);

  step('log in with the password: forced enrolment');
  await login(page, USER, USER_PW);
  const { secret, codes } = await enrol(page, 'first login', 'enroll');
  await shot(page, 'recovery-codes');

  step('recovery codes: "Copy all" puts the codes on the clipboard');
  const copy = page.locator('#copy-codes');
  check(await copy.isVisible(), '"Copy all" button is shown when JavaScript runs');
  await copy.click();
  await page.waitForFunction(() => document.getElementById('copy-codes').textContent === 'Copied', null, { timeout: STEP_TIMEOUT });
  const clip = await page.evaluate(() => navigator.clipboard.readText());
  checkEq(clip.trim().split(/\r?\n/).map((s) => s.trim()).join(','), codes.join(','), 'clipboard holds the recovery codes');
  check(await page.locator('#print-codes').isVisible(), '"Print" button is shown when JavaScript runs');

  step('recovery codes: "Download" gives a text file with the codes');
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('button:has-text("Download")')]);
  const dlPath = await download.path();
  const dl = fs.readFileSync(dlPath, 'utf8');
  checkEq(dl.trim().split(/\r?\n/).map((s) => s.trim()).join(','), codes.join(','), `downloaded file (${download.suggestedFilename()}) holds the recovery codes`);
  await expectPath(page, `${P}/enroll/confirm`, 'the recovery codes page stays after the download');

  step('"I have saved my recovery codes" leads to the app, which sees the identity');
  let echo = await clickToApp(page, 'a:has-text("I have saved my recovery codes")', 'after enrolment');
  checkEq(pathOf(page), APP_PATH.split('?')[0], 'landed on the originally requested path');
  assertIdentity(echo, USER, 'after enrolment', 'staff,dev');
  checkEq((echo.headers['remote-email'] || []).join(','), USER_EMAIL, 'Remote-Email seen by the app');

  // Phone width, part 1 (here so that waiting for the next TOTP steps overlaps with the desktop flow).
  const phone = await phoneEnrol(browser);

  step('settings show 2FA on and 10 recovery codes; sign out');
  await page.goto(BASE + `${P}/settings`);
  await checkContains(page, 'Status: <strong>on</strong>', 'settings: "Status: on"');
  await checkContains(page, '10 recovery codes left', 'settings: "10 recovery codes left"');
  await shot(page, 'settings');
  await signOutFromSettings(page, 'first sign-out');
  step('after signing out the app needs a new login');
  await openProtected(page, 'after sign-out');

  // 2. Log in again with a TOTP code.
  step('log in again: password, then a TOTP code');
  await login(page, USER, USER_PW);
  await expectPath(page, `${P}/challenge`, 'second login: challenge');
  await shot(page, 'challenge');
  const code2 = await freshTotp(secret);
  await page.fill('#code', code2);
  echo = await clickToApp(page, 'button:has-text("Verify")', 'TOTP login');
  assertIdentity(echo, USER, 'TOTP login');
  await signOutFromLogoutPage(page, 'after TOTP login', 'logout');

  // 3. Log in with a recovery code.
  step('log in with a recovery code');
  await openProtected(page, 'recovery login');
  await login(page, USER, USER_PW);
  await expectPath(page, `${P}/challenge`, 'recovery login: challenge');
  await submit(page, 'a:has-text("Use a recovery code")', currentStep);
  checkEq(new URL(page.url()).searchParams.get('method'), 'recovery', 'recovery challenge URL has method=recovery');
  await shot(page, 'challenge-recovery');
  // Upper case and without dashes: entry ignores case, spaces and dashes.
  await page.fill('#recovery_code', codes[0].toUpperCase().replace(/-/g, ' '));
  echo = await clickToApp(page, 'button:has-text("Verify")', 'recovery-code login');
  assertIdentity(echo, USER, 'recovery-code login');
  await page.goto(BASE + `${P}/settings`);
  await checkContains(page, '9 recovery codes left', 'settings: "9 recovery codes left" after using one');
  await signOutFromSettings(page, 'after recovery login');

  // 4. Forgot password through the outbox.
  step('forgot password: request a reset link');
  await page.click(`a[href="${P}/forgot"]`);
  await expectPath(page, `${P}/forgot`, 'forgot page');
  await shot(page, 'forgot');
  const seen = new Set(outboxFiles());
  await page.fill('#username', USER_EMAIL);
  await submit(page, 'button:has-text("Send reset link")', currentStep);
  await checkContains(page, 'If an account matches', 'forgot: "If an account matches ..."');
  await shot(page, 'forgot-sent');
  const resetLink = (await waitForMail('password reset', seen, USER_EMAIL, /(https?:\/\/\S+\/_portcullis\/reset\?token=[0-9a-f]{64})/))[1];
  check(resetLink.startsWith(BASE + '/'), `reset link uses public_url (${resetLink})`);

  step('open the reset link; give a recovery code and a new password');
  await page.goto(resetLink);
  await expectPath(page, `${P}/reset`, 'reset page');
  check(await page.locator('#recovery_code').count() === 1, 'reset page asks for a second factor');
  await shot(page, 'reset');
  const newPw = 'N3w-passphrase-for-' + USER;
  await page.fill('#recovery_code', codes[1]);
  await page.fill('#password', newPw);
  await page.fill('#password2', newPw);
  await submit(page, 'button:has-text("Change password")', currentStep);
  await checkContains(page, 'Password changed', 'reset: "Password changed"');
  await shot(page, 'reset-done');

  step('the reset link is spent: "Link not valid" error page');
  expectedErrorUrls.add(resetLink);
  const again = await page.goto(resetLink);
  checkEq(again.status(), 410, 'reused reset link status');
  await checkContains(page, 'Link not valid', 'reused reset link: "Link not valid"');
  await shot(page, 'error-link');

  step('sign in with the new password (old one refused)');
  await openProtected(page, 'after reset');
  await login(page, USER, USER_PW);
  await checkContains(page, 'Invalid username or password', 'old password is refused after the reset');
  await page.goto(BASE + `${P}/login?rd=${encodeURIComponent(APP_PATH)}`);
  await login(page, USER, newPw);
  await expectPath(page, `${P}/challenge`, 'login with the new password: challenge');
  await page.fill('#code', await freshTotp(secret));
  echo = await clickToApp(page, 'button:has-text("Verify")', 'login with the new password');
  assertIdentity(echo, USER, 'login with the new password');
  await ctx.close();

  // 5. Invitation (CLI), accepted in a fresh browser context.
  step('invitation: portcullis user invite new@example.com --groups staff');
  const seen2 = new Set(outboxFiles());
  cli(['user', 'invite', 'new@example.com', '--groups', 'staff']);
  const inviteLink = (await waitForMail('invitation', seen2, 'new@example.com', /(https?:\/\/\S+\/_portcullis\/invite\?token=[0-9a-f]{64})/))[1];
  check(inviteLink.startsWith(BASE + '/'), `invitation link uses public_url (${inviteLink})`);
  const ctx2 = await browser.newContext({ viewport: DESKTOP });
  const inv = watch(await ctx2.newPage(), 'invitee');
  await inv.goto(inviteLink);
  await expectPath(inv, `${P}/invite`, 'invitation page');
  await checkContains(inv, 'new@example.com', 'invitation page shows the invited email');
  await shot(inv, 'invite');
  await inv.fill('#username', 'newbie');
  await inv.fill('#name', 'New Person');
  await inv.fill('#password', 'Invited-passw0rd!');
  await inv.fill('#password2', 'Invited-passw0rd!');
  await submit(inv, 'button:has-text("Create account")', currentStep);
  step('invitee goes through enrolment');
  await enrol(inv, 'invitation');
  echo = await clickToApp(inv, 'a:has-text("I have saved my recovery codes")', 'invitee after enrolment');
  checkEq(pathOf(inv), '/', 'invitee lands on /');
  assertIdentity(echo, 'newbie', 'invitee', 'staff');
  checkEq((echo.headers['remote-email'] || []).join(','), 'new@example.com', 'invitee Remote-Email');
  await ctx2.close();

  // 6. Admin list.
  const ctx3 = await browser.newContext({ viewport: DESKTOP });
  const adm = watch(await ctx3.newPage(), 'admin');
  step('admin pages refuse a browser without a session (error page)');
  expectedErrorUrls.add(BASE + `${P}/admin/users`);
  const denied = await adm.goto(BASE + `${P}/admin/users`);
  checkEq(denied.status(), 403, 'admin users without a session');
  await shot(adm, 'error');

  step('admin logs in, enrols, opens the user list');
  await adm.goto(BASE + `${P}/login?rd=${encodeURIComponent(`${P}/admin/users`)}`);
  await login(adm, ADMIN, ADMIN_PW);
  await enrol(adm, 'admin');
  await submit(adm, 'a:has-text("I have saved my recovery codes")', currentStep);
  await expectPath(adm, `${P}/admin/users`, 'admin lands on the user list');
  const names = (await adm.locator('tbody tr td:first-child a').allTextContents()).map((s) => s.trim());
  for (const n of [ADMIN, USER, 'newbie']) check(names.includes(n), `admin user list contains ${n} (has ${names.join(', ')})`);
  const userRow = adm.locator('tbody tr', { has: adm.locator(`td:first-child a:text-is("${USER}")`) });
  check((await userRow.textContent()).includes('enabled'), `${USER} row shows 2FA "enabled"`);
  await shot(adm, 'admin-users');

  step('admin opens the user detail page');
  await submit(adm, `tbody a:text-is("${USER}")`, currentStep);
  await expectPath(adm, `${P}/admin/users/${USER}`, 'admin user detail');
  await checkContains(adm, 'Recent security events', 'detail: "Recent security events"');
  const html = await adm.content();
  for (const k of ['login_succeeded', 'two_factor_enabled', 'recovery_code_used']) check(html.includes(k), `detail lists ${k}`);
  check(!html.includes('$argon2'), 'detail page has no password hash');
  for (const c of codes) check(!html.includes(c), 'detail page shows no recovery code');
  await shot(adm, 'admin-user');
  await ctx3.close();

  // 7. Phone width, part 2: the challenge (the enrolment happened earlier, so no wait for a new TOTP step).
  await phoneChallenge(phone);

  step('no console errors on any page');
  assertNoConsoleErrors();
}

try {
  await main();
  log(`PASS: browser end-to-end scenario (${shotsTaken.length} screenshots in ${SHOTS}: ${shotsTaken.join(', ')})`);
  for (const n of notes) log(`NOTE: ${n}`);
  process.exit(0);
} catch (e) {
  console.error(`FAIL at step "${currentStep}": ${e && e.stack ? e.stack : e}`);
  if (consoleProblems.length) console.error(`console errors seen so far:\n  ${consoleProblems.join('\n  ')}`);
  process.exit(1);
}
