// My key: the signed-in key's settings and how much of each limit is left (GET /v1/key).
import {get} from '../api.js';
import {h, int, messageArea, money, ms, orNone, table, when} from '../dom.js';

export async function render(main) {
  main.append(h('h1', {}, 'My key'));
  const msg = messageArea();
  const holder = h('div', {id: 'my-key'});
  const refresh = h('button', {type: 'button', class: 'secondary', id: 'refresh'}, 'Refresh');
  main.append(h('div', {class: 'toolbar'}, refresh), msg, holder);
  const load = async () => {
    try {
      const key = await get('/v1/key');
      holder.replaceChildren(...view(key));
      msg.show('', '');
    } catch (err) {
      msg.error(err);
    }
  };
  refresh.addEventListener('click', load);
  await load();
}

function meter(used, limit) {
  if (limit === null || limit === undefined || used === null || used === undefined) return null;
  return h('meter', {min: 0, max: Number(limit), value: Math.min(Number(used), Number(limit)),
    low: Number(limit) * 0.7, high: Number(limit) * 0.9, optimum: 0, 'aria-label': 'share used'});
}

function view(key) {
  const room = key.headroom;
  const facts = [
    ['Name', key.name], ['Prefix', `${key.prefix}…`], ['Id', key.id], ['Role', key.role],
    ['Tenant', `${key.tenant} (${key.tenant_status})`],
    ['Allowed models', key.allowed_models ? key.allowed_models.join(', ') : 'all models'],
    ['Expires', key.expires_at ? when(key.expires_at) : 'never'],
    ['Created', when(key.created_at)], ['Last used', when(key.last_used_at)],
  ];
  const rpm = room.requests_this_minute;
  const tpm = room.tokens_this_minute;
  const day = room.tokens_today;
  const conc = room.concurrent_requests;
  const budget = room.budget_this_month;
  const tenant = room.tenant_budget_this_month;
  const usedOf = (limit, remaining) => (limit !== null && remaining !== null ? limit - remaining : null);
  const rows = [
    {what: 'Requests this minute', limit: orNone(rpm.limit), used: int(usedOf(rpm.limit, rpm.remaining)),
      left: orNone(rpm.remaining, '—'), resets: rpm.reset_ms ? `full again in ${ms(rpm.reset_ms)}` : 'full',
      meter: meter(usedOf(rpm.limit, rpm.remaining), rpm.limit), id: 'rpm'},
    {what: 'Tokens this minute', limit: orNone(tpm.limit && int(tpm.limit)), used: int(usedOf(tpm.limit, tpm.remaining)),
      left: tpm.remaining === null ? '—' : int(tpm.remaining),
      resets: tpm.reset_ms ? `full again in ${ms(tpm.reset_ms)}` : 'full',
      meter: meter(usedOf(tpm.limit, tpm.remaining), tpm.limit), id: 'tpm'},
    {what: 'Tokens today (UTC)', limit: orNone(day.limit && int(day.limit)), used: int(day.used),
      left: day.remaining === null ? '—' : int(day.remaining), resets: when(day.resets_at),
      meter: meter(day.used, day.limit), id: 'day'},
    {what: 'Concurrent requests', limit: orNone(conc.limit), used: conc.in_use === null ? 'not counted' : int(conc.in_use),
      left: orNone(conc.remaining, '—'), resets: 'when requests end', meter: meter(conc.in_use, conc.limit), id: 'concurrency'},
    {what: 'Budget this month', limit: budget.limit_usd === null ? 'no limit' : money(budget.limit_usd),
      used: money(budget.used_usd), left: budget.remaining_usd === null ? '—' : money(budget.remaining_usd),
      resets: when(budget.resets_at), meter: meter(budget.used_usd, budget.limit_usd), id: 'budget'},
    {what: 'Tenant budget this month', limit: tenant.limit_usd === null ? 'no limit' : money(tenant.limit_usd),
      used: money(tenant.used_usd), left: tenant.remaining_usd === null ? '—' : money(tenant.remaining_usd),
      resets: when(tenant.resets_at), meter: meter(tenant.used_usd, tenant.limit_usd), id: 'tenant-budget'},
  ];
  const out = [
    h('section', {class: 'card'}, h('h2', {}, 'This key'),
      h('dl', {class: 'facts'}, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))]))),
    h('section', {class: 'card'}, h('h2', {}, 'Limits and what is left'),
      table([
        {label: 'Limit', value: (r) => r.what},
        {label: 'Allowed', value: (r) => String(r.limit), class: 'num'},
        {label: 'Used', value: (r) => h('span', {}, String(r.used), r.meter ? ' ' : '', r.meter), class: 'num'},
        {label: 'Left', value: (r) => String(r.left), class: 'num'},
        {label: 'Resets', value: (r) => r.resets},
      ], rows, {caption: 'Limits of this key', rowAttrs: (r) => ({'data-limit': r.id})}),
      room.limiter_available ? null : h('p', {class: 'message warning'},
        'The rate limiter (Redis) does not answer: minute figures are unknown, day and month figures come from the usage records.'),
      h('p', {class: 'hint'}, 'Day and month figures include requests still running (their reservation). ' +
        'Without a concurrency limit the gateway does not count running requests.')),
  ];
  return out;
}
