// Open a page of the Backstage backend in headless Chromium (Debian's
// /usr/bin/chromium, driven by playwright-core) and print, as JSON, what the
// stand-in app bundle recorded in window.backchat (app/dist/static/backchat.js),
// the frames' URLs, the console (Chromium's own messages too, such as a blocked
// mixed-content frame) and why the page did not load, if it did not.
//
//   node browser.js --url http://127.0.0.1:PORT/ [--timeout-ms 15000] [--map NAME ...]
//
// Chromium trusts the CAs of the NSS db in $HOME/.pki/nssdb (see
// testbed/backstage_backend.py: trusting_home).
//
// Run with the cached install's node_modules on NODE_PATH's place: the harness
// passes BACKCHAT_NPM_ROOT. --map NAME makes Chromium resolve NAME to 127.0.0.1
// (--host-resolver-rules): pages use host names as a lab does, nothing leaves
// the machine.
'use strict';

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { createRequire } = require('node:module');

function values(argv, flag) {
  const found = [];
  for (let i = 0; i < argv.length; i++) if (argv[i] === flag) found.push(argv[++i]);
  return found;
}

async function main() {
  const root = process.env.BACKCHAT_NPM_ROOT;
  if (!root) throw new Error('BACKCHAT_NPM_ROOT is not set (the directory holding node_modules)');
  const { chromium } = createRequire(path.join(root, 'package.json'))('playwright-core');
  const argv = process.argv.slice(2);
  const url = values(argv, '--url')[0];
  const timeout = Number(values(argv, '--timeout-ms')[0] ?? 15000);
  const mapped = values(argv, '--map');
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'backchat-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.BACKCHAT_CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    // Without the background-networking flags Chromium keeps calling Google's hosts.
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ...(mapped.length ? [`--host-resolver-rules=${mapped.map(name => `MAP ${name} 127.0.0.1`).join(',')}`] : [])],
  });
  const messages = [];
  try {
    const page = context.pages()[0] ?? await context.newPage();
    page.on('console', message => messages.push(`${message.type()}: ${message.text()}`));
    let response = null;
    let navigationError = null;
    try {
      response = await page.goto(url, { waitUntil: 'load', timeout });
    } catch (error) {
      // A page that does not load (e.g. its certificate is not trusted) is a result too.
      navigationError = String(error.message ?? error).split('\n')[0];
    }
    if (navigationError === null) {
      try {
        await page.waitForFunction(() => window.backchat && window.backchat.done(), null, { timeout });
      } catch (error) {
        // Report what there is; the test says what is missing.
      }
    }
    // After a failed navigation Chromium is still busy with its error page.
    const state = navigationError === null
      ? await page.evaluate(() => (window.backchat ? window.backchat.state : null)) : null;
    const result = state ? { script: true, ...state } : { script: false };
    result.status = response ? response.status() : null;
    result.navigationError = navigationError;
    result.frames = page.frames().map(frame => frame.url());
    result.console = messages;
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
