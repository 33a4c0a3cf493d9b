// The console's entry point: who is signed in, the navigation their role allows, and the page
// the URL names (/ui/<page>). Every page is a module under pages/ with render(main, ctx).
import {ApiError, forgetSession, get, saveSession, session} from './api.js';
import {clear, errorText, field, h, messageArea} from './dom.js';

const ALL = ['member', 'admin', 'system'];
const KEYS = ['member', 'admin'];
const ADMINS = ['admin', 'system'];

export const PAGES = [
  {path: 'playground', label: 'Playground', roles: ALL, module: './pages/playground.js'},
  {path: 'key', label: 'My key', roles: KEYS, module: './pages/my_key.js'},
  {path: 'usage', label: 'Usage', roles: ALL, module: './pages/usage.js'},
  {path: 'metrics', label: 'Metrics', roles: ALL, module: './pages/metrics.js'},
  {path: 'admin/keys', label: 'Keys', roles: ADMINS, module: './pages/keys.js'},
  {path: 'admin/tenants', label: 'Tenants', roles: ADMINS, module: './pages/tenants.js'},
  {path: 'admin/audit', label: 'Audit log', roles: ADMINS, module: './pages/audit.js'},
  {path: 'admin/providers', label: 'Providers', roles: ADMINS, module: './pages/providers.js'},
];

const ROLE_NAMES = {member: 'member key', admin: 'tenant admin key', system: 'system secret'};

function currentPath() {
  return location.pathname.replace(/^\/ui\/?/, '').replace(/\/+$/, '');
}

/** Who the credential is: a key describes itself (GET /v1/key); the secret can list tenants. */
async function identify(kind, token) {
  const who = {kind, token};
  if (kind === 'secret') {
    await get('/v1/tenants', null, {who});
    return {...who, role: 'system', label: 'System secret'};
  }
  const key = await get('/v1/key', null, {who});
  return {...who, role: key.role, keyId: key.id, tenant: key.tenant, tenantId: key.tenant_id,
    label: `${key.name} (${key.prefix}…)`};
}

function renderNav(who) {
  const nav = document.getElementById('nav');
  clear(nav);
  if (!who) return;
  const here = currentPath();
  nav.append(h('ul', {}, PAGES.filter((p) => p.roles.includes(who.role)).map((p) => h('li', {},
    h('a', {href: `/ui/${p.path}`, 'aria-current': here === p.path ? 'page' : null}, p.label)))));
  const whoEl = document.getElementById('who');
  clear(whoEl);
  whoEl.append(
    h('span', {class: 'who-name', title: ROLE_NAMES[who.role]}, who.label),
    h('span', {class: 'badge'}, ROLE_NAMES[who.role]),
    h('button', {type: 'button', class: 'secondary small', id: 'sign-out', onclick: () => {
      forgetSession();
      location.assign('/ui/');
    }}, 'Sign out'));
}

function renderSignIn(main, then) {
  const msg = messageArea();
  const token = h('input', {type: 'password', id: 'token', name: 'token', required: true,
    autocomplete: 'off', spellcheck: 'false'});
  const kindKey = h('input', {type: 'radio', name: 'kind', id: 'kind-key', value: 'key', checked: true});
  const kindSecret = h('input', {type: 'radio', name: 'kind', id: 'kind-secret', value: 'secret'});
  const form = h('form', {class: 'card narrow', id: 'sign-in'},
    h('h1', {}, 'Sign in'),
    h('p', {}, 'Paste a gateway API key (member or tenant admin) or the operator\'s system secret. ' +
      'It is kept in this tab\'s session storage only, sent to this gateway as the usual header, ' +
      'and forgotten when you sign out or close the tab.'),
    h('fieldset', {class: 'choice'}, h('legend', {}, 'I have'),
      h('label', {for: 'kind-key'}, kindKey, ' an API key'),
      h('label', {for: 'kind-secret'}, kindSecret, ' the system secret')),
    field('Key or secret', token),
    msg,
    h('button', {type: 'submit'}, 'Sign in'));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    msg.show('info', 'Checking…');
    try {
      const who = await identify(kindSecret.checked ? 'secret' : 'key', token.value.trim());
      saveSession(who);
      msg.show('', '');
      then(who);
    } catch (err) {
      msg.show('error', err instanceof ApiError && err.status === 401
        ? `Not accepted: ${err.message}` : errorText(err));
      token.focus();
    }
  });
  main.append(form);
  token.focus();
}

function defaultPage(who) {
  return who.role === 'system' ? 'usage' : 'playground';
}

async function renderPage(main, who) {
  const path = currentPath();
  if (!path) {
    location.replace(`/ui/${defaultPage(who)}`);
    return;
  }
  const page = PAGES.find((p) => p.path === path);
  if (!page) {
    main.append(h('h1', {}, 'No such page'), h('p', {}, 'Pick a page from the menu.'));
    return;
  }
  document.title = `${page.label} · LLM Gateway console`;
  if (!page.roles.includes(who.role)) {
    main.append(h('h1', {}, page.label), h('p', {class: 'message error', role: 'alert', id: 'not-allowed'},
      `This page is for ${page.roles.map((r) => ROLE_NAMES[r]).join(' or ')} holders; you signed in ` +
      `with a ${ROLE_NAMES[who.role]}. The API refuses these calls to your key too.`));
    return;
  }
  const module = await import(page.module);
  try {
    await module.render(main, {who});
  } catch (err) {
    main.append(h('p', {class: 'message error', role: 'alert'}, errorText(err)));
    if (err instanceof ApiError && err.status === 401) {
      main.append(h('p', {}, 'Your key or secret is no longer accepted: ',
        h('a', {href: '/ui/', id: 'sign-in-again'}, 'sign in again'), '.'));
      forgetSession();
    }
  }
}

/** Render the page; `main[data-ready]` names it once it is drawn (tests wait for it). */
async function show(main, who) {
  delete main.dataset.ready;
  await renderPage(main, who);
  main.dataset.ready = currentPath() || 'home';
}

async function start() {
  const main = document.getElementById('main');
  clear(main);
  const who = session();
  renderNav(who);
  if (!who) {
    renderSignIn(main, (signedIn) => {
      clear(main);
      renderNav(signedIn);
      show(main, signedIn);
    });
    main.dataset.ready = 'sign-in';
    return;
  }
  await show(main, who);
}

start();
