/**
 * A fetch-based Server-Sent Events reader.
 *
 * `EventSource` cannot send headers (no `Authorization`, no `X-XSRFToken`), so the
 * panel reads streams with `fetch` and this parser. `SSEConnection` reconnects after
 * a drop and sends `Last-Event-ID` so the server resumes where the stream broke.
 * This module has no JupyterLab imports, so node's test runner can load it.
 */

/** One event: `id` (when the server sent one) and `data` (the joined `data:` lines). */
export interface SSEMessage {
  id: string | null;
  data: string;
}

/** Incremental parser: feed it text chunks split anywhere; it yields complete events. */
export class SSEParser {
  private buffer = '';
  private dataLines: string[] = [];
  private id: string | null = null;
  /** The id of the last event that carried one (what `Last-Event-ID` should say). */
  lastEventId: string | null = null;

  push(chunk: string): SSEMessage[] {
    this.buffer += chunk;
    const out: SSEMessage[] = [];
    let nl: number;
    while ((nl = this.nextLineEnd()) >= 0) {
      let line = this.buffer.slice(0, nl);
      // a "\r\n" pair counts as one line end
      const skip = this.buffer[nl] === '\r' && this.buffer[nl + 1] === '\n' ? 2 : 1;
      this.buffer = this.buffer.slice(nl + skip);
      if (line.endsWith('\r')) {
        line = line.slice(0, -1);
      }
      const message = this.line(line);
      if (message) {
        out.push(message);
      }
    }
    return out;
  }

  private nextLineEnd(): number {
    const n = this.buffer.indexOf('\n');
    const r = this.buffer.indexOf('\r');
    if (r >= 0 && r === this.buffer.length - 1) {
      // a lone "\r" at the end may be half of "\r\n": wait for more
      return n >= 0 && n < r ? n : -1;
    }
    if (n < 0) {
      return r;
    }
    return r < 0 ? n : Math.min(n, r);
  }

  private line(line: string): SSEMessage | null {
    if (line === '') {
      if (this.dataLines.length === 0) {
        this.id = null;
        return null;
      }
      const message = { id: this.id, data: this.dataLines.join('\n') };
      if (this.id !== null) {
        this.lastEventId = this.id;
      }
      this.dataLines = [];
      this.id = null;
      return message;
    }
    if (line.startsWith(':')) {
      return null; // a comment (": keep-alive")
    }
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) {
      value = value.slice(1);
    }
    if (field === 'data') {
      this.dataLines.push(value);
    } else if (field === 'id' && !value.includes('\0')) {
      this.id = value;
    }
    return null;
  }
}

/** Makes the HTTP request; `headers` carries `Last-Event-ID` on a reconnect. */
export type Requester = (
  headers: Record<string, string>,
  signal: AbortSignal
) => Promise<Response>;

export interface SSEHandlers {
  /** A JSON event (already parsed); `id` is its SSE id. */
  onEvent: (data: any, id: string | null) => void;
  /** `data: [DONE]`: the stream ended normally. */
  onDone?: () => void;
  /** Connected (`true`) or lost, about to retry (`false`, with why). */
  onStatus?: (connected: boolean, reason?: string) => void;
  /** The server answered with an HTTP error (the body's message) and no retry follows. */
  onError?: (message: string, status: number) => void;
}

export interface SSEOptions {
  /** Reconnect after a drop (the feed); off for one-shot streams (inference). */
  reconnect?: boolean;
  /** First wait before a reconnect, doubled each time up to `maxDelayMs`. */
  delayMs?: number;
  maxDelayMs?: number;
  /** Start from this id (e.g. kept over a reload). */
  lastEventId?: string | null;
  /** Injected for tests. */
  sleep?: (ms: number, signal: AbortSignal) => Promise<void>;
}

const sleepFor = (ms: number, signal: AbortSignal): Promise<void> =>
  new Promise(resolve => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => {
      clearTimeout(t);
      resolve();
    });
  });

/** Read an SSE stream, reconnecting with `Last-Event-ID` until `close()` or `[DONE]`. */
export class SSEConnection {
  private controller = new AbortController();
  private parser = new SSEParser();
  readonly done: Promise<void>;
  /** Number of connections made (1 + reconnects). */
  attempts = 0;

  constructor(
    private request: Requester,
    private handlers: SSEHandlers,
    private options: SSEOptions = {}
  ) {
    this.parser.lastEventId = options.lastEventId ?? null;
    this.done = this.run();
  }

  get lastEventId(): string | null {
    return this.parser.lastEventId;
  }

  get closed(): boolean {
    return this.controller.signal.aborted;
  }

  close(): void {
    this.controller.abort();
  }

  private async run(): Promise<void> {
    const signal = this.controller.signal;
    const sleep = this.options.sleep ?? sleepFor;
    const base = this.options.delayMs ?? 500;
    let delay = base;
    while (!signal.aborted) {
      let reason = 'the connection dropped';
      try {
        const ended = await this.once(signal, () => (delay = base));
        if (ended) {
          return;
        }
      } catch (err: any) {
        if (signal.aborted) {
          return;
        }
        if (err instanceof HTTPStatusError && !this.options.reconnect) {
          this.handlers.onError?.(err.message, err.status);
          return;
        }
        reason = err?.message ?? String(err);
      }
      if (!this.options.reconnect || signal.aborted) {
        if (!signal.aborted) {
          this.handlers.onError?.(`The stream broke: ${reason}`, 0);
        }
        return;
      }
      this.handlers.onStatus?.(false, reason);
      await sleep(delay, signal);
      delay = Math.min(delay * 2, this.options.maxDelayMs ?? 8000);
    }
  }

  /** One connection; true when the stream ended for good (`[DONE]`). */
  private async once(signal: AbortSignal, onOpen: () => void): Promise<boolean> {
    const headers: Record<string, string> = { Accept: 'text/event-stream' };
    if (this.parser.lastEventId !== null) {
      headers['Last-Event-ID'] = this.parser.lastEventId;
    }
    this.attempts += 1;
    const response = await this.request(headers, signal);
    if (!response.ok) {
      throw new HTTPStatusError(await errorMessage(response), response.status);
    }
    if (!response.body) {
      throw new Error('the response has no body');
    }
    onOpen();
    this.handlers.onStatus?.(true);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) {
          return false;
        }
        for (const message of this.parser.push(decoder.decode(value, { stream: true }))) {
          if (message.data === '[DONE]') {
            this.handlers.onDone?.();
            this.controller.abort();
            return true;
          }
          let data: any;
          try {
            data = JSON.parse(message.data);
          } catch {
            continue; // not JSON: not ours to show
          }
          this.handlers.onEvent(data, message.id);
        }
      }
    } finally {
      reader.cancel().catch(() => undefined);
    }
  }
}

export class HTTPStatusError extends Error {
  constructor(
    message: string,
    readonly status: number
  ) {
    super(message);
  }
}

/** The server's `{"error": {"message"}}`, or the status line. */
export async function errorMessage(response: Response): Promise<string> {
  try {
    const body = await response.json();
    if (body?.error?.message) {
      return body.error.message;
    }
    if (body?.message) {
      return body.message;
    }
  } catch {
    // not JSON
  }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}
