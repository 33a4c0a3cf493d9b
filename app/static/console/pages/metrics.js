// Metrics: the gateway's live figures from GET /api/metrics (the same registry as /metrics:
// totals since the gateway started, rates over the last minute and hour, per model and per
// provider, refusals, the response cache and the usage writer). Refreshed every few seconds
// while the tab is visible. Who may read it is the API's rule, not a role: anyone when the
// gateway has no METRICS_TOKEN, else that token or the system secret (a key gets 401).
import {ApiError, get} from '../api.js';
import {errorText, field, h, int, messageArea, money, ms, table, when} from '../dom.js';

export const REFRESH_MS = 5000;

export async function render(main, {who}) {
  main.append(h('h1', {}, 'Metrics'));
  const view = new MetricsView(main, who);
  await view.load();
}

/** Seconds (a float or null) as the console writes durations. */
const seconds = (s) => (s === null || s === undefined ? '—' : ms(Math.round(s * 1000)));

/** requests_per_s of a window as requests per minute, one decimal. */
const perMinute = (rate) => (rate ? (rate.requests_per_s * 60).toFixed(1) : '—');

/** "60 s", or "20 s so far" when the gateway is younger than the window. */
function windowText(rate, nominal) {
  if (!rate) return '—';
  const s = Math.round(rate.window_s);
  return s < nominal ? `${s} s so far` : `${s} s`;
}

const REFUSAL_NAMES = {
  rpm: 'requests per minute', tpm: 'tokens per minute', daily: 'tokens per day', concurrency: 'concurrent requests',
  key_budget: 'key budget', tenant_budget: 'tenant budget', tpm_too_large: 'request above the tokens per minute',
  daily_too_large: 'request above the tokens per day', provider_quota: 'provider quota',
  provider_queue_timeout: 'provider queue timeout', circuit_open: 'open circuit', not_configured: 'not configured',
  limiter_unavailable: 'limiter unavailable (Redis down)',
};

class MetricsView {
  constructor(main, who) {
    this.main = main;
    this.who = who;
    this.credential = null;      // a metrics token typed on this page (memory only), else the sign-in
    this.timer = null;
    this.stopped = false;        // 404 or 401: nothing to refresh until the caller acts
    this.msg = messageArea();
    this.updated = h('span', {class: 'hint', id: 'metrics-updated', 'aria-live': 'polite'});
    this.auto = h('input', {type: 'checkbox', id: 'auto-refresh', checked: true});
    this.refreshButton = h('button', {type: 'button', class: 'secondary', id: 'refresh-metrics',
      onclick: () => this.load()}, 'Refresh');
    this.auto.addEventListener('change', () => this.schedule());
    this.toolbar = h('div', {class: 'toolbar metrics-toolbar'}, this.refreshButton,
      h('div', {class: 'field checkbox'}, this.auto, h('label', {for: 'auto-refresh'}, `Refresh every ${REFRESH_MS / 1000} s`)),
      this.updated);
    this.body = h('div', {id: 'metrics-body'});
    main.append(this.toolbar, this.msg, this.body);
    document.addEventListener('visibilitychange', () => {
      if (!this.alive()) return;
      if (document.visibilityState === 'visible' && this.auto.checked && !this.stopped) this.load();
      else this.schedule();
    });
  }

  alive() {
    return this.main.contains(this.body);
  }

  /** The next refresh: only while auto-refresh is on, the tab is visible and the figures readable. */
  schedule() {
    clearTimeout(this.timer);
    this.timer = null;
    let state = 'on';
    if (this.stopped) state = 'off';
    else if (!this.auto.checked) state = 'off';
    else if (document.visibilityState !== 'visible') state = 'paused';
    this.toolbar.dataset.refresh = state;
    if (state === 'paused') this.updated.textContent = `${this.stamp || ''} Paused while the tab is hidden.`.trim();
    if (state === 'on' && this.alive()) this.timer = setTimeout(() => this.load(), REFRESH_MS);
  }

  async load() {
    clearTimeout(this.timer);
    try {
      const data = await get('/api/metrics', null, this.credential ? {who: this.credential} : {});
      this.stopped = false;
      this.msg.show('', '');
      this.show(data);
      this.stamp = `Updated ${new Date().toISOString().slice(11, 19)} UTC.`;
      this.updated.textContent = this.stamp;
      this.main.dataset.loaded = String(Date.now());
    } catch (err) {
      this.failed(err);
    }
    this.schedule();
  }

