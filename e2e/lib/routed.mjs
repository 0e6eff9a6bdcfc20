// Driving real clients that join through Refleet's router (fixtures/routed-participant.cjs), and
// watching reflectors while they do.
import assert from 'node:assert/strict';
import path from 'node:path';
import { FixtureProcess } from './child.mjs';
import { E2E_DIR, sleep, withTimeout } from './util.mjs';

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
 * A FixtureProcess like participant.mjs's Participant, so the harness cleans it up and saves
 * its logs when it is in `h.participants`.
 */
export class RoutedParticipant extends FixtureProcess {
    constructor(options) {
        super(SCRIPT, options, {
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
        });
        running.add(this.proc);
        this.route = null;
        this.closed = null;
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
    }

    onExit(err) {
        running.delete(this.proc);
        this.rejectOutcome(err);
        this.rejectRouted(err);
    }

    onMessage(msg) {
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

/** The token segment of a routed reflector URL, and the URL without it. */
export function splitToken(reflectorUrl) {
    const m = /^(.*\/)([^/]+)\/$/.exec(reflectorUrl);
    assert.ok(m && m[2].includes('.'), `a token segment in ${reflectorUrl}`);
    return { base: m[1], token: m[2] };
}
