// DOM helpers of the console. Every piece of data reaches the page as text (text nodes,
// textContent, attribute values): nothing here parses HTML, so a key or tenant named
// "<script>..." is shown as those characters and never runs.

const FORBIDDEN_ATTRIBUTES = /^(style|on.*|srcdoc)$/i;

/** h('tag', {attr: value, class, text, onclick: fn}, ...children) -> an element. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === 'class') el.className = value;
    else if (name === 'text') el.textContent = String(value);
    else if (name.startsWith('on') && typeof value === 'function') el.addEventListener(name.slice(2), value);
    else if (name === 'dataset') Object.assign(el.dataset, value);
    else if (FORBIDDEN_ATTRIBUTES.test(name)) throw new Error(`h(): attribute ${name} is not allowed`);
    else el.setAttribute(name, value === true ? '' : String(value));
  }
  append(el, ...children);
  return el;
}

/** Append children (elements, strings as text nodes, arrays; null/false skipped). */
export function append(el, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

let ids = 0;
/** A labelled form field: {label, input, hint}; the label points at the input. */
export function field(label, input, hint) {
  if (!input.id) input.id = `f${++ids}`;
  const parts = [h('label', {for: input.id}, label), input];
  if (hint) {
    const hintEl = h('small', {class: 'hint', id: `${input.id}-hint`}, hint);
    input.setAttribute('aria-describedby', hintEl.id);
    parts.push(hintEl);
  }
  return h('div', {class: 'field'}, parts);
}

/** A message area; show(kind, text) replaces its content ('error' is announced at once). */
export function messageArea() {
  const el = h('div', {class: 'messages'});
  el.show = (kind, text) => {
    clear(el);
    if (!text) return;
    el.append(h('p', {class: `message ${kind}`, role: kind === 'error' ? 'alert' : 'status'}, text));
  };
  el.error = (err) => el.show('error', errorText(err));
  return el;
}

export function errorText(err) {
  if (err && err.readable) return err.readable;
  return `Something went wrong: ${err && err.message ? err.message : err}`;
}

/** A table: columns = [{label, value: row => text|Node, class}], rows = array. */
export function table(columns, rows, {caption, empty = 'Nothing yet.', rowAttrs} = {}) {
  const head = h('thead', {}, h('tr', {}, columns.map((c) => h('th', {scope: 'col', class: c.class}, c.label))));
  const body = h('tbody', {}, rows.length ? rows.map((row) => h('tr', rowAttrs ? rowAttrs(row) : {},
    columns.map((c) => h('td', {class: c.class, 'data-label': c.label}, c.value(row))))) :
    h('tr', {}, h('td', {colspan: columns.length, class: 'empty'}, empty)));
  return h('div', {class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': caption || 'table'},
    h('table', {}, caption ? h('caption', {}, caption) : null, head, body));
}

// --- formatting (money stays the API's exact decimal string) ---------------------------------

export const money = (usd) => (usd === null || usd === undefined ? '—' : `$${usd}`);
export const int = (n) => (n === null || n === undefined ? '—' : Number(n).toLocaleString('en-US'));
export const ms = (n) => (n === null || n === undefined ? '—' : n < 1000 ? `${n} ms` : `${(n / 1000).toFixed(2)} s`);
export const orNone = (v, none = 'no limit') => (v === null || v === undefined ? none : v);

/** "2026-10-05T12:04:00.000Z" -> "2026-10-05 12:04:00 UTC". */
export function when(iso) {
  if (!iso) return '—';
  return iso.replace('T', ' ').replace(/(\.\d+)?Z$/, ' UTC');
}

/** Today's date (UTC) as YYYY-MM-DD, and date arithmetic on such strings. */
export function utcDate(date = new Date()) {
  return date.toISOString().slice(0, 10);
}

export function addDays(day, n) {
  const d = new Date(`${day}T00:00:00Z`);
  d.setUTCDate(d.getUTCDate() + n);
  return utcDate(d);
}

/** Run `action` on the form's submit (no page reload); an error it throws is shown in `msg`. */
export function onSubmit(form, msg, action) {
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    await attempt(msg, action);
  });
  return form;
}

/** Run `action`; an error it throws is shown in `msg`. */
export async function attempt(msg, action) {
  try {
    await action();
  } catch (err) {
    msg.error(err);
  }
}
