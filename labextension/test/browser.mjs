// Browser test of the rbee sidebar in Debian's Chromium, driven by tests/test_sidebar_browser.py,
// which starts `jupyter lab` (RBEE_LAB_URL, RBEE_TOKEN) with the local hub and reads our stdout:
// "STEP name" per passed step, "RESTART" when the server must restart (we wait for a line on stdin).
import { assert, nextLine, run, shot, step, T } from './harness.mjs';

const url = process.env.RBEE_LAB_URL;
const token = process.env.RBEE_TOKEN;
const TINY = process.env.RBEE_TINY_REF ?? 'hf:rbee-test/tiny-llama';
const OTHER = process.env.RBEE_OTHER_REF ?? 'hf:rbee-test/tiny-llama-sharded';

await run(async page => {
  const panel = page.locator('#rbee-panel');
  // --- the panel opens (command palette) ------------------------------------------------
  await page.goto(`${url}lab?token=${token}`, { timeout: 120_000 });
  await page.locator('#jp-main-dock-panel').waitFor({ timeout: 120_000 });
  await page.locator('.jp-SideBar [data-id="rbee-panel"]').waitFor({ timeout: T });
  const news = page.locator('.jp-toast-button', { hasText: 'No' });
  if (await news.isVisible().catch(() => false)) {
    await news.click(); // "notified about Jupyter news?": no
  }
  await page.keyboard.press('Control+Shift+c');
  await page.locator('.lm-CommandPalette-input').fill('rbee: Open panel');
  await page.locator('.lm-CommandPalette-item', { hasText: 'rbee: Open panel' }).first().click();
  await panel.waitFor({ state: 'visible', timeout: T });
  await panel.locator('.rbee-status', { hasText: 'Live' }).waitFor({ timeout: T });
  await panel.locator('.rbee-devices li').first().waitFor({ timeout: T });
  await shot(page, 'panel-open');
  step('panel opens');

  // --- a bad ref: the server's message in place ----------------------------------------------
  await panel.getByLabel('Model reference to download').fill('hf:../../x');
  await panel.getByLabel('Start download').click();
  const err = panel.locator('.rbee-downloads .rbee-error');
  await err.waitFor({ state: 'visible', timeout: T });
  assert((await err.textContent()).length > 10, 'the error says something');
  await shot(page, 'download-error');
  step('errors in place');

  // --- download: a bar reaching 100 %, the model under Models ----------------------------------
  await panel.getByLabel('Model reference to download').fill(TINY);
  await panel.getByLabel('Model reference to download').press('Enter');
  const row = panel.locator(`.rbee-downloads li[data-state]`).filter({ hasText: TINY }).first();
  await row.waitFor({ timeout: T });
  await err.waitFor({ state: 'hidden', timeout: T });
  const seen = new Set();
  let midShot = false;
  for (const deadline = Date.now() + T; Date.now() < deadline;) {
    const state = await row.getAttribute('data-state');
    const now = await row.getByRole('progressbar').getAttribute('aria-valuenow');
    seen.add(Number(now));
    if (!midShot && Number(now) > 0 && Number(now) < 100) {
      midShot = true;
      await shot(page, 'download-progress');
    }
    if (state === 'complete') {
      break;
    }
    await page.waitForTimeout(100);
  }
  assert((await row.getAttribute('data-state')) === 'complete', 'the download completes');
  assert((await row.getByRole('progressbar').getAttribute('aria-valuenow')) === '100', 'the bar reaches 100 %');
  assert([...seen].some(v => v > 0 && v < 100), `intermediate progress was shown (${[...seen]})`);
  const model = panel.locator(`.rbee-models li[data-key="${TINY}"]`);
  await model.waitFor({ timeout: T });
  await shot(page, 'download-complete');
  step('download reaches 100 % and the model is listed');

  // --- cancel a download -----------------------------------------------------------------------
  await panel.getByLabel('Model reference to download').fill(OTHER);
  await panel.getByLabel('Start download').click();
  const other = panel.locator('.rbee-downloads li[data-state]').filter({ hasText: OTHER }).first();
  await other.getByRole('button', { name: `Cancel the download of ${OTHER}` }).click({ timeout: T });
  await panel.locator('.rbee-downloads li[data-state="cancelled"]').filter({ hasText: OTHER })
    .waitFor({ timeout: T });
  await shot(page, 'download-cancelled');
  step('cancel a download');

  // --- load: layers counting up, the worker turns idle -------------------------------------------
  await model.getByRole('button', { name: `Load ${TINY}` }).click();
  const dialog = page.locator('.jp-Dialog');
  await dialog.waitFor({ timeout: T });
  await dialog.locator('select[name="device"]').selectOption('cpu');
  await shot(page, 'load-dialog');
  await dialog.getByRole('button', { name: 'Load' }).click();
  const worker = panel.locator('.rbee-workers li[data-state]').first();
  await worker.waitFor({ timeout: T });
  const layers = [];
  for (const deadline = Date.now() + 120_000; Date.now() < deadline;) {
    const state = await worker.getAttribute('data-state');
    if (state === 'loading') {
      const text = await worker.locator('.rbee-layers').textContent();
      const m = /Layers (\d+)/.exec(text ?? '');
      if (m && Number(m[1]) !== layers[layers.length - 1]) {
        layers.push(Number(m[1]));
        if (layers.length === 2) {
          await shot(page, 'loading-layers');
        }
      }
    } else if (state === 'idle' || state === 'failed') {
      break;
    }
    await page.waitForTimeout(50);
  }
  assert((await worker.getAttribute('data-state')) === 'idle', 'the worker turns idle');
  assert(layers.length >= 2 && layers.every((v, i) => i === 0 || v > layers[i - 1]), `layers count up (${layers})`);
  assert((await worker.locator('.rbee-kind').textContent()) === 'generate', 'the worker says it generates');
  assert(await worker.locator('.rbee-shared').isHidden(), 'not shared');
  assert((await worker.getByRole('button', { name: /^Share / }).count()) === 0 ||
    await worker.getByRole('button', { name: /^Share / }).isHidden(), 'a single user has no one to share with');
  await shot(page, 'worker-idle');
  step(`load shows layers ${layers.join(',')} and the worker turns idle`);

  // --- playground: streamed text, then stop ----------------------------------------------------
  await panel.getByLabel('Prompt').fill('Once upon a time');
  await panel.getByLabel('Maximum new tokens').fill('24');
  await panel.getByRole('button', { name: 'Generate an answer' }).click();
  const output = panel.locator('.rbee-output');
  const lengths = [];
  for (const deadline = Date.now() + T; Date.now() < deadline;) {
    lengths.push((await output.textContent()).length);
    if (/tokens ·/.test(await panel.locator('.rbee-stats').textContent())) {
      break;
    }
    await page.waitForTimeout(50);
  }
  assert(/24 tokens/.test(await panel.locator('.rbee-stats').textContent()), 'the answer ends with its stats');
  assert(new Set(lengths.filter(l => l > 0)).size >= 2, `the text streamed in (${lengths})`);
  await shot(page, 'playground-streamed');
  step('playground streams text');

  await panel.getByLabel('Maximum new tokens').fill('900');
  await panel.getByRole('button', { name: 'Generate an answer' }).click();
  await page.waitForFunction(() => (document.querySelector('#rbee-panel .rbee-output')?.textContent ?? '').length > 5,
    null, { timeout: T });
  // while it generates, the worker's row shows its load (from the feed's "stats" events)
  const loadLine = worker.locator('.rbee-load');
  await loadLine.filter({ hasText: /^1 active · 0 queued · batch 1\/\d+ · [\d.]+ tok\/s$/ }).waitFor({ timeout: T });
  await shot(page, 'worker-load');
  step(`the worker shows its load: ${await loadLine.textContent()}`);
  await panel.getByRole('button', { name: 'Stop the generation' }).click();
  await panel.locator('.rbee-stats', { hasText: /Stopped|cancel/i }).waitFor({ timeout: T });
  assert(await panel.getByRole('button', { name: 'Generate an answer' }).isEnabled(), 'ready again after stop');
  await loadLine.waitFor({ state: 'hidden', timeout: T }); // idle again: no load line
  await shot(page, 'playground-stopped');
  step('stop works');

  // --- the server restarts: the panel reconnects and re-reads the feed -----------------------------
  console.log('RESTART'); // the harness stops the server and says STOPPED ...
  assert((await nextLine()) === 'STOPPED', 'the harness stopped the server');
  await panel.locator('.rbee-status', { hasText: 'Reconnecting' }).waitFor({ timeout: T });
  await shot(page, 'server-down');
  console.log('START'); // ... and starts it again only once the panel has seen it gone
  assert((await nextLine()) === 'RESTARTED', 'the harness restarted the server');
  await panel.locator('.rbee-status', { hasText: 'Live' }).waitFor({ timeout: T });
  await panel.locator('.rbee-workers .rbee-empty').waitFor({ timeout: T }); // workers died with the server
  await model.waitFor({ timeout: T }); // the catalog is on disk
  await shot(page, 'server-restarted');
  step('the panel recovers after a server restart');

  // --- a reload re-reads the state from the feed -----------------------------------------------
  await page.reload();
  await panel.locator('.rbee-status', { hasText: 'Live' }).waitFor({ timeout: T });
  await panel.locator(`.rbee-models li[data-key="${TINY}"]`).waitFor({ timeout: T });
  await shot(page, 'reloaded');
  step('state survives a reload');
});
