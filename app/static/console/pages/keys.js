// Keys (tenant admins: their tenant's; the system secret: all): mint (the secret is shown once,
// with a copy button), edit limits, rotate with a grace period, revoke.
import {del, get, patch, post} from '../api.js';
import {attempt, clear, field, h, int, messageArea, money, onSubmit, table, when} from '../dom.js';

const LIMITS = [['rpm_limit', 'Requests per minute'], ['tpm_limit', 'Tokens per minute'],
  ['daily_token_limit', 'Tokens per day'], ['max_concurrent', 'Concurrent requests']];
// The key's response cache (the API's `cache`): null lets the model's setting, else the gateway's default, decide.
const CACHE = [['', 'default (the model decides)', null], ['on', 'on', true], ['off', 'off', false]];
const cacheLabel = (value) => (value === true ? 'on' : value === false ? 'off' : 'default');

export async function render(main, {who}) {
  main.append(h('h1', {}, 'Keys'));
  const page = new KeysPage(main, who);
  await page.load();
}

function keyState(k) {
  if (k.revoked_at) return 'revoked';
  if (k.expires_at && new Date(k.expires_at) <= new Date()) return 'expired';
  return 'active';
}

/** Form fields for a key's settings; values() gives the API body (empty = no limit). */
function keyFields(prefix, current = {}) {
  const inputs = {};
  const num = (name) => {
    inputs[name] = h('input', {type: 'number', id: `${prefix}-${name}`, min: 1, step: 1, inputmode: 'numeric',
      value: current[name] ?? '', placeholder: 'no limit'});
    return inputs[name];
  };
  inputs.budget_usd = h('input', {type: 'text', id: `${prefix}-budget`, inputmode: 'decimal',
    value: current.budget_usd ?? '', placeholder: 'no budget', pattern: '\\d+(\\.\\d+)?'});
  inputs.allowed_models = h('input', {type: 'text', id: `${prefix}-models`,
    value: current.allowed_models ? current.allowed_models.join(', ') : '', placeholder: 'all models'});
  inputs.expires_at = h('input', {type: 'date', id: `${prefix}-expires`,
    value: current.expires_at ? current.expires_at.slice(0, 10) : ''});
  inputs.cache = h('select', {id: `${prefix}-cache`}, CACHE.map(([value, label, v]) =>
    h('option', {value, selected: v === (current.cache ?? null)}, label)));
  const els = [
    h('div', {class: 'row'}, LIMITS.map(([name, label]) => field(label, num(name)))),
    h('div', {class: 'row'}, field('Monthly budget (USD)', inputs.budget_usd),
      field('Allowed models', inputs.allowed_models, 'comma-separated; empty: all'),
      field('Expires (UTC day)', inputs.expires_at, 'empty: never'),
      field('Response cache', inputs.cache, 'repeated requests answered from the cache')),
  ];
  const values = () => {
    const body = {};
    for (const [name] of LIMITS) body[name] = inputs[name].value === '' ? null : Number(inputs[name].value);
    body.budget_usd = inputs.budget_usd.value.trim() || null;
    const models = inputs.allowed_models.value.split(',').map((m) => m.trim()).filter(Boolean);
    body.allowed_models = models.length ? models : null;
    body.expires_at = inputs.expires_at.value ? `${inputs.expires_at.value}T00:00:00Z` : null;
    body.cache = CACHE.find(([value]) => value === inputs.cache.value)[2];
    return body;
  };
  return {els, values, inputs};
}

