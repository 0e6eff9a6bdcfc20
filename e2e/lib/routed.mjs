// Driving real clients that join through Refleet's router (fixtures/routed-participant.cjs), and
// watching reflectors while they do.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { E2E_DIR, LogTail, sleep, withTimeout } from './util.mjs';

const SCRIPT = path.join(E2E_DIR, 'fixtures', 'routed-participant.cjs');

// Every routed participant still running, killed if the test process exits.
const running = new Set();
process.on('exit', () => {
    for (const proc of running) {
        try { proc.kill('SIGKILL'); } catch { /* already gone */ }
    }
});

/** The final close a refused client saw (`code` 4103, 4105, …). */
export class Refused extends Error {
    constructor(tag, code, message) {
        super(`participant ${tag} was refused with close ${code} (${message})`);
        this.code = code;
        this.reason = message;
    }
}

/**
 * One client process. options: tag, and either route (endpoint), session, namespace, region,
 * userId — or reflector, files, name (a direct join, e.g. with a bad token) — and appId, env.
 * Has the same shape as participant.mjs's Participant (tag, proc, stderr, lines, exited,
 * kill), so the harness cleans it up and saves its logs when it is in `h.participants`.
 */
export class RoutedParticipant {
    constructor(options) {
        this.options = options;
        this.tag = options.tag;
        this.stderr = new LogTail();
        this.lines = [];
        this.pending = new Map();
        this.nextId = 1;
        this.final = null;
        this.route = null;
        this.closed = null;
        this.exitStatus = null;
        const env = {
            ...process.env,
            E2E_TAG: options.tag,
            E2E_SESSION: options.session ?? options.name ?? '',
            ...(options.route ? { E2E_ROUTE: options.route } : {}),
            ...(options.namespace ? { E2E_NAMESPACE: options.namespace } : {}),
            ...(options.region ? { E2E_REGION: options.region } : {}),
            ...(options.userId ? { E2E_USER_ID: options.userId } : {}),
            ...(options.reflector ? { E2E_REFLECTOR: options.reflector } : {}),
            ...(options.files ? { E2E_FILES: options.files } : {}),
            ...(options.appId ? { E2E_APP_ID: options.appId } : {}),
            ...options.env,
        };
        this.proc = spawn(process.execPath, [SCRIPT], { cwd: E2E_DIR, env, stdio: ['pipe', 'pipe', 'pipe'] });
        running.add(this.proc);
        this.proc.stdin.on('error', () => {});
        this.proc.stderr.on('data', d => this.stderr.push(d));
        let buffered = '';
        this.proc.stdout.on('data', chunk => {
            buffered += chunk.toString();
            let nl;
            while ((nl = buffered.indexOf('\n')) >= 0) {
                const line = buffered.slice(0, nl);
                buffered = buffered.slice(nl + 1);
                this.onLine(line);
            }
        });
        // Settles with the joined state, or rejects with Refused / the failure.
        this.outcome = new Promise((resolve, reject) => {
            this.resolveOutcome = resolve;
            this.rejectOutcome = reject;
        });
        this.outcome.catch(() => {});
        this.routed = new Promise((resolve, reject) => {
            this.resolveRouted = resolve;
            this.rejectRouted = reject;
        });
        this.routed.catch(() => {});
        this.exited = new Promise(resolve => {
            this.proc.on('exit', (code, signal) => {
                running.delete(this.proc);
                this.exitStatus = { code, signal };
                const err = new Error(`participant ${this.tag} exited (${JSON.stringify(this.exitStatus)}); stderr:\n${this.stderr.tail()}`);
                this.rejectOutcome(err);
                this.rejectRouted(err);
                for (const p of this.pending.values()) p.reject(err);
                this.pending.clear();
                resolve(this.exitStatus);
            });
        });
    }

    get running() { return this.exitStatus === null; }

    onLine(line) {
        if (!line.trim()) return;
        let msg;
        try {
            msg = JSON.parse(line);
        } catch {
            this.stderr.push(`[harness] non-JSON stdout line: ${line}\n`);
            return;
        }
        this.lines.push(msg);
        if (msg.type === 'routed') {
            this.route = msg.route;
            this.resolveRouted(msg.route);
        } else if (msg.type === 'joined') {
            this.resolveOutcome(msg.state);
        } else if (msg.type === 'closed') {
            this.closed = msg;
            this.rejectOutcome(new Refused(this.tag, msg.code, msg.message));
        } else if (msg.type === 'fatal') {
            const err = new Error(`participant ${this.tag} failed: ${msg.error}`);
            Object.assign(err, { code: msg.code, status: msg.status });
            this.rejectRouted(err);
            this.rejectOutcome(err);
        } else if (msg.type === 'final') {
            this.final = msg.state;
        } else if (msg.type === 'reply') {
            const p = this.pending.get(msg.id);
            if (!p) return;
            this.pending.delete(msg.id);
            if (msg.error) p.reject(new Error(`participant ${this.tag} ${p.cmd}: ${msg.error}`));
            else p.resolve(msg);
        }
    }

