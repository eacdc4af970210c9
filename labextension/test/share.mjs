// Browser test of the sidebar on a shared hive (service mode), driven by tests/test_sidebar_browser.py: alice
// (RBEE_TOKEN) sees her worker's kind and load, and shares it and takes it back with the Share button. We print
// "STEP name" per passed step, and "BUSY" / "SHARED" when the harness must act (it answers on stdin).
import { assert, nextLine, run, shot, step, T } from './harness.mjs';

const url = process.env.RBEE_LAB_URL;
const token = process.env.RBEE_TOKEN;

await run(async page => {
  const panel = page.locator('#rbee-panel');
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
  await shot(page, 'owner-sees-share', 'share-');
  step('the owner gets a Share button');

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
  await shot(page, 'four-streams', 'share-');
  step(`the load line: ${await load.textContent()}`);
  await load.waitFor({ state: 'hidden', timeout: 3 * T });
  step('the load line goes once they end');

  // --- share, then take it back -------------------------------------------------------------------
  await share.click();
  await worker.locator('.rbee-shared').waitFor({ state: 'visible', timeout: T });
  const unshare = worker.getByRole('button', { name: /^Stop sharing / });
  await unshare.waitFor({ timeout: T });
  assert((await unshare.textContent()) === 'Unshare', 'the button turns into Unshare');
  console.log('SHARED');
  assert((await nextLine()) === 'SEEN', 'bob sees the shared worker');
  await shot(page, 'shared', 'share-');
  step('Share shares it (bob sees it)');
  await unshare.click();
  await worker.locator('.rbee-shared').waitFor({ state: 'hidden', timeout: T });
  await share.waitFor({ timeout: T });
  console.log('UNSHARED');
  assert((await nextLine()) === 'GONE', 'bob no longer sees it');
  await shot(page, 'unshared', 'share-');
  step('Unshare takes it back');
  assert(!(await panel.locator('.rbee-workers .rbee-error').isVisible()), 'no error shown');

  // --- a load the hive refuses at POST: the reason at once, where she clicked ---------------------
  // alice holds her cap of one worker (c.RbeeApp.max_user_workers = 1 in this test)
  const model = panel.locator('.rbee-models li').first();
  await model.getByRole('button', { name: /^Load / }).click({ timeout: T });
  const dialog = page.locator('.jp-Dialog');
  await dialog.waitFor({ timeout: T });
  await dialog.getByRole('button', { name: 'Load' }).click();
  const refusal = panel.locator('.rbee-models .rbee-error');
  await refusal.waitFor({ state: 'visible', timeout: T });
  const why = await refusal.textContent();
  assert(/^alice already has 1 worker \(loading or loaded.*c\.RbeeApp\.max_user_workers = 1/.test(why), `the refusal says why (${why})`);
  assert((await panel.locator('.rbee-workers li[data-state]').count()) === 1, 'no second worker appears');
  assert((await panel.locator('.rbee-downloads li[data-state]').count()) === 0, 'nothing is downloaded for it');
  await shot(page, 'load-refused', 'share-');
  step(`a refused load says why in place: ${why}`);
});