  failed(err) {
    if (err instanceof ApiError && err.status === 404) {
      this.stopped = true;
      this.body.replaceChildren();
      this.msg.replaceChildren(h('p', {class: 'message warning', role: 'alert', id: 'metrics-off'},
        'Metrics are turned off on this gateway (METRICS_ENABLED=0): it counts nothing, so there is nothing to show. ' +
        'The usage page still shows what was billed.'));
      return;
    }
    if (err instanceof ApiError && err.status === 401) {
      this.stopped = true;
      this.body.replaceChildren(this.tokenForm(this.credential !== null));
      this.msg.replaceChildren(h('p', {class: 'message error', role: 'alert', id: 'metrics-locked'},
        this.credential !== null
          ? 'That metrics token was not accepted.'
          : `This gateway protects its metrics with a token (METRICS_TOKEN), which your ${this.who.kind === 'secret'
            ? 'secret' : 'key'} does not open. Sign in with the system secret, or enter the metrics token below.`));
      return;
    }
    // Anything else (the gateway unreachable for a moment, a 5xx): say so, keep the last figures
    // and keep trying.
    this.msg.show('error', errorText(err));
  }

  tokenForm(retry) {
    const input = h('input', {type: 'password', id: 'metrics-token', required: true, autocomplete: 'off',
      spellcheck: 'false'});
    const form = h('form', {class: 'card', id: 'metrics-token-form'},
      field('Metrics token', input, 'Used for this page only and kept in its memory: never stored, ' +
        'forgotten when you leave the page.'),
      h('div', {class: 'buttons'}, h('button', {type: 'submit', id: 'use-metrics-token'}, retry ? 'Try again' : 'Show metrics')));
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      this.credential = {kind: 'token', token: input.value.trim()};
      this.load();
    });
    return form;
  }

  show(d) {
    const t = d.totals;
    const totals = [
      ['Requests', int(t.requests), 'requests'], ['Errors', int(t.errors), 'errors'],
      ['Tokens in', int(t.input_tokens), 'input_tokens'], ['Tokens out', int(t.output_tokens), 'output_tokens'],
      ['Cost', money(t.cost_usd), 'cost_usd'], ['Cache hits', int(t.cache.hits), 'cache_hits'],
      ['Saved by the cache', money(t.cache.saved_usd), 'cache_saved_usd'],
    ];
    const rates = [['Last minute', d.last_minute, 60], ['Last hour', d.last_hour, 3600]];
    const outbox = d.usage_writer.outbox_rows;
    this.body.replaceChildren(
      h('section', {class: 'card', 'aria-label': 'Totals'},
        h('p', {class: 'hint', id: 'metrics-since'}, `Since ${when(d.since)} (${d.source}). `,
          `${int(t.ok)} ok, ${int(t.client_disconnected)} client disconnected, ${int(t.refused)} refused after admission; `,
          `cache misses ${int(t.cache.misses)}; average latency ${seconds(t.avg_duration_s)}, first token ${seconds(t.avg_ttft_s)}.`),
        h('dl', {class: 'totals', id: 'metrics-totals'}, totals.map(([label, value, key]) => h('div', {class: 'total'},
          h('dt', {}, label), h('dd', {'data-total': key}, value))))),
      h('section', {class: 'card', id: 'metrics-rates'}, h('h2', {}, 'Rates'), table([
        {label: 'Window', value: ([name]) => name},
        {label: 'Length', value: ([, r, nominal]) => windowText(r, nominal), class: 'num'},
        {label: 'Requests', value: ([, r]) => int(r?.requests), class: 'num'},
        {label: 'Requests/min', value: ([, r]) => perMinute(r), class: 'num'},
        {label: 'Errors', value: ([, r]) => int(r?.errors), class: 'num'},
        {label: 'Tokens in', value: ([, r]) => int(r?.input_tokens), class: 'num'},
        {label: 'Tokens out', value: ([, r]) => int(r?.output_tokens), class: 'num'},
        {label: 'Tokens/s', value: ([, r]) => (r ? String(r.tokens_per_s) : '—'), class: 'num'},
        {label: 'Cost', value: ([, r]) => money(r?.cost_usd), class: 'num'},
      ], rates, {caption: 'Requests per minute over the last minute and the last hour',
        rowAttrs: ([name]) => ({'data-window': name === 'Last minute' ? 'last_minute' : 'last_hour'})})),
      h('section', {class: 'card', id: 'metrics-models'}, h('h2', {}, 'By model'), table([
        {label: 'Model', class: 'wrap', value: (m) => m.name},
        {label: 'Requests', value: (m) => int(m.requests), class: 'num'},
        {label: 'Errors', value: (m) => int(m.errors), class: 'num'},
        {label: 'Tokens in', value: (m) => int(m.input_tokens), class: 'num'},
        {label: 'Tokens out', value: (m) => int(m.output_tokens), class: 'num'},
        {label: 'Cost', value: (m) => money(m.cost_usd), class: 'num'},
        {label: 'Req/min (minute)', value: (m) => perMinute(m.last_minute), class: 'num'},
        {label: 'Req/min (hour)', value: (m) => perMinute(m.last_hour), class: 'num'},
        {label: 'Avg latency', value: (m) => seconds(m.avg_duration_s), class: 'num'},
        {label: 'Avg first token', value: (m) => seconds(m.avg_ttft_s), class: 'num'},
      ], d.models, {caption: 'Per model since the gateway started', empty: 'No requests yet.',
        rowAttrs: (m) => ({'data-model': m.name})})),
      h('section', {class: 'card', id: 'metrics-providers'}, h('h2', {}, 'By provider'), table([
        {label: 'Provider', class: 'wrap', value: (p) => p.name},
        {label: 'Requests', value: (p) => int(p.requests), class: 'num'},
        {label: 'Errors', value: (p) => int(p.errors), class: 'num'},
        {label: 'Tokens in', value: (p) => int(p.input_tokens), class: 'num'},
        {label: 'Tokens out', value: (p) => int(p.output_tokens), class: 'num'},
        {label: 'Req/min (minute)', value: (p) => perMinute(p.last_minute), class: 'num'},
        {label: 'Req/min (hour)', value: (p) => perMinute(p.last_hour), class: 'num'},
        {label: 'Avg latency', value: (p) => seconds(p.avg_duration_s), class: 'num'},
      ], d.providers, {caption: 'Per provider since the gateway started (cost is not split by provider)',
        empty: 'No requests yet.', rowAttrs: (p) => ({'data-provider': p.name})})),
      h('div', {class: 'breakdowns'},
        h('section', {class: 'card', id: 'metrics-refusals'}, h('h2', {}, 'Refusals by kind'), table([
          {label: 'Kind', class: 'wrap', value: ([kind]) => (REFUSAL_NAMES[kind] ? `${kind} (${REFUSAL_NAMES[kind]})` : kind)},
          {label: 'Refused', value: ([, n]) => int(n), class: 'num'},
        ], Object.entries(t.refusals), {caption: 'Requests refused by a limit or by the deployments', empty: 'No refusals.',
          rowAttrs: ([kind]) => ({'data-refusal': kind})})),
        h('section', {class: 'card', id: 'metrics-usage-writer'}, h('h2', {}, 'Usage writer'),
          h('dl', {class: 'facts'},
            h('dt', {}, 'Rows queued in the workers'), h('dd', {'data-writer': 'rows_queued'}, int(d.usage_writer.rows_queued)),
            h('dt', {}, 'Write lag'), h('dd', {'data-writer': 'write_lag_s'}, `${d.usage_writer.write_lag_s} s`),
            h('dt', {}, 'Rows in the Redis outbox'), h('dd', {'data-writer': 'outbox_rows'},
              outbox === null || outbox === undefined ? 'no outbox (no Redis)' : int(outbox)),
            h('dt', {}, 'Bytes in the spool files'), h('dd', {'data-writer': 'spool_bytes'}, int(d.usage_writer.spool_bytes))),
          h('p', {class: 'hint'}, 'Usage rows not yet in PostgreSQL: in the workers\' memory, then the Redis outbox, ' +
            'then (PostgreSQL and Redis both down) the spool files.'))));
  }
}
