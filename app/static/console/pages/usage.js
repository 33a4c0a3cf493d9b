// Usage dashboard: spend and tokens per day (charts), breakdowns by model (and by key and
// tenant for admins), CSV downloads, and the latest requests a page at a time. Everything comes
// from /v1/usage and /v1/requests, scoped by the API exactly as for any other caller.
import {downloadCsv, get} from '../api.js';
import {addDays, field, h, int, messageArea, money, ms, table, utcDate, when} from '../dom.js';

const MAX_DAYS = 366;
const PAGE_SIZE = 20;

export async function render(main, {who}) {
  main.append(h('h1', {}, 'Usage'));
  const dash = new Dashboard(main, who);
  await dash.init();
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

class Dashboard {
  constructor(main, who) {
    this.who = who;
    this.admin = who.role !== 'member';
    this.msg = messageArea();
    const today = utcDate();
    this.start = h('input', {type: 'date', id: 'start', value: `${today.slice(0, 8)}01`, required: true});
    this.end = h('input', {type: 'date', id: 'end', value: today, required: true});
    this.model = h('input', {type: 'text', id: 'model-filter', list: 'model-list', placeholder: 'all models'});
    this.modelList = h('datalist', {id: 'model-list'});
    this.keySelect = h('select', {id: 'key-filter'}, h('option', {value: ''}, 'all keys'));
    this.tenantSelect = h('select', {id: 'tenant-filter'}, h('option', {value: ''}, 'all tenants'));
    const form = h('form', {class: 'card filters', id: 'filters'},
      h('div', {class: 'row'}, field('From (UTC day)', this.start), field('To (UTC day, included)', this.end),
        field('Model', this.model), this.modelList,
        this.admin ? field('Key', this.keySelect) : null,
        who.role === 'system' ? field('Tenant', this.tenantSelect) : null),
      h('div', {class: 'buttons'}, h('button', {type: 'submit', id: 'apply'}, 'Show'),
        h('button', {type: 'button', class: 'secondary', id: 'csv-day', onclick: () => this.csv('day')}, 'CSV per day'),
        h('button', {type: 'button', class: 'secondary', id: 'csv-model', onclick: () => this.csv('model')}, 'CSV per model'),
        this.admin ? h('button', {type: 'button', class: 'secondary', id: 'csv-key', onclick: () => this.csv('key')},
          'CSV per key') : null));
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      this.load();
    });
    this.totals = h('dl', {class: 'totals', id: 'totals'});
    this.spendCanvas = h('canvas', {id: 'spend-chart', role: 'img', 'aria-label': 'Spend per day in US dollars (the figures are in the table by day)'});
    this.tokenCanvas = h('canvas', {id: 'tokens-chart', role: 'img', 'aria-label': 'Tokens per day (the figures are in the table by day)'});
    this.breakdowns = h('div', {class: 'breakdowns', id: 'breakdowns'});
    this.requests = h('div', {id: 'requests'});
    this.requestsNav = h('div', {class: 'buttons'});
    main.append(form, this.msg,
      h('section', {class: 'card', 'aria-label': 'Totals'}, this.totals),
      h('div', {class: 'charts'},
        h('section', {class: 'card'}, h('h2', {}, 'Spend per day (USD)'), h('div', {class: 'chart-box'}, this.spendCanvas)),
        h('section', {class: 'card'}, h('h2', {}, 'Tokens per day'), h('div', {class: 'chart-box'}, this.tokenCanvas))),
      this.breakdowns,
      h('section', {class: 'card'}, h('h2', {}, 'Latest requests'), this.requests, this.requestsNav));
    this.charts = {};
  }

  async init() {
    const lookups = [];
    if (this.who.kind === 'key') {
      lookups.push(get('/v1/models').then((r) => this.modelList.replaceChildren(
        ...r.data.map((m) => h('option', {value: m.id}))), () => null));
    }
    if (this.admin) {
      lookups.push(get('/v1/api-keys').then((r) => this.keySelect.append(
        ...r.data.map((k) => h('option', {value: k.id}, `${k.name} (${k.tenant}, ${k.prefix}…)`))), () => null));
    }
    if (this.who.role === 'system') {
      lookups.push(get('/v1/tenants').then((r) => this.tenantSelect.append(
        ...r.data.map((t) => h('option', {value: t.name}, t.name))), () => null));
    }
    await Promise.all(lookups);
    await this.load();
  }

  /** The query of the period and filters, or null (and a message) when they are wrong. */
  query() {
    const start = this.start.value;
    const end = this.end.value;
    if (!start || !end) {
      this.msg.show('error', 'Pick both days of the period.');
      return null;
    }
    if (end < start) {
      this.msg.show('error', 'The last day is before the first day.');
      return null;
    }
    const days = (new Date(`${end}T00:00:00Z`) - new Date(`${start}T00:00:00Z`)) / 86400000 + 1;
    if (days > MAX_DAYS) {
      this.msg.show('error', `Pick at most ${MAX_DAYS} days.`);
      return null;
    }
    return {
      start: `${start}T00:00:00Z`, end: `${addDays(end, 1)}T00:00:00Z`, model: this.model.value.trim(),
      api_key_id: this.admin ? this.keySelect.value : '', tenant: this.who.role === 'system' ? this.tenantSelect.value : '',
    };
  }

  async load() {
    const q = this.query();
    if (!q) return;
    this.msg.show('info', 'Loading…');
    try {
      const groups = ['day', 'model', 'endpoint', ...(this.admin ? ['key'] : []),
        ...(this.who.role === 'system' ? ['tenant'] : [])];
      const [total, ...grouped] = await Promise.all([get('/v1/usage', q),
        ...groups.map((g) => get('/v1/usage', {...q, group_by: g}))]);
      const by = Object.fromEntries(groups.map((g, i) => [g, grouped[i].data]));
      this.showTotals(total);
      this.drawCharts(by.day);
      this.showBreakdowns(by);
      this.cursors = [null];
      await this.loadRequests(q);
      this.msg.show('', '');
      document.getElementById('main').dataset.loaded = String(Date.now());
    } catch (err) {
      this.msg.error(err);
    }
  }

  showTotals(total) {
    const items = [['Requests', int(total.requests), 'requests'], ['Prompt tokens', int(total.prompt_tokens), 'prompt_tokens'],
      ['Completion tokens', int(total.completion_tokens), 'completion_tokens'],
      ['Total tokens', int(total.total_tokens), 'total_tokens'], ['Spend', money(total.cost_usd), 'cost_usd']];
    this.totals.replaceChildren(...items.map(([label, value, key]) => h('div', {class: 'total'},
      h('dt', {}, label), h('dd', {'data-total': key}, value))));
  }

  days() {
    const out = [];
    for (let d = this.start.value; d <= this.end.value; d = addDays(d, 1)) out.push(d);
    return out;
  }

  drawCharts(rows) {
    const labels = this.days();
    const byDay = new Map(rows.map((r) => [r.day, r]));
    const pick = (key) => labels.map((d) => (byDay.has(d) ? Number(byDay.get(d)[key]) : 0));
    const grid = cssVar('--border');
    const text = cssVar('--muted');
    const options = (money) => ({
      animation: false, responsive: true, maintainAspectRatio: false,
      plugins: {legend: {labels: {color: text}}, tooltip: {callbacks: money ? {label: (c) => ` $${c.raw}`} : {}}},
      scales: {x: {stacked: !money, ticks: {color: text, maxRotation: 0, autoSkip: true}, grid: {color: grid}},
        y: {stacked: !money, beginAtZero: true, ticks: {color: text}, grid: {color: grid}}},
    });
    this.chart('spend', this.spendCanvas, {type: 'bar', data: {labels, datasets: [
      {label: 'Spend (USD)', data: pick('cost_usd'), backgroundColor: cssVar('--accent')}]}, options: options(true)});
    this.chart('tokens', this.tokenCanvas, {type: 'bar', data: {labels, datasets: [
      {label: 'Prompt tokens', data: pick('prompt_tokens'), backgroundColor: cssVar('--accent')},
      {label: 'Completion tokens', data: pick('completion_tokens'), backgroundColor: cssVar('--accent-2')}]},
    options: options(false)});
  }

  chart(name, canvas, config) {
    if (this.charts[name]) this.charts[name].destroy();
    if (!window.Chart) {
      canvas.replaceWith(h('p', {class: 'message error'}, 'The chart library did not load.'));
      return;
    }
    this.charts[name] = new window.Chart(canvas, config);
  }

  showBreakdowns(by) {
    const sums = [
      {label: 'Requests', value: (r) => int(r.requests), class: 'num'},
      {label: 'Tokens', value: (r) => int(r.total_tokens), class: 'num'},
      {label: 'Spend', value: (r) => money(r.cost_usd), class: 'num'},
    ];
    const sections = [
      ['By model', 'breakdown-model', [{label: 'Model', value: (r) => r.model}], by.model],
      ['By endpoint', 'breakdown-endpoint', [{label: 'Endpoint', value: (r) => r.endpoint}], by.endpoint],
      ['By key', 'breakdown-key', [{label: 'Key', class: 'wrap', value: (r) => r.api_key_name ?? `#${r.api_key_id}`},
        {label: 'Id', value: (r) => String(r.api_key_id), class: 'num'}], by.key],
      ['By tenant', 'breakdown-tenant', [{label: 'Tenant', class: 'wrap', value: (r) => r.tenant_name ?? `#${r.tenant_id}`}], by.tenant],
      ['By day', 'breakdown-day', [{label: 'Day (UTC)', value: (r) => r.day}], by.day],
    ];
    this.breakdowns.replaceChildren(...sections.filter((s) => s[3]).map(([title, id, first, rows]) =>
      h('section', {class: 'card', id}, h('h2', {}, title),
        table([...first, ...sums], rows, {caption: `Usage ${title.toLowerCase()}`, empty: 'No usage in this period.'}))));
  }

  async loadRequests(q, direction = 0) {
    const index = (this.page || 0) + direction;
    const cursor = this.cursors[index];
    const params = {limit: PAGE_SIZE, start: q.start, end: q.end, model: q.model, api_key_id: q.api_key_id, tenant: q.tenant};
    if (cursor) params.cursor = cursor;
    const page = await get('/v1/requests', params);
    this.page = index;
    this.cursors[index + 1] = page.next_cursor;
    const columns = [
      {label: 'Time', value: (r) => when(r.created_at)},
      ...(this.admin ? [{label: 'Key', class: 'wrap', value: (r) => r.api_key_name ?? `#${r.api_key_id}`}] : []),
      {label: 'Model', value: (r) => r.model},
      {label: 'Endpoint', value: (r) => r.endpoint ?? '—'},
      {label: 'Status', value: (r) => h('span', {class: `status status-${r.status === 'ok' ? 'ok' : 'bad'}`},
        r.error_type ? `${r.status} (${r.error_type})` : r.status)},
      {label: 'Tokens in', value: (r) => int(r.prompt_tokens), class: 'num'},
      {label: 'Tokens out', value: (r) => int(r.completion_tokens), class: 'num'},
      {label: 'Cost', value: (r) => money(r.cost_usd), class: 'num'},
      {label: 'Latency', value: (r) => ms(r.latency_ms), class: 'num'},
      {label: 'First token', value: (r) => ms(r.ttft_ms), class: 'num'},
    ];
    this.requests.replaceChildren(table(columns, page.data, {caption: 'Latest requests, newest first',
      empty: 'No requests in this period.', rowAttrs: (r) => ({'data-request-id': r.request_id})}));
    this.requestsNav.replaceChildren(
      h('button', {type: 'button', class: 'secondary', id: 'newer', disabled: index === 0,
        onclick: () => this.loadRequests(q, -1).catch((e) => this.msg.error(e))}, '← Newer'),
      h('span', {class: 'hint'}, `Page ${index + 1}`),
      h('button', {type: 'button', class: 'secondary', id: 'older', disabled: !page.has_more,
        onclick: () => this.loadRequests(q, 1).catch((e) => this.msg.error(e))}, 'Older →'));
  }

  async csv(groupBy) {
    const q = this.query();
    if (!q) return;
    try {
      await downloadCsv('/v1/usage', {...q, group_by: groupBy, format: 'csv'}, `usage_by_${groupBy}.csv`);
    } catch (err) {
      this.msg.error(err);
    }
  }
}
