import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { errorMessage, Requester } from './sse';

/** An HTTP error from the rbee API, with the server's code and message. */
export class RbeeError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly code?: string
  ) {
    super(message);
  }
}

const settings = (): ServerConnection.ISettings => ServerConnection.makeSettings();

/** `{base_url}rbee/{path}` */
export function apiUrl(path: string, s: ServerConnection.ISettings = settings()): string {
  return URLExt.join(s.baseUrl, 'rbee', path);
}

/**
 * Call the rbee API and return its JSON (or `undefined` for 204).
 *
 * Errors become `RbeeError` carrying the server's `{"error": {"code", "message"}}`.
 */
export async function requestAPI<T = unknown>(path: string, init: RequestInit = {}): Promise<T> {
  const s = settings();
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(apiUrl(path, s), init, s);
  } catch (error) {
    throw new RbeeError(`The server cannot be reached: ${String(error)}`, 0);
  }
  if (!response.ok) {
    let code: string | undefined;
    try {
      code = (await response.clone().json())?.error?.code;
    } catch {
      code = undefined;
    }
    throw new RbeeError(await errorMessage(response), response.status, code);
  }
  if (response.status === 204) {
    return undefined as T;
  }
  const text = await response.text();
  return (text ? JSON.parse(text) : undefined) as T;
}

function cookie(name: string): string | undefined {
  const match = document.cookie.match('\\b' + name + '=([^;]*)\\b');
  return match ? decodeURIComponent(match[1]) : undefined;
}

/**
 * A `Requester` for `SSEConnection`: the page's ServerConnection settings (token, cookies)
 * plus the XSRF token, which JupyterHub wants even on GET for cookie sessions.
 */
export function streamRequester(path: string, init: RequestInit = {}): Requester {
  return (headers, signal) => {
    const s = settings();
    const all = new Headers(init.headers);
    for (const [k, v] of Object.entries(headers)) {
      all.set(k, v);
    }
    if (s.token) {
      all.set('Authorization', `token ${s.token}`);
    }
    const xsrf = cookie('_xsrf');
    if (xsrf) {
      all.set('X-XSRFToken', xsrf);
    }
    if (init.body) {
      all.set('Content-Type', 'application/json');
    }
    const fetchFn = s.fetch; // called unbound: window.fetch refuses another `this`
    return fetchFn(apiUrl(path, s), { ...s.init, ...init, headers: all, signal, cache: 'no-store' });
  };
}
