// The console's only way to the gateway: the same JSON API any program uses, with the caller's
// key (Authorization: Bearer) or system secret (X-System-Secret), kept in sessionStorage only.

const STORE = 'llm-gateway-console';

export function session() {
  try {
    return JSON.parse(sessionStorage.getItem(STORE));
  } catch {
    return null;
  }
}

export function saveSession(value) {
  sessionStorage.setItem(STORE, JSON.stringify(value));
}

export function forgetSession() {
  sessionStorage.removeItem(STORE);
}

export function authHeaders(who = session()) {
  if (!who) return {};
  return who.kind === 'secret' ? {'X-System-Secret': who.token} : {Authorization: `Bearer ${who.token}`};
}

const STATUS_WORDS = {
  400: 'Bad request', 401: 'Not signed in', 403: 'Not allowed', 404: 'Not found', 409: 'Conflict',
  413: 'Too large', 429: 'Limit reached', 500: 'Gateway error', 502: 'Provider failed',
  503: 'Unavailable', 504: 'Provider timed out',
};

/** An API error, with `readable`: a sentence for people, from the OpenAI error envelope. */
export class ApiError extends Error {
  constructor(status, envelope, fallback) {
    const err = envelope && envelope.error ? envelope.error : null;
    const message = err && err.message ? err.message : fallback || 'no details';
    super(message);
    this.status = status;
    this.code = err ? err.code : null;
    this.param = err ? err.param : null;
    const word = STATUS_WORDS[status] || (status ? `HTTP ${status}` : 'No answer');
    const param = this.param ? ` (field: ${this.param})` : '';
    this.readable = `${word}: ${message}${param}`;
  }
}

function queryString(query) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== null && v !== undefined && v !== '') params.set(k, v);
  }
  const text = params.toString();
  return text ? `?${text}` : '';
}

/** Fetch as the signed-in caller (or `who`). JSON in and out; errors raise ApiError. */
export async function request(method, path, {body, query, who, signal, raw} = {}) {
  const headers = {...authHeaders(who)};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let resp;
  try {
    resp = await fetch(path + queryString(query), {
      method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, null, `the gateway cannot be reached (${err.message})`);
  }
  if (raw && resp.ok) return resp;
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!resp.ok) throw new ApiError(resp.status, data, text.slice(0, 200));
  return data;
}

export const get = (path, query, opts = {}) => request('GET', path, {...opts, query});
export const post = (path, body, opts = {}) => request('POST', path, {...opts, body});
export const patch = (path, body, opts = {}) => request('PATCH', path, {...opts, body});
export const del = (path, opts = {}) => request('DELETE', path, opts);

/** The `data:` payloads of a server-sent event stream, as they arrive. */
export async function* sseData(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split('\n').filter((l) => l.startsWith('data:'))
        .map((l) => l.slice(5).replace(/^ /, '')).join('\n');
      if (data) yield data;
    }
  }
}

/** Download a CSV answer of the API as a file (the browser cannot send our header on a link). */
export async function downloadCsv(path, query, fallbackName) {
  const resp = await request('GET', path, {query, raw: true});
  const blob = await resp.blob();
  const match = /filename="([^"]+)"/.exec(resp.headers.get('Content-Disposition') || '');
  const link = document.createElement('a');
  link.href = URL.createObjectURL(blob);
  link.download = match ? match[1] : fallbackName;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}
