// Providers: what the gateway's workers have seen of every deployment, and uptime probes
// (a real one-token completion per deployment, billed to the signed-in key).
import {get} from '../api.js';
import {field, h, int, messageArea, ms, table, when} from '../dom.js';

export async function render(main, {who}) {
  main.append(h('h1', {}, 'Providers'));
  const msg = messageArea();
  const status = h('div', {id: 'provider-status'});
  const refresh = h('button', {type: 'button', class: 'secondary', id: 'refresh-status'}, 'Refresh');
  main.append(msg, h('section', {class: 'card'}, h('h2', {}, 'Deployments'), h('div', {class: 'toolbar'}, refresh), status));
  const load = async () => {
    try {
      const report = await get('/v1/providers/status');
      status.replaceChildren(h('p', {class: 'hint'}, `${report.workers_reporting} worker(s) reporting.`), table([
        {label: 'Deployment', value: (d) => d.deployment},
        {label: 'Aliases', class: 'wrap', value: (d) => d.aliases.join(', ')},
        {label: 'Status', value: (d) => h('span', {class: `status status-${d.status === 'up' ? 'ok' : d.status === 'unknown' ? 'idle' : 'bad'}`}, d.status)},
        {label: 'Circuit', value: (d) => d.circuit},
        {label: 'Success (recent)', value: (d) => (d.recent_success_ratio === null || d.recent_success_ratio === undefined
          ? '—' : `${Math.round(d.recent_success_ratio * 100)}% of ${int(d.recent_requests)}`), class: 'num'},
        {label: 'p50 latency', value: (d) => ms(d.p50_latency_ms), class: 'num'},
        {label: 'Requests', value: (d) => int(d.requests), class: 'num'},
        {label: 'Failures', value: (d) => int(d.failures), class: 'num'},
        {label: 'Last error', class: 'wrap', value: (d) => (d.last_error ? `${d.last_error} at ${when(d.last_error_at)}` : '—')},
      ], report.data, {caption: 'Deployments seen by the gateway', empty: 'No deployments configured.'}));
    } catch (err) {
      msg.error(err);
    }
  };
  refresh.addEventListener('click', load);
  await load();
  main.append(await probeSection(who));
}

async function probeSection(who) {
  const section = h('section', {class: 'card', id: 'uptime'}, h('h2', {}, 'Uptime probe'));
  if (who.kind !== 'key') {
    section.append(h('p', {class: 'message info'}, 'A probe is a real one-token completion per deployment, billed to a key: ' +
      'sign in with a tenant admin key to probe.'));
    return section;
  }
  const models = (await get('/v1/models')).data.map((m) => m.id);
  const model = h('select', {id: 'probe-model'}, models.map((m) => h('option', {value: m}, m)));
  const result = h('div', {id: 'probe-result'});
  const msg = messageArea();
  const form = h('form', {}, h('p', {class: 'hint'}, 'Sends a one-token streaming completion to each deployment of ' +
    'the model, billed to your key (answers are cached for a few seconds).'),
  h('div', {class: 'row'}, field('Model', model)),
  h('div', {class: 'buttons'}, h('button', {type: 'submit', id: 'probe'}, 'Probe')), msg, result);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    msg.show('info', 'Probing…');
    try {
      const up = await get(`/v1/uptime/${encodeURIComponent(model.value)}`);
      msg.show('', '');
      result.replaceChildren(h('p', {}, `${up.model}: ${up.status}${up.cached ? ' (cached)' : ''}, checked ${when(up.checked_at)}`),
        table([
          {label: 'Provider', value: (d) => d.provider},
          {label: 'Model', value: (d) => d.model},
          {label: 'Status', value: (d) => h('span', {class: `status status-${d.status === 'up' ? 'ok' : 'bad'}`}, d.status)},
          {label: 'First token', value: (d) => ms(d.time_to_first_token_ms), class: 'num'},
          {label: 'Latency', value: (d) => ms(d.latency_ms), class: 'num'},
          {label: 'Error', value: (d) => d.error ?? '—'},
        ], up.deployments, {caption: `Probe of ${up.model}`}));
    } catch (err) {
      msg.error(err);
    }
  });
  section.append(form);
  return section;
}
