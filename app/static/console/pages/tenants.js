// Tenants (system secret): create, suspend or reactivate, budgets and the limits of their keys.
// A tenant admin sees its own tenant, read only (the API allows it no more).
import {get, patch, post} from '../api.js';
import {attempt, clear, field, h, int, messageArea, money, onSubmit, table, when} from '../dom.js';

const LIMITS = [['rpm_limit', 'Requests per minute'], ['tpm_limit', 'Tokens per minute'],
  ['daily_token_limit', 'Tokens per day'], ['max_concurrent', 'Concurrent requests']];

export async function render(main, {who}) {
  main.append(h('h1', {}, 'Tenants'));
  if (who.role !== 'system') {
    const tenant = await get(`/v1/tenants/${who.tenantId}`);
    main.append(h('section', {class: 'card', id: 'own-tenant'}, h('h2', {}, tenant.name),
      h('dl', {class: 'facts'}, facts(tenant).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
      h('p', {class: 'hint'}, 'Only the operator (system secret) changes tenants.')));
    return;
  }
  const page = new TenantsPage(main);
  await page.load();
}

function facts(t) {
  return [['Status', t.status], ['Monthly budget', t.budget_usd === null ? 'none' : money(t.budget_usd)],
    ...LIMITS.map(([n, label]) => [`Key limit: ${label.toLowerCase()}`, t.key_limits[n] === null ? 'none' : int(t.key_limits[n])]),
    ['Active keys', int(t.keys)], ['Created', when(t.created_at)]];
}

function tenantFields(prefix, current = {key_limits: {}}) {
  const budget = h('input', {type: 'text', id: `${prefix}-budget`, inputmode: 'decimal', placeholder: 'no budget',
    value: current.budget_usd ?? '', pattern: '\\d+(\\.\\d+)?'});
  const limits = Object.fromEntries(LIMITS.map(([n]) => [n, h('input', {type: 'number', id: `${prefix}-${n}`, min: 1,
    step: 1, inputmode: 'numeric', placeholder: 'none', value: current.key_limits[n] ?? ''})]));
  return {
    budget: field('Monthly budget (USD)', budget, 'shared by all its keys'),
    els: [h('fieldset', {}, h('legend', {}, 'Limits of its keys (defaults, and the most a tenant admin may give)'),
        h('div', {class: 'row'}, LIMITS.map(([n, label]) => field(label, limits[n]))))],
    values: () => ({budget_usd: budget.value.trim() || null,
      key_limits: Object.fromEntries(LIMITS.map(([n]) => [n, limits[n].value === '' ? null : Number(limits[n].value)]))}),
  };
}

class TenantsPage {
  constructor(main) {
    this.msg = messageArea();
    this.panel = h('div', {id: 'tenant-panel'});
    this.list = h('div', {id: 'tenant-list'});
    main.append(this.msg, this.panel, h('section', {class: 'card'}, h('h2', {}, 'All tenants'), this.list),
      this.createForm());
  }

  createForm() {
    const name = h('input', {type: 'text', id: 'tenant-name', required: true, maxlength: 200});
    const settings = tenantFields('new-tenant');
    const form = h('form', {class: 'card', id: 'tenant-form'}, h('h2', {}, 'Create a tenant'),
      h('div', {class: 'row'}, field('Name', name), settings.budget), settings.els,
      h('div', {class: 'buttons'}, h('button', {type: 'submit', id: 'create-tenant'}, 'Create tenant')));
    onSubmit(form, this.msg, async () => {
      const values = settings.values();
      const body = {name: name.value.trim(), key_limits: Object.fromEntries(
        Object.entries(values.key_limits).filter(([, v]) => v !== null))};
      if (values.budget_usd) body.budget_usd = values.budget_usd;
      const tenant = await post('/v1/tenants', body);
      this.msg.show('info', `Created tenant "${tenant.name}".`);
      form.reset();
      await this.load();
    });
    return form;
  }

  async load() {
    await attempt(this.msg, async () => {
      const tenants = (await get('/v1/tenants')).data;
      this.list.replaceChildren(table([
        {label: 'Id', value: (t) => String(t.id), class: 'num'},
        {label: 'Name', class: 'wrap', value: (t) => t.name},
        {label: 'Status', value: (t) => h('span', {class: `status status-${t.status === 'active' ? 'ok' : 'bad'}`}, t.status)},
        {label: 'Budget', value: (t) => (t.budget_usd === null ? 'none' : money(t.budget_usd))},
        {label: 'Key limits (rpm / tpm / day / concurrent)',
          value: (t) => LIMITS.map(([n]) => (t.key_limits[n] === null ? '–' : int(t.key_limits[n]))).join(' / ')},
        {label: 'Keys', value: (t) => int(t.keys), class: 'num'},
        {label: 'Actions', value: (t) => h('div', {class: 'actions'},
          h('button', {type: 'button', class: 'secondary small', 'data-action': 'edit', 'aria-label': `Edit ${t.name}`,
            onclick: () => this.edit(t)}, 'Edit'),
          h('button', {type: 'button', class: `${t.status === 'active' ? 'danger' : 'secondary'} small`,
            'data-action': t.status === 'active' ? 'suspend' : 'activate',
            'aria-label': `${t.status === 'active' ? 'Suspend' : 'Reactivate'} ${t.name}`,
            onclick: () => this.setStatus(t, t.status === 'active' ? 'suspended' : 'active')},
          t.status === 'active' ? 'Suspend' : 'Reactivate'))},
      ], tenants, {caption: 'Tenants', empty: 'No tenants yet.', rowAttrs: (t) => ({'data-tenant-id': t.id})}));
    });
  }

  edit(tenant) {
    const name = h('input', {type: 'text', id: 'edit-tenant-name', required: true, maxlength: 200, value: tenant.name});
    const settings = tenantFields('edit-tenant', tenant);
    const form = h('form', {class: 'card', id: 'tenant-edit-form'}, h('h2', {}, `Edit "${tenant.name}"`),
      h('div', {class: 'row'}, field('Name', name), settings.budget), settings.els,
      h('div', {class: 'buttons'}, h('button', {type: 'submit', id: 'save-tenant'}, 'Save'),
        h('button', {type: 'button', class: 'secondary', onclick: () => clear(this.panel)}, 'Cancel')));
    onSubmit(form, this.msg, async () => {
      await patch(`/v1/tenants/${tenant.id}`, {name: name.value.trim(), ...settings.values()});
      clear(this.panel);
      this.msg.show('info', `Saved "${name.value.trim()}".`);
      await this.load();
    });
    this.panel.replaceChildren(form);
    name.focus();
  }

  async setStatus(tenant, status) {
    await attempt(this.msg, async () => {
      await patch(`/v1/tenants/${tenant.id}`, {status});
      this.msg.show('info', status === 'suspended'
        ? `Suspended "${tenant.name}": all its keys stop working now.` : `Reactivated "${tenant.name}".`);
      await this.load();
    });
  }
}
