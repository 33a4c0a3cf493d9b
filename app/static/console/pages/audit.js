// Audit log: who changed what, newest first (a tenant admin: its own tenant's entries).
import {get} from '../api.js';
import {field, h, messageArea, table, when} from '../dom.js';

const ACTIONS = ['tenant.create', 'tenant.update', 'key.create', 'key.update', 'key.rotate', 'key.revoke'];
const PAGE_SIZE = 50;

export async function render(main, {who}) {
  main.append(h('h1', {}, 'Audit log'));
  const msg = messageArea();
  const action = h('select', {id: 'audit-action'}, h('option', {value: ''}, 'all actions'),
    ACTIONS.map((a) => h('option', {value: a}, a)));
  const tenant = h('select', {id: 'audit-tenant'}, h('option', {value: ''}, 'all tenants'));
  const list = h('div', {id: 'audit-list'});
  const more = h('div', {class: 'buttons'});
  const form = h('form', {class: 'card filters'}, h('div', {class: 'row'}, field('Action', action),
    who.role === 'system' ? field('Tenant', tenant) : null),
  h('div', {class: 'buttons'}, h('button', {type: 'submit'}, 'Show')));
  main.append(form, msg, h('section', {class: 'card'}, list, more));
  let tenantNames = new Map();
  if (who.role === 'system') {
    const tenants = (await get('/v1/tenants')).data;
    tenantNames = new Map(tenants.map((t) => [t.id, t.name]));
    tenant.append(...tenants.map((t) => h('option', {value: t.name}, t.name)));
  }
  let rows = [];
  const load = async (beforeId) => {
    try {
      const page = await get('/v1/audit', {action: action.value, tenant: tenant.value, before_id: beforeId, limit: PAGE_SIZE});
      rows = beforeId ? rows.concat(page.data) : page.data;
      list.replaceChildren(table([
        {label: 'Time', value: (e) => when(e.created_at)},
        {label: 'Who', class: 'wrap', value: (e) => e.actor.name
          ?? (e.actor.type === 'key' ? `key:${e.actor.api_key_id}` : e.actor.type)},
        {label: 'Action', value: (e) => e.action},
        {label: 'Target', value: (e) => `${e.target.type} #${e.target.id}`},
        {label: 'Tenant', class: 'wrap', value: (e) => tenantNames.get(e.tenant_id) ?? (e.tenant_id === null ? '—' : `#${e.tenant_id}`)},
        {label: 'Details', class: 'details', value: (e) => h('code', {class: 'details'},
          Object.entries(e.details).map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join(', '))},
      ], rows, {caption: 'Audit entries, newest first', empty: 'No entries.'}));
      more.replaceChildren(page.has_more ? h('button', {type: 'button', class: 'secondary', id: 'audit-more',
        onclick: () => load(rows[rows.length - 1].id)}, 'Older entries') : '');
      msg.show('', '');
    } catch (err) {
      msg.error(err);
    }
  };
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    load();
  });
  await load();
}
