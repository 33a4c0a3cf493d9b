// Playground: chat with one model, or the same prompt to two models side by side. Answers
// stream token by token (fetch + ReadableStream); Stop aborts the request (the gateway records
// it as client_disconnected); each answer shows time to first token, tokens and its billed cost.
import {ApiError, authHeaders, get, sseData} from '../api.js';
import {clear, errorText, field, h, int, messageArea, money, ms} from '../dom.js';

const ROW_POLLS = 40;           // the usage row is written just after the answer: look a few times
const ROW_POLL_INTERVAL_MS = 250;

export async function render(main, {who}) {
  main.append(h('h1', {}, 'Playground'));
  if (who.kind === 'secret') {
    main.append(h('p', {class: 'message info', id: 'secret-no-playground'},
      'The system secret manages the gateway but cannot call models: every completion is billed to a key. ' +
      'Mint a key on the Keys page and sign in with it to use the playground.'));
    return;
  }
  const models = (await get('/v1/models')).data.map((m) => m.id);
  if (!models.length) {
    main.append(h('p', {class: 'message info'}, 'This key may use no model that is configured on this gateway.'));
    return;
  }
  new Playground(main, models);
}

function modelSelect(id, models, selected) {
  return h('select', {id, name: id}, models.map((m) => h('option', {value: m, selected: m === selected}, m)));
}

