// The 30-second path in headless Chromium: open the dashboard, follow "Create an account",
// sign up, open the verification link from the email (read from the SMTP server's directory),
// make an AIDEMO key for the page's origin, and call a gateway route from a page on that
// origin. Screenshots of each step go to cfg.shots; the wall-clock time of the flow is in
// `ms`. Driven by crates/keygate-server/tests/browser.rs; prints JSON.
import { chromium } from 'playwright-core';
import { readdirSync, readFileSync } from 'node:fs';

const cfg = JSON.parse(process.argv[2]);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const out = { steps: [] };
const step = (s) => out.steps.push(s);
const shot = (page, name) => page.screenshot({ path: `${cfg.shots}/${name}.png`, fullPage: true });

// The first message to `to` with `subject`, waited for (at most 10 s).
async function mail(to, subject) {
  const deadline = Date.now() + 10000;
  while (Date.now() < deadline) {
    for (const f of readdirSync(cfg.mailDir).filter((f) => f.endsWith('.json')).sort()) {
      const m = JSON.parse(readFileSync(`${cfg.mailDir}/${f}`, 'utf8'));
      if (m.to.includes(to) && m.subject === subject) return m;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`no "${subject}" email to ${to}`);
}

try {
  const started = Date.now();
  const context = await browser.newContext({ viewport: { width: 1100, height: 800 } });
  const page = await context.newPage();
  await page.goto(cfg.base + '/dashboard');
  await shot(page, '01-dashboard');
  await page.getByRole('link', { name: 'Create an account' }).click();
  await page.waitForURL('**/dashboard/signup');
  await page.getByLabel('Email').fill(cfg.email);
  await page.getByLabel('Password').fill(cfg.password);
  await page.getByLabel('Organisation (optional)').fill('Canvas Co');
  await shot(page, '02-sign-up');
  await page.getByRole('button', { name: 'Create the account and my first key' }).click();
  await page.getByText('Copy your API key now').waitFor();
  out.firstKeyPrefix = (await page.locator('#secret').textContent()).trim().slice(0, 6);
  await shot(page, '03-account-ready');
  step('signed up');

  if (cfg.verify) {
    const m = await mail(cfg.email, 'Verify your email address');
    const link = m.text.split(/\s+/).find((w) => w.includes('/v1/signup/verify?token='));
    const res = await page.goto(link);
    out.verifyStatus = res.status();
    await shot(page, '04-verified');
    step('verified');
  }

  await page.goto(cfg.base + '/dashboard/keys');
  out.notice = (await page.locator('#plan-notice').count()) ? await page.locator('#plan-notice').innerText() : null;
  out.plan = (await page.locator('#plan').count()) ? await page.locator('#plan').innerText() : null;
  await shot(page, '05-keys');
  await page.getByLabel('Name', { exact: true }).first().fill('canvas demo');
  await page.getByLabel('Allowed origins (space separated; empty: the AI canvases)').fill(cfg.pageOrigin);
  await page.getByRole('button', { name: 'AI demo (AIDEMO)' }).click();
  await page.getByText('You will not see it again').waitFor();
  const key = (await page.locator('#secret').textContent()).trim();
  out.keyPrefix = key.slice(0, 6);
  await shot(page, '06-key-created');
  step('key created');

  // The first request, from a page on the key's origin, as a site embedding it would.
  const site = await context.newPage();
  await site.goto(cfg.pageOrigin + '/');
  out.call = await site.evaluate(async ({ url, key }) => {
    const res = await fetch(url, {
      method: 'POST',
      headers: { Authorization: 'Bearer ' + key, 'Content-Type': 'application/json' },
      body: JSON.stringify({ image: 'hello' }),
    });
    const body = await res.text();
    document.body.innerHTML = '';
    const pre = document.createElement('pre');
    pre.style.whiteSpace = 'pre-wrap';
    pre.textContent = `${res.status}\n${body}`;
    document.body.append(pre);
    return { status: res.status, code: res.headers.get('X-Keygate-Code'), body };
  }, { url: cfg.gateway, key });
  out.ms = Date.now() - started;
  await shot(site, '07-first-call');
  step('called');
} catch (e) {
  out.error = String(e && e.stack || e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
