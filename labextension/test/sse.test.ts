// Unit tests of the SSE reader: `npm test` (node's built-in test runner).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SSEConnection, SSEParser } from '../src/sse';

test('a frame split across chunks anywhere comes out whole', () => {
  const text = 'id: 1\ndata: {"a":1}\n\nid: 2\r\ndata: {"b":\r\ndata: 2}\r\n\r\n';
  for (let cut = 0; cut <= text.length; cut++) {
    const p = new SSEParser();
    const out = [...p.push(text.slice(0, cut)), ...p.push(text.slice(cut))];
    assert.deepEqual(out, [
      { id: '1', data: '{"a":1}' },
      { id: '2', data: '{"b":\n2}' }
    ], `cut at ${cut}`);
    assert.equal(p.lastEventId, '2');
  }
});

test('one character at a time works too', () => {
  const p = new SSEParser();
  const out = [];
  for (const ch of 'data: x\n\ndata:y\n\n') {
    out.push(...p.push(ch));
  }
  assert.deepEqual(out.map(m => m.data), ['x', 'y']);
});

test('comments and empty blocks are ignored; an event without id keeps the last id', () => {
  const p = new SSEParser();
  const out = p.push(': keep-alive\n\nid: 7\ndata: {}\n\n: keep-alive\n\ndata: [DONE]\n\n');
  assert.deepEqual(out, [{ id: '7', data: '{}' }, { id: null, data: '[DONE]' }]);
  assert.equal(p.lastEventId, '7');
});

/** A fake server: each call answers the next script (an array of chunks, or an HTTP status). */
function fakeServer(scripts: Array<string[] | number>) {
  const calls: Array<Record<string, string>> = [];
  const request = async (headers: Record<string, string>) => {
    calls.push(headers);
    const script = scripts.shift();
    if (script === undefined) {
      return new Promise<Response>(() => undefined); // hangs: no more connections expected
    }
    if (typeof script === 'number') {
      return new Response(JSON.stringify({ error: { message: `nope ${script}` } }), { status: script });
    }
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        for (const chunk of script) {
          controller.enqueue(new TextEncoder().encode(chunk));
        }
        controller.close(); // the connection drops after the last chunk
      }
    });
    return new Response(body, { status: 200, headers: { 'Content-Type': 'text/event-stream' } });
  };
  return { request, calls };
}

const noWait = async () => undefined;

test('[DONE] ends the stream and JSON events arrive parsed', async () => {
  const server = fakeServer([['id: 1\ndata: {"n":1}\n\n', 'id: 2\ndata: {"n":2}\n\ndata: [DONE]\n\n']]);
  const seen: any[] = [];
  let done = false;
  const c = new SSEConnection(server.request, { onEvent: d => seen.push(d), onDone: () => (done = true) },
    { reconnect: true, sleep: noWait });
  await c.done;
  assert.deepEqual(seen, [{ n: 1 }, { n: 2 }]);
  assert.ok(done);
  assert.equal(server.calls.length, 1);
});

test('after a drop it reconnects with Last-Event-ID', async () => {
  const server = fakeServer([
    ['id: 1\ndata: {"n":1}\n\nid: 2\ndata: {"n":2}\n\nid: 3\ndata: {"n"'], // dropped mid-event
    [': keep-alive\n\nid: 3\ndata: {"n":3}\n\ndata: [DONE]\n\n']
  ]);
  const seen: any[] = [];
  const status: boolean[] = [];
  const c = new SSEConnection(server.request, { onEvent: d => seen.push(d.n), onStatus: s => status.push(s) },
    { reconnect: true, sleep: noWait });
  await c.done;
  assert.deepEqual(seen, [1, 2, 3]);
  assert.equal(server.calls[0]['Last-Event-ID'], undefined);
  assert.equal(server.calls[1]['Last-Event-ID'], '2');
  assert.deepEqual(status, [true, false, true]);
});

test('a refused connection (server restarting) is retried with backoff', async () => {
  const server = fakeServer([503, 502, ['id: 9\ndata: {"n":9}\n\ndata: [DONE]\n\n']]);
  const waits: number[] = [];
  const seen: any[] = [];
  const c = new SSEConnection(server.request, { onEvent: d => seen.push(d.n) },
    { reconnect: true, delayMs: 100, lastEventId: '4', sleep: async ms => { waits.push(ms); } });
  await c.done;
  assert.deepEqual(seen, [9]);
  assert.deepEqual(waits, [100, 200]);
  assert.ok(server.calls.every(h => h['Last-Event-ID'] === '4'));
});

test('without reconnect an HTTP error reports the server message', async () => {
  const server = fakeServer([409]);
  let error = '';
  const c = new SSEConnection(server.request, { onEvent: () => undefined, onError: m => (error = m) });
  await c.done;
  assert.equal(error, 'nope 409');
});

test('close() stops a waiting connection', async () => {
  const server = fakeServer([]);
  const c = new SSEConnection(server.request, { onEvent: () => undefined }, { reconnect: true });
  c.close();
  assert.ok(c.closed);
});
