// Runs fetch() calls from real pages in headless Chromium and prints what each page saw, as
// JSON. Driven by crates/keygate-server/tests/browser.rs:
//   node fetch.mjs '{"cases":[{"name":"…","page":"http://localhost:…/","url":"…","key":"…"}]}'
import { chromium } from 'playwright-core';

const cfg = JSON.parse(process.argv[2]);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
const results = {};
try {
  for (const c of cfg.cases) {
    const page = await browser.newPage();
    await page.goto(c.page);
    results[c.name] = await page.evaluate(async ({ url, key }) => {
      try {
        const res = await fetch(url, {
          method: 'POST',
          headers: { Authorization: 'Bearer ' + key, 'Content-Type': 'application/json' },
          body: JSON.stringify({ hello: 'world' }),
        });
        return {
          fetched: true,
          origin: location.origin,
          status: res.status,
          body: await res.text(),
          credits: res.headers.get('X-Credits-Remaining'),
          ratelimit: res.headers.get('RateLimit'),
        };
      } catch (e) {
        return { fetched: false, origin: location.origin, error: String(e) };
      }
    }, c);
    await page.close();
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(results));