/** The new secret, once, with a copy button. */
export function secretOnce(title, key) {
  const code = h('code', {id: 'new-secret', class: 'secret'}, key.key);
  const copied = h('span', {class: 'hint', role: 'status'});
  const copy = h('button', {type: 'button', id: 'copy-secret', onclick: async () => {
    try {
      await navigator.clipboard.writeText(key.key);
      copied.textContent = 'Copied.';
    } catch {
      const range = document.createRange();
      range.selectNodeContents(code);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      copied.textContent = 'Selected: press Ctrl+C to copy.';
    }
  }}, 'Copy');
  const box = h('section', {class: 'card secret-box', id: 'secret-box', role: 'alert', tabindex: '-1'},
    h('h2', {}, title),
    h('p', {}, `The secret of "${key.name}" is shown only this once: copy it now. The gateway keeps only its hash.`),
    h('div', {class: 'secret-line'}, code, copy, copied),
    h('button', {type: 'button', class: 'secondary', id: 'dismiss-secret', onclick: () => box.remove()},
      'I have stored it'));
  return box;
}

class KeysPage {
  constructor(main, who) {
    this.who = who;
    this.system = who.role === 'system';
    this.msg = messageArea();
    this.panel = h('div', {id: 'key-panel'});
    this.list = h('div', {id: 'key-list'});
    this.tenantFilter = h('select', {id: 'key-tenant-filter'}, h('option', {value: ''}, 'all tenants'));
    this.tenantFilter.addEventListener('change', () => this.load());
    main.append(this.msg, this.panel,
      h('section', {class: 'card'}, h('h2', {}, this.system ? 'All keys' : `Keys of ${who.tenant}`),
        this.system ? h('div', {class: 'row'}, field('Tenant', this.tenantFilter)) : null, this.list),
      this.mintForm());
    if (this.system) {
      get('/v1/tenants').then((r) => this.tenantFilter.append(
        ...r.data.map((t) => h('option', {value: t.name}, t.name))), (e) => this.msg.error(e));
    }
  }

  mintForm() {
    const name = h('input', {type: 'text', id: 'mint-name', required: true, maxlength: 200});
    const tenant = h('input', {type: 'text', id: 'mint-tenant', maxlength: 200, placeholder: 'default',
      value: this.system ? '' : this.who.tenant, readonly: !this.system});
    const role = h('select', {id: 'mint-role'}, h('option', {value: 'member'}, 'member'),
      h('option', {value: 'admin'}, 'tenant admin'));
    const settings = keyFields('mint');
    const form = h('form', {class: 'card', id: 'mint-form'},
      h('h2', {}, 'Mint a key'),
      h('div', {class: 'row'}, field('Name', name), field('Tenant', tenant,
        this.system ? 'created on first use' : 'your tenant'), field('Role', role)),
      settings.els,
      h('div', {class: 'buttons'}, h('button', {type: 'submit', id: 'mint'}, 'Mint key')));
    onSubmit(form, this.msg, async () => {
      const body = {name: name.value.trim(), role: role.value};
      for (const [k, v] of Object.entries(settings.values())) if (v !== null) body[k] = v;
      if (this.system && tenant.value.trim()) body.tenant = tenant.value.trim();
      const key = await post('/v1/api-keys', body);
      this.showSecret('Key minted', key);
      form.reset();
      if (!this.system) tenant.value = this.who.tenant;
      await this.load();
    });
    return form;
  }

  showSecret(title, key) {
    this.msg.show('', '');
    const box = secretOnce(title, key);
    this.panel.replaceChildren(box);
    box.focus();
  }

