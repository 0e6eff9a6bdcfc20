// The browser demo: route with the helper from clients/js (copied next to this file as
// route.js), join the routed shard with the real @multisynq/client (its browser ES module
// bundle, copied as multisynq-client.esm.js), and show the shard's shared message log.
// Query: ?session=<name> (default lobby), &tag=<who> (default random), &namespace=, &region=.
import { Model, View, Session } from './multisynq-client.esm.js';
import { route } from './route.js';

const params = new URLSearchParams(location.search);
const session = params.get('session') || 'lobby';
const tag = params.get('tag') || `tab-${Math.random().toString(36).slice(2, 6)}`;
const $ = id => document.getElementById(id);

// The shared state of one shard: the last 100 messages, in the order the reflector sent them.
class DemoLog extends Model {
    init() {
        this.lines = [];
        this.subscribe(this.sessionId, 'say', this.say);
    }

    say(line) {
        this.lines.push(line);
        if (this.lines.length > 100) this.lines.shift();
        this.publish(this.sessionId, 'changed');
    }
}
DemoLog.register('RefleetDemoLog');

class DemoView extends View {
    constructor(model) {
        super(model);
        this.model = model;
        this.subscribe(this.sessionId, 'changed', this.show);
        this.show();
    }

    show() {
        // textContent only: messages come from other users.
        $('log').replaceChildren(...this.model.lines.map(l => {
            const li = document.createElement('li');
            li.textContent = `${l.from}: ${l.text}`;
            return li;
        }));
    }
}

function setState(text) {
    $('state').textContent = text;
    document.body.dataset.state = text;
}

async function main() {
    $('session').textContent = session;
    setState('routing');
    const options = { endpoint: new URL('/', location.href).href, session };
    if (params.get('namespace')) options.namespace = params.get('namespace');
    if (params.get('region')) options.region = params.get('region');
    const where = await route(options);
    $('shard').textContent = where.shard;
    $('region').textContent = where.region || '—';
    document.body.dataset.shard = where.shard;
    setState('joining');
    const joined = await Session.join({
        appId: 'io.refleet.demo',
        name: session,
        password: 'refleet-demo',
        model: DemoLog,
        view: DemoView,
        // Stepped here rather than on animation frames, which hidden tabs stop.
        step: 'manual',
        autoSleep: false,
        // The route's reflector (with its join token), files URL, shard name and appId.
        ...where,
    });
    setInterval(() => joined.step(performance.now()), 20);
    setState('joined');
    const form = $('say');
    form.querySelector('button').disabled = false;
    form.addEventListener('submit', e => {
        e.preventDefault();
        const text = $('text').value.trim();
        if (!text) return;
        joined.view.publish(joined.id, 'say', { from: tag, text });
        $('text').value = '';
    });
}

main().catch(err => {
    console.error(err);
    setState('failed');
    $('error').textContent = `${err.code ? `${err.code}: ` : ''}${err.message}`;
});
