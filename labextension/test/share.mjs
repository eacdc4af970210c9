// Browser test of the sidebar on a shared hive (service mode), driven by tests/test_sidebar_browser.py: alice
// (RBEE_TOKEN) sees her worker's kind and load, and shares it and takes it back with the Share button. We print
// "STEP name" per passed step, and "BUSY" / "SHARED" when the harness must act (it answers on stdin).
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

const url = process.env.RBEE_LAB_URL;
const token = process.env.RBEE_TOKEN;
const shots = process.env.RBEE_SHOTS ?? fs.mkdtempSync(path.join(os.tmpdir(), 'rbee-shots-'));
fs.mkdirSync(shots, { recursive: true });

const stdin = readline.createInterface({ input: process.stdin });
const lines = [];
let waiter = null;
stdin.on('line', l => (waiter ? (waiter(l), (waiter = null)) : lines.push(l)));
const nextLine = () => (lines.length ? Promise.resolve(lines.shift()) : new Promise(r => (waiter = r)));

async function shot(page, name) {
  const file = path.join(shots, `share-${name}.png`);
  await page.screenshot({ path: file });
  console.log(`SHOT ${file}`);
}
function assert(ok, message) {
  if (!ok) {
    throw new Error(`assertion failed: ${message}`);
  }
}

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
const panel = page.locator('#rbee-panel');
const T = 60_000;

try {
  await page.goto(`${url}lab?token=${token}`, { timeout: 120_000 });
  await page.locator('#jp-main-dock-panel').waitFor({ timeout: 120_000 });
  const news = page.locator('.jp-toast-button', { hasText: 'No' });
  if (await news.isVisible().catch(() => false)) {
    await news.click();
  }
  await page.locator('.jp-SideBar [data-id="rbee-panel"]').click({ timeout: T }); // the bee
  await panel.locator('.rbee-status', { hasText: 'Live' }).waitFor({ timeout: T });
  await panel.locator('.rbee-workers li[data-state="idle"]').waitFor({ timeout: T });
  const worker = panel.locator(`.rbee-workers li[data-key="${await panel.locator('.rbee-workers li').first()
    .getAttribute('data-key')}"]`); // by id: its state changes below
  assert((await worker.locator('.rbee-kind').textContent()) === 'generate', 'the kind badge says generate');
  assert(await worker.locator('.rbee-shared').isHidden(), 'not shared yet');
  const share = worker.getByRole('button', { name: /^Share .* with every user$/ });
  await share.waitFor({ timeout: T });
  await shot(page, 'owner-sees-share');
  console.log('STEP the owner gets a Share button');

  // --- four streams at once: the row shows the batch ------------------------------------------
  console.log('BUSY');
  assert((await nextLine()) === 'STARTED', 'the harness started four streams');
  const load = worker.locator('.rbee-load');
  const lines = [];
  for (const deadline = Date.now() + T; Date.now() < deadline;) {
    const text = (await load.isVisible()) ? await load.textContent() : '';
    if (text !== lines[lines.length - 1]) {
      lines.push(text);
    }
    if (/^4 active · 0 queued · batch 4\/8 · [\d.]+ tok\/s$/.test(text)) {
      break;
    }
    await page.waitForTimeout(100);
  }
  assert(/^4 active · 0 queued · batch 4\/8/.test(lines[lines.length - 1]), `the row shows the batch (${lines.join(' | ')})`);
  await shot(page, 'four-streams');
  console.log(`STEP the load line: ${await load.textContent()}`);
  await load.waitFor({ state: 'hidden', timeout: 3 * T });
  console.log('STEP the load line goes once they end');

  // --- share, then take it back -------------------------------------------------------------------
  await share.click();
  await worker.locator('.rbee-shared').waitFor({ state: 'visible', timeout: T });
  const unshare = worker.getByRole('button', { name: /^Stop sharing / });
  await unshare.waitFor({ timeout: T });
  assert((await unshare.textContent()) === 'Unshare', 'the button turns into Unshare');
  console.log('SHARED');
  assert((await nextLine()) === 'SEEN', 'bob sees the shared worker');
  await shot(page, 'shared');
  console.log('STEP Share shares it (bob sees it)');
  await unshare.click();
  await worker.locator('.rbee-shared').waitFor({ state: 'hidden', timeout: T });
  await share.waitFor({ timeout: T });
  console.log('UNSHARED');
  assert((await nextLine()) === 'GONE', 'bob no longer sees it');
  await shot(page, 'unshared');
  console.log('STEP Unshare takes it back');
  assert(!(await panel.locator('.rbee-workers .rbee-error').isVisible()), 'no error shown');
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
