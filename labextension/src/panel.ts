import { Dialog, showDialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';
import { RbeeError, requestAPI, streamRequester } from './request';
import { SSEConnection } from './sse';

// --- what the feed says -------------------------------------------------------------------

export interface Device {
  name: string;
  kind: string;
  total_bytes: number;
  free_bytes: number;
  label: string;
}

export interface Model {
  ref: string;
  size_bytes: number;
  revision?: string | null;
  local_path: string;
  source?: string;
}

export interface WorkerInfo {
  id: string;
  model_ref: string;
  state: string;
  devices: string[];
  memory_mb: Record<string, number>;
  quantization: string | null;
  dtype: string | null;
  layers_loaded: number;
  layers_total: number;
  exit_reason?: string | null;
  kind?: string; // "generate" | "embedding"
  shared?: boolean;
  owner?: string | null; // absent from another user's shared worker (its public view)
  backend?: string; // "openai": an external engine
  load?: number;
  // the worker's last-known load (null until known, and for engines)
  active_sequences?: number | null;
  queue_length?: number | null;
  batch_size?: number | null;
  max_batch_size?: number | null;
  tokens_per_second?: number | null;
}

/** Who reads the feed (its snapshot says): in service mode, owners and admins may share workers. */
export interface Reader {
  serviceMode: boolean;
  name: string | null;
  admin: boolean;
}

/** "3 active · 2 queued · batch 3/8 · 41.2 tok/s": what a worker reports while it works ('' when idle). */
export function loadLine(w: WorkerInfo): string {
  const working = w.state === 'busy' || (w.active_sequences ?? 0) > 0 || (w.queue_length ?? 0) > 0;
  if (!working) {
    return '';
  }
  const parts: string[] = [];
  if (w.active_sequences != null) {
    parts.push(`${w.active_sequences} active`);
  }
  if (w.queue_length != null) {
    parts.push(`${w.queue_length} queued`);
  }
  if (w.batch_size != null) {
    parts.push(`batch ${w.batch_size}/${w.max_batch_size ?? '?'}`);
  }
  if (w.tokens_per_second != null) {
    parts.push(`${w.tokens_per_second.toFixed(1)} tok/s`);
  }
  return parts.join(' · ');
}

/** Whether ``reader`` gets a Share button for ``w``: a shared hive only, its owner or an admin (an engine: admins). */
export function mayShare(reader: Reader, w: WorkerInfo): boolean {
  if (!reader.serviceMode || (w.state !== 'idle' && w.state !== 'busy')) {
    return false;
  }
  if (w.backend === 'openai') {
    return reader.admin;
  }
  return reader.admin || (w.owner != null && w.owner === reader.name);
}

export interface JobSummary {
  id: string;
  kind: string;
  state: string;
  model_ref?: string;
  worker_id?: string;
  bytes_total?: number;
  last_event?: any;
}

// --- small helpers -------------------------------------------------------------------------

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  ...children: Array<Node | string>
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') {
      el.className = v;
    } else {
      el.setAttribute(k, v);
    }
  }
  el.append(...children);
  return el;
}