class Playground {
  constructor(main, models) {
    this.models = models;
    this.columns = [];
    this.controller = null;
    this.msg = messageArea();
    this.modelA = modelSelect('model', models, models[0]);
    this.modelB = modelSelect('model-b', models, models[1] || models[0]);
    this.compare = h('input', {type: 'checkbox', id: 'compare'});
    this.system = h('textarea', {id: 'system-prompt', rows: 2, placeholder: 'You are a helpful assistant.'});
    this.temperature = h('input', {type: 'number', id: 'temperature', min: 0, max: 2, step: 0.1,
      placeholder: 'default', inputmode: 'decimal'});
    this.maxTokens = h('input', {type: 'number', id: 'max-tokens', min: 1, step: 1, placeholder: 'model default',
      inputmode: 'numeric'});
    this.prompt = h('textarea', {id: 'prompt', rows: 3, required: true,
      placeholder: 'Ask something… (Ctrl+Enter sends, Esc stops)'});
    this.send = h('button', {type: 'submit', id: 'send'}, 'Send');
    this.stop = h('button', {type: 'button', id: 'stop', class: 'danger', disabled: true,
      onclick: () => this.abort()}, 'Stop');
    this.reset = h('button', {type: 'button', id: 'new-conversation', class: 'secondary',
      onclick: () => this.newConversation()}, 'New conversation');
    this.modelBField = field('Second model', this.modelB);
    this.modelBField.hidden = true;
    this.board = h('div', {class: 'columns', id: 'conversation', 'aria-live': 'off'});

    const settings = h('form', {class: 'card settings', id: 'settings', onsubmit: (e) => e.preventDefault()},
      h('h2', {}, 'Settings'),
      field('Model', this.modelA),
      h('div', {class: 'field checkbox'}, this.compare, h('label', {for: 'compare'}, 'Side by side with a second model')),
      this.modelBField,
      field('System prompt', this.system),
      h('div', {class: 'row'}, field('Temperature', this.temperature, '0 to 2'),
        field('Max tokens', this.maxTokens)));
    const composer = h('form', {class: 'card composer', id: 'composer'},
      field('Message', this.prompt),
      this.msg,
      h('div', {class: 'buttons'}, this.send, this.stop, this.reset));
    composer.addEventListener('submit', (e) => {
      e.preventDefault();
      this.submit();
    });
    this.prompt.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        composer.requestSubmit();
      }
    });
    main.addEventListener('keydown', (e) => {
      if (e.key === 'Escape' && this.controller) this.abort();
    });
    this.compare.addEventListener('change', () => {
      this.modelBField.hidden = !this.compare.checked;
      this.newConversation();
    });
    main.append(h('div', {class: 'playground'}, settings, h('div', {class: 'chat'}, this.board, composer)));
    this.newConversation();
  }

  newConversation() {
    this.abort();
    clear(this.board);
    const count = this.compare.checked ? 2 : 1;
    this.columns = Array.from({length: count}, (_, i) => {
      const title = h('h2', {class: 'column-model'}, '');
      const turns = h('ol', {class: 'turns'});
      const el = h('section', {class: 'column', 'data-column': i, 'aria-label': `Answers ${i + 1}`}, title, turns);
      this.board.append(el);
      return {history: [], title, turns, el};
    });
    this.board.classList.toggle('two', count === 2);
    this.msg.show('', '');
  }

  body(column, model) {
    const messages = [];
    const system = this.system.value.trim();
    if (system) messages.push({role: 'system', content: system});
    messages.push(...column.history);
    const body = {model, messages, stream: true, stream_options: {include_usage: true}};
    if (this.temperature.value !== '') body.temperature = Number(this.temperature.value);
    if (this.maxTokens.value !== '') body.max_tokens = Number(this.maxTokens.value);
    return body;
  }

  async submit() {
    const text = this.prompt.value.trim();
    if (!text || this.controller) return;
    if (this.maxTokens.value !== '' && !(Number.isInteger(Number(this.maxTokens.value)) && Number(this.maxTokens.value) >= 1)) {
      this.msg.show('error', 'Max tokens must be a whole number of at least 1 (or empty for the model\'s default).');
      return;
    }
    this.msg.show('', '');
    this.prompt.value = '';
    this.controller = new AbortController();
    this.setBusy(true);
    const models = [this.modelA.value, this.modelB.value].slice(0, this.columns.length);
    await Promise.all(this.columns.map((column, i) => {
      column.title.textContent = models[i];
      column.history.push({role: 'user', content: text});
      return this.answer(column, models[i], text, this.controller.signal);
    }));
    this.controller = null;
    this.setBusy(false);
    this.prompt.focus();
  }

  abort() {
    if (this.controller) this.controller.abort();
  }

  setBusy(busy) {
    this.send.disabled = busy;
    this.stop.disabled = !busy;
    this.board.setAttribute('aria-busy', busy ? 'true' : 'false');
  }

  async answer(column, model, text, signal) {
    const answer = h('div', {class: 'answer', 'aria-live': 'polite'});
    const status = h('span', {class: 'answer-status'}, 'waiting for the first token…');
    const metrics = new Metrics();
    const turn = h('li', {class: 'turn'},
      h('div', {class: 'bubble user'}, h('span', {class: 'visually-hidden'}, 'You: '), text),
      h('div', {class: 'bubble assistant'}, h('div', {class: 'answer-head'}, h('span', {class: 'model-name'}, model), status),
        answer, metrics.el));
    column.turns.append(turn);
    turn.scrollIntoView({block: 'nearest'});
    const started = performance.now();
    let requestId = null;
    let outcome = 'done';
    let finish = null;
    try {
      const resp = await fetch('/v1/chat/completions', {
        method: 'POST', signal, body: JSON.stringify(this.body(column, model)),
        headers: {...authHeaders(), 'Content-Type': 'application/json'},
      });
      requestId = resp.headers.get('X-Request-ID');
      if (!resp.ok) {
        let envelope = null;
        try {
          envelope = await resp.json();
        } catch { /* not JSON */ }
        throw new ApiError(resp.status, envelope, resp.statusText);
      }
      for await (const data of sseData(resp)) {
        if (data === '[DONE]') break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(502, chunk, 'the provider failed mid-answer');
        const choice = chunk.choices && chunk.choices[0];
        const piece = choice && choice.delta ? choice.delta.content : null;
        if (choice && choice.finish_reason) finish = choice.finish_reason;
        if (piece) {
          if (metrics.ttft === null) {
            metrics.set('ttft', ms(Math.round(performance.now() - started)));
            metrics.ttft = true;
            status.textContent = 'streaming…';
          }
          answer.textContent += piece;
        }
        if (chunk.usage) {
          metrics.set('tokens-in', int(chunk.usage.prompt_tokens));
          metrics.set('tokens-out', int(chunk.usage.completion_tokens));
        }
      }
      status.textContent = finish === 'length' ? 'done (max tokens reached)' : 'done';
    } catch (err) {
      if (err.name === 'AbortError') {
        outcome = 'stopped';
        status.textContent = 'stopped';
      } else {
        outcome = 'error';
        status.textContent = 'failed';
        answer.append(h('p', {class: 'message error', role: 'alert'}, errorText(err)));
      }
    }
    metrics.set('time', ms(Math.round(performance.now() - started)));
    turn.dataset.outcome = outcome;
    if (answer.firstChild && answer.firstChild.nodeType === Node.TEXT_NODE && answer.textContent) {
      column.history.push({role: 'assistant', content: answer.firstChild.textContent});
    } else {
      column.history.pop();  // nothing came back: the next turn does not carry this question
    }
    if (requestId) this.billed(requestId, metrics, status);
  }

  /** The cost as billed: the request's usage row (written just after the answer). */
  async billed(requestId, metrics, status) {
    metrics.set('cost', 'recording…');
    for (let i = 0; i < ROW_POLLS; i++) {
      try {
        const rows = (await get('/v1/requests', {request_id: requestId, limit: 1})).data;
        if (rows.length) {
          const row = rows[0];
          metrics.set('cost', money(row.cost_usd));
          metrics.set('tokens-in', int(row.prompt_tokens));
          metrics.set('tokens-out', int(row.completion_tokens));
          if (row.status !== 'ok') status.textContent = `${status.textContent} (recorded as ${row.status})`;
          return;
        }
      } catch (err) {
        metrics.set('cost', errorText(err));
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, ROW_POLL_INTERVAL_MS));
    }
    metrics.set('cost', 'not recorded yet: see the Usage page');
  }
}

class Metrics {
  constructor() {
    this.ttft = null;
    this.values = {};
    const item = (key, label) => {
      this.values[key] = h('dd', {'data-metric': key}, '—');
      return [h('dt', {}, label), this.values[key]];
    };
    this.el = h('dl', {class: 'metrics'}, item('ttft', 'First token'), item('tokens-in', 'Tokens in'),
      item('tokens-out', 'Tokens out'), item('cost', 'Cost'), item('time', 'Total'));
  }

  set(key, text) {
    this.values[key].textContent = text;
  }
}
