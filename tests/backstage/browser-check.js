// Open a page in headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core)
// and print, as JSON, what the page recorded in window.backchat: the page's own script
// (served by the test) fetches the API and listens for the iframe's "loaded" message and
// for CSP violations.
//
//   node browser-check.js --url http://127.0.0.1:PORT/ [--timeout-ms 15000] [--map NAME ...]
//
// --map NAME makes Chromium resolve NAME to 127.0.0.1 (--host-resolver-rules), so pages
// can use host names, as real users do, without leaving the machine.
'use strict';

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { npmRequire, argValues } = require('./lib.js');

const { chromium } = npmRequire('playwright-core');

async function main() {
  const argv = process.argv.slice(2);
  const url = argValues(argv, '--url')[0];
  const timeout = Number(argValues(argv, '--timeout-ms')[0] ?? 15000);
  const mapped = argValues(argv, '--map');
  const executablePath = process.env.BACKCHAT_CHROMIUM ?? '/usr/bin/chromium';
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'backchat-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    // Without the background-networking flags Chromium keeps calling Google's hosts,
    // which a closed network refuses.
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ...(mapped.length ? [`--host-resolver-rules=${mapped.map(name => `MAP ${name} 127.0.0.1`).join(',')}`] : [])],
  });
  const console_ = [];
  try {
    const page = context.pages()[0] ?? await context.newPage();
    page.on('console', message => console_.push(`${message.type()}: ${message.text()}`));
    await page.goto(url, { waitUntil: 'load', timeout });
    try {
      await page.waitForFunction(() => window.backchat && window.backchat.done(), null, { timeout });
    } catch (error) {
      // Report what there is; the test says what is missing.
    }
    // No state: the page's own script did not run (blocked, or never loaded).
    const state = await page.evaluate(() => window.backchat ? window.backchat.state : null);
    const result = state ? { script: true, ...state } : { script: false };
    result.frames = page.frames().map(frame => frame.url());
    result.console = console_;
    process.stdout.write(JSON.stringify(result, null, 2) + '\n');
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().catch(error => {
  console.error(error);
  process.exit(1);
});