export function formatBytes(n: number): string {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : n < 10 ? 2 : 1)} ${units[i]}`;
}

function formatSeconds(s: number): string {
  if (!isFinite(s) || s < 0) {
    return '—';
  }
  if (s < 60) {
    return `${Math.ceil(s)} s`;
  }
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** A labelled progress bar (`role="progressbar"`), updated in place. */
class Bar {
  readonly node = h('div', { class: 'rbee-bar', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100' });
  private fill = h('div', { class: 'rbee-bar-fill' });
  constructor(label: string) {
    this.node.setAttribute('aria-label', label);
    this.node.append(this.fill);
  }
  set(fraction: number, state: 'running' | 'ok' | 'error' | 'idle' = 'running'): void {
    const pct = Math.max(0, Math.min(100, Math.round(fraction * 1000) / 10));
    this.fill.style.width = `${pct}%`;
    this.node.setAttribute('aria-valuenow', String(pct));
    this.node.dataset.state = state;
  }
}

/** Rows keyed by id: existing rows are updated in place, so focus and buttons survive updates. */
class KeyedList<T> {
  private rows = new Map<string, { el: HTMLElement; update: (item: T) => void }>();
  constructor(
    readonly node: HTMLElement,
    private make: (item: T) => { el: HTMLElement; update: (item: T) => void },
    private empty: string
  ) {}
  sync(items: Array<[string, T]>): void {
    const keep = new Set(items.map(([k]) => k));
    for (const [k, row] of this.rows) {
      if (!keep.has(k)) {
        row.el.remove();
        this.rows.delete(k);
      }
    }
    let prev: HTMLElement | null = null;
    for (const [k, item] of items) {
      let row = this.rows.get(k);
      if (!row) {
        row = this.make(item);
        row.el.dataset.key = k;
        this.rows.set(k, row);
      }
      row.update(item);
      const want: ChildNode | null = prev ? prev.nextSibling : this.node.firstChild;
      if (want !== row.el) {
        this.node.insertBefore(row.el, want);
      }
      prev = row.el;
    }
    this.node.querySelector(':scope > .rbee-empty')?.remove();
    if (items.length === 0) {
      this.node.append(h('p', { class: 'rbee-empty' }, this.empty));
    }
  }
}

function button(label: string, aria: string, onClick: () => void, cls = ''): HTMLButtonElement {
  const b = h('button', { class: `jp-Button rbee-button ${cls}`.trim(), type: 'button', 'aria-label': aria }, label);
  b.addEventListener('click', onClick);
  return b;
}

/** A section: heading, body and an error line that shows the server's message in place. */
class Section {
  readonly node: HTMLElement;
  readonly body = h('div', { class: 'rbee-section-body' });
  private error = h('div', { class: 'rbee-error', role: 'alert' });
  constructor(id: string, title: string) {
    const heading = h('h3', { id: `rbee-h-${id}`, class: 'rbee-section-title' }, title);
    this.node = h('section', { class: `rbee-section rbee-${id}`, 'aria-labelledby': heading.id }, heading, this.body,
      this.error);
    this.error.hidden = true;
  }
  showError(error: unknown): void {
    this.error.textContent = error instanceof Error ? error.message : String(error);
    this.error.hidden = false;
  }
  clearError(): void {
    this.error.hidden = true;
    this.error.textContent = '';
  }
  /** Run an action; its failure shows here. */
  async run(action: () => Promise<unknown>): Promise<void> {
    this.clearError();
    try {
      await action();
    } catch (error) {
      this.showError(error);
    }
  }
}

// --- the load dialog -----------------------------------------------------------------------

interface LoadChoice {
  device: string;
  quantization: string | null;
  dtype: string | null;
}

class LoadForm extends Widget implements Dialog.IBodyWidget<LoadChoice> {
  private device: HTMLSelectElement;
  private quant: HTMLSelectElement;
  private dtype: HTMLSelectElement;
  constructor(devices: Device[]) {
    super();
    this.addClass('rbee-load-form');
    const select = (name: string, options: Array<[string, string]>) => {
      const s = h('select', { name, class: 'jp-mod-styled' });
      for (const [value, label] of options) {
        s.append(h('option', { value }, label));
      }
      return s;
    };
    this.device = select('device', [['auto', 'auto (fit the free memory)'],
      ...devices.map(d => [d.name, `${d.name} — ${d.label}`] as [string, string])]);
    this.quant = select('quantization', [['', 'none'], ['nf4', 'nf4 (4-bit)'], ['fp4', 'fp4 (4-bit)'],
      ['int8', 'int8 (8-bit)']]);
    this.dtype = select('dtype', [['', 'default'], ['float32', 'float32'], ['bfloat16', 'bfloat16'],
      ['float16', 'float16']]);
    const row = (label: string, control: HTMLElement) => h('label', { class: 'rbee-field' }, label, control);
    this.node.append(row('Device', this.device), row('Quantization', this.quant), row('Dtype', this.dtype));
  }
  getValue(): LoadChoice {
    return { device: this.device.value, quantization: this.quant.value || null, dtype: this.dtype.value || null };
  }
}

// --- the panel -----------------------------------------------------------------------------

const ACTIVE_STATES = new Set(['pending', 'running']);

export class RbeePanel extends Widget {
  devices: Device[] = [];
  models = new Map<string, Model>();
  workers = new Map<string, WorkerInfo>();
  jobs = new Map<string, JobSummary>();
  reader: Reader = { serviceMode: false, name: null, admin: false };
  private feed: SSEConnection | null = null;
  private status = h('div', { class: 'rbee-status', role: 'status', 'aria-live': 'polite' }, 'Connecting…');
  private sections: Record<string, Section> = {};
  private deviceList: KeyedList<Device>;
  private modelList: KeyedList<Model>;
  private downloadList: KeyedList<JobSummary>;
  private workerList: KeyedList<WorkerInfo>;
  private refInput = h('input', { class: 'jp-mod-styled rbee-ref', type: 'text', 'aria-label': 'Model reference to download',
    placeholder: 'hf:org/repo[@revision]' });
  private workerSelect = h('select', { class: 'jp-mod-styled', 'aria-label': 'Worker for the playground' });
  private prompt = h('textarea', { class: 'jp-mod-styled rbee-prompt', rows: '3', 'aria-label': 'Prompt',
    placeholder: 'Once upon a time' });
  private maxTokens = h('input', { class: 'jp-mod-styled rbee-max-tokens', type: 'number', min: '1', value: '64',
    'aria-label': 'Maximum new tokens' });
  private output = h('pre', { class: 'rbee-output', 'aria-live': 'polite', 'aria-label': 'Answer' });
  private stats = h('div', { class: 'rbee-stats' });
  private generateButton: HTMLButtonElement;
  private stopButton: HTMLButtonElement;
  private generation: { conn: SSEConnection; jobId: string | null } | null = null;
  private pending = false;

  constructor() {
    super();
    this.id = 'rbee-panel';
    this.addClass('rbee-panel');
    this.title.caption = 'rbee: models, downloads, workers';
    this.node.tabIndex = -1;
    const header = h('header', { class: 'rbee-header' }, h('h2', {}, 'rbee'), this.status);
    const s = (id: string, title: string) => (this.sections[id] = new Section(id, title));
    const devices = s('devices', 'Devices');
    const models = s('models', 'Models');
    const downloads = s('downloads', 'Downloads');
    const workers = s('workers', 'Workers');
    const playground = s('playground', 'Playground');

    this.deviceList = new KeyedList(h('ul', { class: 'rbee-list', 'aria-label': 'Devices' }), d => this.deviceRow(d),
      'No devices reported yet.');
    devices.body.append(this.deviceList.node);

    this.modelList = new KeyedList(h('ul', { class: 'rbee-list', 'aria-label': 'Downloaded models' }),
      m => this.modelRow(m), 'No models yet: download one below.');
    models.body.append(this.modelList.node);

    const form = h('form', { class: 'rbee-row rbee-download-form' }, this.refInput,
      h('button', { class: 'jp-Button rbee-button jp-mod-accept', type: 'submit', 'aria-label': 'Start download' },
        'Download'));
    form.addEventListener('submit', ev => {
      ev.preventDefault();
      void this.download();
    });
    this.downloadList = new KeyedList(h('ul', { class: 'rbee-list', 'aria-label': 'Downloads' }),
      j => this.downloadRow(j), 'No downloads running.');
    downloads.body.append(form, this.downloadList.node);

    this.workerList = new KeyedList(h('ul', { class: 'rbee-list', 'aria-label': 'Workers' }), w => this.workerRow(w),
      'No workers: load a model from Models.');
    workers.body.append(this.workerList.node);

    this.generateButton = button('Generate', 'Generate an answer', () => void this.generate(), 'jp-mod-accept');
    this.stopButton = button('Stop', 'Stop the generation', () => void this.stop(), 'jp-mod-warn');
    this.stopButton.disabled = true;
    this.prompt.addEventListener('keydown', ev => {
      if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
        ev.preventDefault();
        void this.generate();
      }
    });
    playground.body.append(
      h('label', { class: 'rbee-field' }, 'Worker', this.workerSelect),
      this.prompt,
      h('div', { class: 'rbee-row' }, h('label', { class: 'rbee-field rbee-inline' }, 'Max tokens', this.maxTokens),
        this.generateButton, this.stopButton),
      this.output, this.stats);

    this.node.append(header, ...Object.values(this.sections).map(x => x.node));
    this.render();
  }

  // --- the feed ----------------------------------------------------------------------------

  /** Connect to `v1/events`; the first event (a snapshot) fills the whole panel. */
  connect(): void {
    this.feed?.close();
    this.feed = new SSEConnection(streamRequester('v1/events'), {
      onEvent: data => this.onFeed(data),
      onStatus: (ok, why) => this.setStatus(ok ? 'Live' : `Reconnecting… (${why ?? 'connection lost'})`, ok),
      // the feed only ends when the server shuts down: wait for it to come back
      onDone: () => {
        this.setStatus('Reconnecting… (the server is restarting)', false);
        window.setTimeout(() => this.isDisposed || this.connect(), 1000);
      }
    }, { reconnect: true, delayMs: 500, maxDelayMs: 4000 });
  }

  dispose(): void {
    this.feed?.close();
    this.generation?.conn.close();
    super.dispose();
  }

  private setStatus(text: string, ok: boolean): void {
    this.status.textContent = text;
    this.status.dataset.ok = String(ok);
  }

  onFeed(ev: any): void {
    switch (ev.topic) {
      case 'snapshot':
        this.reader = { serviceMode: !!ev.service_mode, name: ev.user?.name ?? null, admin: !!ev.user?.admin };
        this.devices = ev.devices ?? [];
        this.models = new Map((ev.models ?? []).map((m: Model) => [m.ref, m]));
        this.workers = new Map((ev.workers ?? []).map((w: WorkerInfo) => [w.id, w]));
        // finished downloads stay listed; active jobs come from the snapshot
        for (const [id, job] of this.jobs) {
          if (ACTIVE_STATES.has(job.state)) {
            this.jobs.delete(id);
          }
        }
        for (const job of ev.jobs ?? []) {
          this.jobs.set(job.id, job);
        }
        break;
      case 'devices':
        this.devices = ev.devices ?? [];
        break;
      case 'catalog':
        if (ev.action === 'removed') {
          this.models.delete(ev.model.ref);
        } else {
          this.models.set(ev.model.ref, ev.model);
        }
        break;
      case 'worker':
        if (ev.action === 'stopped' || ev.action === 'removed') {
          this.workers.delete(ev.worker.id);
        } else {
          this.workers.set(ev.worker.id, ev.worker);
        }
        break;
      case 'job':
        if (ev.job.kind === 'download' || ev.job.kind === 'load') {
          this.jobs.set(ev.job.id, ev.job);
        }
        break;
    }
    this.scheduleRender();
  }

  private scheduleRender(): void {
    if (this.pending) {
      return;
    }
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.render();
    });
  }

  render(): void {
    this.deviceList.sync(this.devices.map(d => [d.name, d]));
    this.modelList.sync([...this.models.values()].sort((a, b) => a.ref.localeCompare(b.ref)).map(m => [m.ref, m]));
    const downloads = [...this.jobs.values()].filter(j => j.kind === 'download').slice(-8);
    this.downloadList.sync(downloads.map(j => [j.id, j]));
    this.workerList.sync([...this.workers.values()].map(w => [w.id, w]));
    this.syncWorkerSelect();
  }

  // --- rows --------------------------------------------------------------------------------

  private deviceRow(_: Device) {
    const name = h('span', { class: 'rbee-name' });
    const text = h('span', { class: 'rbee-detail' });
    const bar = new Bar('Memory used');
    const el = h('li', { class: 'rbee-item' }, h('div', { class: 'rbee-row' }, name, text), bar.node);
    return {
      el,
      update: (d: Device) => {
        const used = d.total_bytes - d.free_bytes;
        name.textContent = d.label || d.name;
        text.textContent = `${formatBytes(used)} / ${formatBytes(d.total_bytes)}`;
        bar.node.setAttribute('aria-label', `${d.name} memory used`);
        bar.set(d.total_bytes ? used / d.total_bytes : 0, 'idle');
      }
    };
  }

  private modelRow(m: Model) {
    const name = h('span', { class: 'rbee-name' }, m.ref);
    const text = h('span', { class: 'rbee-detail' });
    const load = button('Load', `Load ${m.ref}`, () => void this.load(m.ref));
    const del = button('Delete', `Delete ${m.ref}`, () => void this.deleteModel(m.ref), 'jp-mod-warn');
    const el = h('li', { class: 'rbee-item' }, h('div', { class: 'rbee-row' }, name),
      h('div', { class: 'rbee-row' }, text, h('span', { class: 'rbee-actions' }, load, del)));
    return {
      el,
      update: (x: Model) => {
        const rev = x.revision ? ` · ${x.revision.slice(0, 8)}` : '';
        text.textContent = `${formatBytes(x.size_bytes)}${rev}`;
      }
    };
  }

  private downloadRow(j: JobSummary) {
    const name = h('span', { class: 'rbee-name' }, j.model_ref ?? j.id);
    const text = h('span', { class: 'rbee-detail' });
    const bar = new Bar(`Download of ${j.model_ref}`);
    const message = h('div', { class: 'rbee-message' });
    const cancel = button('Cancel', `Cancel the download of ${j.model_ref}`, () =>
      void this.sections.downloads.run(() => requestAPI(`v1/models/download/${j.id}`, { method: 'DELETE' })));
    const el = h('li', { class: 'rbee-item' }, h('div', { class: 'rbee-row' }, name,
      h('span', { class: 'rbee-actions' }, cancel)), bar.node, h('div', { class: 'rbee-row' }, text), message);
    return {
      el,
      update: (x: JobSummary) => {
        const e = x.last_event ?? {};
        const running = ACTIVE_STATES.has(x.state);
        cancel.hidden = !running;
        el.dataset.state = x.state;
        message.textContent = '';
        if (x.state === 'complete') {
          bar.set(1, 'ok');
          text.textContent = `Done · ${formatBytes(e.size_bytes ?? x.bytes_total ?? 0)}`;
        } else if (x.state === 'error' || x.state === 'cancelled') {
          bar.set(e.bytes_downloaded && e.bytes_total ? e.bytes_downloaded / e.bytes_total : 1, 'error');
          text.textContent = x.state === 'cancelled' ? 'Cancelled' : 'Failed';
          message.textContent = e.message ?? '';
        } else if (e.stage === 'downloading') {
          const total = e.bytes_total || x.bytes_total || 0;
          const done = e.bytes_downloaded ?? 0;
          const bytesPerS = ((e.speed_mbps ?? 0) * 1e6) / 8;
          const eta = bytesPerS > 0 ? (total - done) / bytesPerS : NaN;
          bar.set(total ? done / total : 0);
          text.textContent = `${formatBytes(done)} / ${formatBytes(total)} · ${(bytesPerS / 1e6).toFixed(2)} MB/s · ` +
            `ETA ${formatSeconds(eta)}`;
        } else if (e.stage === 'importing') {
          bar.set(e.fraction ?? 0);
          text.textContent = `Converting GGUF: ${e.step ?? ''}`;
        } else {
          bar.set(0);
          text.textContent = 'Waiting…';
        }
      }
    };
  }

  private workerRow(w: WorkerInfo) {
    const name = h('span', { class: 'rbee-name' }, w.model_ref);
    const state = h('span', { class: 'rbee-badge' });
    const kind = h('span', { class: 'rbee-badge rbee-kind' });
    const shared = h('span', { class: 'rbee-badge rbee-shared', title: 'Every user of this server may use it' },
      'shared');
    const badges = h('span', { class: 'rbee-badges' }, kind, shared, state);
    const load = h('div', { class: 'rbee-detail rbee-load', 'aria-live': 'off' });
    const text = h('span', { class: 'rbee-detail' });
    const layers = h('span', { class: 'rbee-detail rbee-layers' });
    const bar = new Bar(`Loading of ${w.model_ref}`);
    const message = h('div', { class: 'rbee-message' });
    const unload = button('Unload', `Unload ${w.model_ref} (${w.id})`, () =>
      void this.sections.workers.run(() => requestAPI(`v1/workers/${w.id}`, { method: 'DELETE' })), 'jp-mod-warn');
    let current = w;
    const share = button('Share', '', () => void this.share(current));
    const el = h('li', { class: 'rbee-item' }, h('div', { class: 'rbee-row' }, name, badges),
      h('div', { class: 'rbee-row' }, text, h('span', { class: 'rbee-actions' }, share, unload)), load, bar.node, layers,
      message);
    return {
      el,
      update: (x: WorkerInfo) => {
        current = x;
        kind.textContent = x.kind === 'embedding' ? 'embed' : 'generate';
        kind.dataset.kind = x.kind ?? 'generate';
        kind.title = x.kind === 'embedding' ? 'Computes embeddings (openai/v1/embeddings)' : 'Generates text';
        shared.hidden = !x.shared;
        share.hidden = !mayShare(this.reader, x);
        share.textContent = x.shared ? 'Unshare' : 'Share';
        share.setAttribute('aria-label', x.shared ? `Stop sharing ${x.model_ref} (${x.id})`
          : `Share ${x.model_ref} (${x.id}) with every user`);
        const line = loadLine(x);
        load.textContent = line;
        load.hidden = !line;
        state.textContent = x.state;
        state.dataset.state = x.state;
        el.dataset.state = x.state;
        const mem = Object.entries(x.memory_mb ?? {}).map(([d, mb]) => `${d}: ${mb} MB`).join(', ');
        const how = [x.quantization, x.dtype].filter(Boolean).join(', ');
        text.textContent = [x.devices.join(' + ') || '—', mem, how].filter(Boolean).join(' · ');
        const loading = x.state === 'loading';
        bar.node.hidden = !loading;
        layers.hidden = !loading;
        if (loading) {
          bar.set(x.layers_total ? x.layers_loaded / x.layers_total : 0);
          layers.textContent = `Layers ${x.layers_loaded} / ${x.layers_total || '?'}`;
        }
        unload.textContent = loading ? 'Cancel' : 'Unload';
        unload.setAttribute('aria-label', `${loading ? 'Cancel the load of' : 'Unload'} ${x.model_ref} (${x.id})`);
        message.textContent = x.state === 'failed' ? x.exit_reason ?? 'failed' : '';
      }
    };
  }

  private syncWorkerSelect(): void {
    const ready = [...this.workers.values()].filter(w => w.state === 'idle' || w.state === 'busy');
    const current = this.workerSelect.value;
    const want = ready.map(w => `${w.id}|${w.model_ref} (${w.state})`).join('\n');
    if (this.workerSelect.dataset.options === want) {
      return;
    }
    this.workerSelect.dataset.options = want;
    this.workerSelect.replaceChildren(...(ready.length ? ready.map(w =>
      h('option', { value: w.id }, `${w.model_ref} · ${w.id} (${w.state})`)) : [h('option', { value: '' },
      'No ready worker')]));
    if (ready.some(w => w.id === current)) {
      this.workerSelect.value = current;
    }
  }

  // --- actions -----------------------------------------------------------------------------

  async download(): Promise<void> {
    const ref = this.refInput.value.trim();
    await this.sections.downloads.run(async () => {
      const r = await requestAPI<{ download_id: string; model_ref: string }>('v1/models/download', {
        method: 'POST', body: JSON.stringify({ model_ref: ref })
      });
      if (!this.jobs.has(r.download_id)) {
        this.jobs.set(r.download_id, { id: r.download_id, kind: 'download', state: 'pending', model_ref: r.model_ref });
        this.scheduleRender();
      }
      this.refInput.value = '';
    });
  }

  async load(ref: string): Promise<void> {
    const result = await showDialog({
      title: `Load ${ref}`,
      body: new LoadForm(this.devices),
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Load' })]
    });
    if (!result.button.accept || !result.value) {
      return;
    }
    const body = { model_ref: ref, ...result.value };
    await this.sections.models.run(() => requestAPI('v1/workers', { method: 'POST', body: JSON.stringify(body) }));
  }

  /** Share a worker with every user of a shared hive, or stop; the feed confirms it to everyone. */
  async share(w: WorkerInfo): Promise<void> {
    await this.sections.workers.run(async () => {
      const view = await requestAPI<WorkerInfo>(`v1/workers/${w.id}`, {
        method: 'PATCH', body: JSON.stringify({ shared: !w.shared })
      });
      this.workers.set(w.id, { ...(this.workers.get(w.id) ?? w), ...view });
      this.scheduleRender();
    });
  }

  async deleteModel(ref: string): Promise<void> {
    const result = await showDialog({
      title: 'Delete model',
      body: `Delete ${ref} from disk? It has to be downloaded again to be used.`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
    });
    if (result.button.accept) {
      await this.sections.models.run(() => requestAPI(`v1/models?ref=${encodeURIComponent(ref)}`, { method: 'DELETE' }));
    }
  }

  async generate(): Promise<void> {
    const section = this.sections.playground;
    section.clearError();
    const workerId = this.workerSelect.value;
    if (!workerId) {
      section.showError(new RbeeError('Load a model first: no worker is ready.', 0));
      return;
    }
    if (this.generation) {
      return;
    }
    const body = { worker_id: workerId, prompt: this.prompt.value, max_tokens: Number(this.maxTokens.value) || 64 };
    this.output.textContent = '';
    this.stats.textContent = 'Generating…';
    this.generateButton.disabled = true;
    this.stopButton.disabled = false;
    const started = performance.now();
    let tokens = 0;
    const gen = { jobId: null as string | null, conn: null as unknown as SSEConnection };
    gen.conn = new SSEConnection(streamRequester('v1/inference', { method: 'POST', body: JSON.stringify(body) }), {
      onEvent: ev => {
        if (ev.type === 'started') {
          gen.jobId = ev.job_id;
        } else if (ev.type === 'token') {
          tokens += 1;
          this.output.textContent += ev.t;
        } else if (ev.type === 'end') {
          const tps = ev.tokens_per_second ? ` · ${ev.tokens_per_second.toFixed(1)} tok/s` : '';
          this.stats.textContent = `${ev.total_tokens} tokens · ${ev.stop_reason}${tps}`;
        } else if (ev.type === 'error') {
          this.stats.textContent = ev.code === 'CANCELLED' ? 'Stopped' : 'Failed';
          if (ev.code !== 'CANCELLED') {
            section.showError(new Error(ev.message));
          }
        }
      },
      onError: message => {
        this.stats.textContent = 'Failed';
        section.showError(new Error(message));
      }
    });
    this.generation = gen;
    await gen.conn.done;
    if (this.stats.textContent === 'Generating…') {
      const s = (performance.now() - started) / 1000;
      this.stats.textContent = `Stopped · ${tokens} tokens in ${s.toFixed(1)} s`;
    }
    this.generation = null;
    this.generateButton.disabled = false;
    this.stopButton.disabled = true;
  }

  async stop(): Promise<void> {
    const gen = this.generation;
    if (!gen) {
      return;
    }
    if (gen.jobId) {
      await this.sections.playground.run(() => requestAPI(`v1/inference/${gen.jobId}`, { method: 'DELETE' }));
    } else {
      gen.conn.close(); // the server cancels a generation whose client went away
    }
  }
}