    /** The joined state; throws Refused when the reflector refused the join. */
    async waitJoined(timeout = 30000) {
        return withTimeout(this.outcome, timeout, `participant ${this.tag} to join; stderr:\n${this.stderr.tail(2000)}`);
    }

    /** The Refused close of a join that must fail; throws if it joined instead. */
    async waitRefused(timeout = 20000) {
        try {
            const state = await this.waitJoined(timeout);
            throw new Error(`participant ${this.tag} joined ${state.name} but should have been refused`);
        } catch (err) {
            if (err instanceof Refused) return err;
            throw err;
        }
    }

    request(cmd, args = {}, timeout = 30000) {
        if (!this.running) return Promise.reject(new Error(`participant ${this.tag} is not running`));
        const id = this.nextId++;
        const reply = new Promise((resolve, reject) => this.pending.set(id, { resolve, reject, cmd }));
        this.proc.stdin.write(JSON.stringify({ id, cmd, ...args }) + '\n');
        return withTimeout(reply, timeout, `participant ${this.tag} to answer ${cmd}`).finally(() => this.pending.delete(id));
    }

    async state() { return (await this.request('state')).state; }

    async send(count, gap = 0) { return (await this.request('send', { count, gap }, 60000 + count * gap)).sent; }

    async waitForCount(count, timeout = 30000) {
        const reply = await this.request('wait', { count, timeout }, timeout + 10000);
        if (!reply.ok) throw new Error(`participant ${this.tag} has ${reply.state.count} log entries after ${timeout} ms, expected ${count}`);
        return reply.state;
    }

    /** Leaves, reports the final state and exits. */
    async exit(timeout = 20000) {
        if (!this.running) throw new Error(`participant ${this.tag} is not running`);
        this.proc.stdin.write(JSON.stringify({ id: this.nextId++, cmd: 'exit' }) + '\n');
        await withTimeout(this.exited, timeout, `participant ${this.tag} to exit`);
        if (!this.final) throw new Error(`participant ${this.tag} exited without a final state; stderr:\n${this.stderr.tail()}`);
        return this.final;
    }

    async kill() {
        if (!this.running) return;
        this.proc.kill('SIGKILL');
        await withTimeout(this.exited, 10000, `participant ${this.tag} to die`);
    }
}

/** Starts a routed participant tracked by harness `h` (killed and logged with the test). */
export function routedParticipant(h, options) {
    const p = new RoutedParticipant(options);
    h.participants.push(p);
    return p;
}

/** One reflector's counter `name{reason="…"}` (or without labels) from its /metrics. */
export async function reflectorCounter(baseUrl, name, labels = {}) {
    const res = await fetch(new URL('metrics', baseUrl));
    if (!res.ok) throw new Error(`GET ${baseUrl}metrics: ${res.status}`);
    const text = await res.text();
    const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`).sort().join(',');
    for (const line of text.split('\n')) {
        const m = /^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)/.exec(line);
        if (!m || m[1] !== name) continue;
        const got = (m[2] || '').split(',').filter(Boolean).sort().join(',');
        if (got === want) return Number(m[3]);
    }
    throw new Error(`${name}{${want}} not found in ${baseUrl}metrics`);
}

/** The shard name of a `/sessions` entry, whose `name` is the JOIN's `<appId>/<name>`. */
export function shardName(entry) {
    const { name, appId } = entry;
    if (!name) return null;
    return appId && name.startsWith(`${appId}/`) ? name.slice(appId.length + 1) : name;
}

/**
 * Polls `/sessions` of every reflector `reflectorUrls()` names (looked up again every 500 ms;
 * may be async), every `interval` ms, until stop(): per shard name, the highest user count seen
 * at once (summed over reflectors and sessionIds of one name), the number of polls and failures.
 */
export function watchShardUsers(reflectorUrls, { interval = 25 } = {}) {
    const peaks = new Map();
    let polls = 0;
    let errors = 0;
    let stopped = false;
    let urls = [];
    const lookup = (async () => {
        while (!stopped) {
            try {
                urls = await reflectorUrls();
            } catch {
                errors++;
            }
            await sleep(500);
        }
    })();
    const loop = (async () => {
        while (!stopped) {
            const counts = new Map();
            await Promise.all(urls.map(async url => {
                try {
                    const res = await fetch(new URL('sessions', url));
                    if (!res.ok) { errors++; return; }
                    const body = await res.json();
                    for (const s of body.sessions || []) {
                        const name = shardName(s);
                        if (name) counts.set(name, (counts.get(name) || 0) + (s.users || 0));
                    }
                } catch {
                    errors++;
                }
            }));
            for (const [name, users] of counts) peaks.set(name, Math.max(peaks.get(name) || 0, users));
            if (urls.length) polls++;
            await sleep(interval);
        }
    })();
    return {
        get peaks() { return new Map(peaks); },
        get polls() { return polls; },
        async stop() {
            stopped = true;
            await Promise.all([loop, lookup]);
            return { peaks: new Map(peaks), polls, errors };
        },
    };
}
