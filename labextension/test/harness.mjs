// What the browser scenarios (browser.mjs, share.mjs) share: Chromium with a fresh profile, numbered
// screenshots, assertions, and the lines the pytest harness answers on stdin.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

export const T = 60_000;
export const shots = process.env.RBEE_SHOTS ?? fs.mkdtempSync(path.join(os.tmpdir(), 'rbee-shots-'));
fs.mkdirSync(shots, { recursive: true });

const stdin = readline.createInterface({ input: process.stdin });
const lines = [];
let waiter = null;
stdin.on('line', l => (waiter ? (waiter(l), (waiter = null)) : lines.push(l)));
/** The harness's next answer on stdin. */
export const nextLine = () => (lines.length ? Promise.resolve(lines.shift()) : new Promise(r => (waiter = r)));

let n = 0;
/** A screenshot named `{prefix}{nn}-{name}.png` in RBEE_SHOTS. */
export async function shot(page, name, prefix = '') {
  n += 1;
  const file = path.join(shots, `${prefix}${String(n).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file });
  console.log(`SHOT ${file}`);
}
export function step(name) {
  console.log(`STEP ${name}`);
}
export function assert(ok, message) {
  if (!ok) {
    throw new Error(`assertion failed: ${message}`);
  }
}

/** Chromium with a fresh profile (playwright passes it as --user-data-dir), one page, its console errors. */
export async function launch() {
  const context = await chromium.launchPersistentContext(fs.mkdtempSync(path.join(os.tmpdir(), 'rbee-chromium-')), {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run', '--disable-dev-shm-usage']
  });
  const page = await context.newPage();
  const consoleErrors = [];
  page.on('console', m => m.type() === 'error' && consoleErrors.push(m.text()));
  return { context, page, consoleErrors };
}

/** Run ``scenario(page)``; a failure leaves a screenshot, a FAIL line and exit code 1. */
export async function run(scenario) {
  const { context, page, consoleErrors } = await launch();
  try {
    await scenario(page);
    console.log('OK');
  } catch (e) {
    await shot(page, 'failure').catch(() => undefined);
    console.log(`FAIL ${e?.stack ?? e}`);
    console.log(`console errors: ${consoleErrors.join('\n')}`);
    process.exitCode = 1;
  } finally {
    await context.close();
    stdin.close();
  }
}