  async load() {
    await attempt(this.msg, async () => {
      const keys = (await get('/v1/api-keys', {tenant: this.tenantFilter.value})).data;
      this.keys = keys;
      this.list.replaceChildren(table([
        {label: 'Id', value: (k) => String(k.id), class: 'num'},
        {label: 'Name', class: 'wrap', value: (k) => k.name},
        {label: 'Prefix', value: (k) => h('code', {}, `${k.prefix}…`)},
        {label: 'Tenant', class: 'wrap', value: (k) => k.tenant},
        {label: 'Role', value: (k) => k.role},
        {label: 'Limits', value: (k) => LIMITS.map(([n]) => (k[n] === null ? '–' : int(k[n]))).join(' / ')},
        {label: 'Budget', value: (k) => (k.budget_usd === null ? 'none' : money(k.budget_usd))},
        {label: 'Expires', value: (k) => (k.expires_at ? when(k.expires_at) : 'never')},
        {label: 'Cache', value: (k) => cacheLabel(k.cache)},
        {label: 'State', value: (k) => h('span', {class: `status status-${keyState(k) === 'active' ? 'ok' : 'bad'}`},
          keyState(k) + (k.previous_key_expires_at ? ' (old secret until ' + when(k.previous_key_expires_at) + ')' : ''))},
        {label: 'Actions', value: (k) => (k.revoked_at ? '—' : h('div', {class: 'actions'},
          h('button', {type: 'button', class: 'secondary small', 'data-action': 'edit', 'aria-label': `Edit ${k.name}`,
            onclick: () => this.edit(k)}, 'Edit'),
          h('button', {type: 'button', class: 'secondary small', 'data-action': 'rotate', 'aria-label': `Rotate ${k.name}`,
            onclick: () => this.rotate(k)}, 'Rotate'),
          h('button', {type: 'button', class: 'danger small', 'data-action': 'revoke', 'aria-label': `Revoke ${k.name}`,
            onclick: (e) => this.revoke(k, e.currentTarget)}, 'Revoke')))},
      ], keys, {caption: 'Keys (never their secrets)', empty: 'No keys yet.',
        rowAttrs: (k) => ({'data-key-id': k.id})}));
    });
  }

  edit(key) {
    const name = h('input', {type: 'text', id: 'edit-name', required: true, maxlength: 200, value: key.name});
    const settings = keyFields('edit', key);
    const form = h('form', {class: 'card', id: 'edit-form'},
      h('h2', {}, `Edit "${key.name}"`),
      field('Name', name), settings.els,
      h('div', {class: 'buttons'}, h('button', {type: 'submit', id: 'save-key'}, 'Save'),
        h('button', {type: 'button', class: 'secondary', onclick: () => clear(this.panel)}, 'Cancel')));
    onSubmit(form, this.msg, async () => {
      await patch(`/v1/api-keys/${key.id}`, {name: name.value.trim(), ...settings.values()});
      clear(this.panel);
      this.msg.show('info', `Saved "${name.value.trim()}".`);
      await this.load();
    });
    this.panel.replaceChildren(form);
    name.focus();
  }

  rotate(key) {
    const grace = h('input', {type: 'number', id: 'grace', min: 0, max: 2592000, step: 1, value: 3600, required: true});
    const form = h('form', {class: 'card', id: 'rotate-form'},
      h('h2', {}, `Rotate "${key.name}"`),
      h('p', {}, 'A new secret replaces the current one. The old secret keeps working for the grace period ' +
        '(0: it stops now), so clients can switch without an outage.'),
      field('Grace period (seconds)', grace, 'up to 30 days'),
      h('div', {class: 'buttons'}, h('button', {type: 'submit', id: 'confirm-rotate'}, 'Rotate now'),
        h('button', {type: 'button', class: 'secondary', onclick: () => clear(this.panel)}, 'Cancel')));
    onSubmit(form, this.msg, async () => {
      const rotated = await post(`/v1/api-keys/${key.id}/rotate`, {grace_period_s: Number(grace.value)});
      this.showSecret('Key rotated', rotated);
      await this.load();
    });
    this.panel.replaceChildren(form);
    grace.focus();
  }

  async revoke(key, button) {
    if (button.dataset.confirm !== 'yes') {  // a second press confirms (no blocking dialogs)
      button.dataset.confirm = 'yes';
      button.textContent = 'Confirm revoke';
      button.setAttribute('aria-label', `Confirm: revoke ${key.name} for good`);
      return;
    }
    await attempt(this.msg, async () => {
      await del(`/v1/api-keys/${key.id}`);
      this.msg.show('info', `Revoked "${key.name}": its secret no longer works.`);
      await this.load();
    });
  }
}
