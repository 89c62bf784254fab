// The dashboard end to end in headless Chromium: sign in with an sk key, create a key from
// the AIDEMO preset, read it once, call a gateway route with it, revoke it in the dashboard,
// see the next call refused and both events in the audit view. Screenshots of the main pages
// go to cfg.shots. Driven by crates/keygate-server/tests/browser.rs; prints JSON.
import { chromium } from 'playwright-core';

const cfg = JSON.parse(process.argv[2]);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'],
});
const out = { steps: [] };
const step = (s) => out.steps.push(s);
const shot = (page, name) => page.screenshot({ path: `${cfg.shots}/${name}.png`, fullPage: true });
try {
  const context = await browser.newContext({ viewport: { width: 1100, height: 800 } });
  const page = await context.newPage();
  await page.goto(cfg.base + '/dashboard');
  await shot(page, '01-sign-in');
  await page.getByLabel('Secret key (sk)').fill(cfg.root);
  await page.getByRole('button', { name: 'Sign in', exact: true }).click();
  await page.waitForURL('**/dashboard/keys');
  step('signed in');
  out.cookie = (await context.cookies()).find((c) => c.name === 'kg_dash');

  await page.getByLabel('Name', { exact: true }).first().fill('canvas demo');
  await page.getByRole('button', { name: 'AI demo (AIDEMO)' }).click();
  await page.getByText('You will not see it again').waitFor();
  const key = (await page.locator('#secret').textContent()).trim();
  out.keyPrefix = key.slice(0, 10);
  out.createdText = await page.locator('main').innerText();
  await shot(page, '02-key-created');
  step('created');

  const call = async () => {
    const r = await page.request.post(cfg.gateway, {
      headers: { Authorization: 'Bearer ' + key, Origin: 'https://claude.ai', 'Content-Type': 'application/json' },
      data: { hello: 'world' },
    });
    return { status: r.status(), code: r.headers()['x-keygate-code'] || null };
  };
  out.before = await call();

  await page.getByRole('link', { name: "Go to the key's page" }).click();
  await page.getByRole('heading', { level: 1 }).waitFor();
  // The usage chart fills once the audit log has shipped the call (every 200 ms).
  for (let i = 0; i < 50; i++) {
    out.keyPageBefore = await page.locator('main').innerText();
    if (out.keyPageBefore.includes('allowed (1)')) break;
    await page.waitForTimeout(200);
    await page.reload();
  }
  await shot(page, '03-key-page');
  // Edit the name only: the rest (rate limit, budget, expiry) stays as it was.
  await page.getByText('Edit', { exact: true }).click();
  await page.getByLabel('Name', { exact: true }).fill('canvas demo (edited)');
  await page.getByRole('button', { name: 'Save' }).click();
  await page.getByRole('heading', { level: 1, name: /edited/ }).waitFor();
  out.keyPageEdited = await page.locator('main').innerText();
  await page.getByLabel('Yes, revoke this key now').check();
  await page.getByRole('button', { name: 'Revoke' }).click();
  await page.getByRole('heading', { level: 1, name: /revoked/ }).waitFor();
  out.keyPageAfter = await page.locator('main').innerText();
  step('revoked');
  out.after = await call();

  // The audit view, filtered to the key: both decisions and the revocation, once shipped.
  const keyId = page.url().split('/').pop();
  out.keyId = keyId;
  let text = '';
  for (let i = 0; i < 50; i++) {
    await page.goto(`${cfg.base}/dashboard/audit?key_id=${keyId}`);
    text = await page.locator('main').innerText();
    if (text.includes('key.revoked') && text.includes('REVOKED') && text.includes('VALID')) break;
    await page.waitForTimeout(200);
  }
  out.audit = text;
  out.leaks = [out.keyPageBefore, out.keyPageAfter, out.audit].filter((t) => t.includes(key)).length;
  await shot(page, '04-audit');
  for (const [name, path] of [['05-keys', '/dashboard/keys'], ['06-alerts', '/dashboard/alerts'],
                              ['07-webhooks', '/dashboard/webhooks'], ['08-oauth', '/dashboard/oauth'],
                              ['09-credits', '/dashboard/tenant']]) {
    await page.goto(cfg.base + path);
    await shot(page, name);
  }
  // Keyboard only: the first field of the keys page is reachable with Tab.
  await page.goto(cfg.base + '/dashboard/keys');
  await page.keyboard.press('Tab');
  out.firstFocus = await page.evaluate(() => document.activeElement && document.activeElement.textContent);
  // Narrow screen: the keys table scrolls inside its box instead of widening the page.
  await page.setViewportSize({ width: 390, height: 800 });
  out.narrowOverflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await shot(page, '10-keys-narrow');
  // A form posted without the session's CSRF token is refused.
  const forged = await page.request.post(`${cfg.base}/dashboard/keys`, {
    form: { name: 'forged', kind: 'pk', preset: 'aidemo', csrf: 'nope' },
  });
  out.forgedStatus = forged.status();
  // Renaming a key whose rate window the form cannot show keeps that rate limit.
  await page.goto(`${cfg.base}/dashboard/keys/${cfg.hourly}`);
  await page.getByText('Edit', { exact: true }).click();
  await page.getByLabel('Name', { exact: true }).fill('hourly (renamed)');
  await page.getByRole('button', { name: 'Save' }).click();
  await page.getByRole('heading', { level: 1, name: /renamed/ }).waitFor();
  out.hourlyEdited = await page.locator('main').innerText();
  // A sign-out posted from elsewhere (no CSRF token) does not sign the user out.
  await page.request.post(`${cfg.base}/dashboard/logout`, { form: {}, maxRedirects: 0 });
  out.afterForgedLogout = !!(await context.cookies()).find((c) => c.name === 'kg_dash' && c.value);
  // Signing out drops the session.
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.waitForURL('**/dashboard/login');
  out.afterLogout = (await context.cookies()).find((c) => c.name === 'kg_dash') || null;
  step('signed out');
} catch (e) {
  out.error = String(e && e.stack || e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
