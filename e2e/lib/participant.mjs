// Driving one real client (fixtures/participant.cjs) in its own Node process.
import path from 'node:path';
import { FixtureProcess } from './child.mjs';
import { E2E_DIR, withTimeout } from './util.mjs';

const PARTICIPANT = path.join(E2E_DIR, 'fixtures', 'participant.cjs');

export class Participant extends FixtureProcess {
    /**
     * options: box, session (name), tag, appId, code ('1'|'2'), tps, rejoinLimit, stepMs, env
     */
    constructor(options) {
        super(PARTICIPANT, options, {
            E2E_BOX: options.box,
            E2E_SESSION: options.session,
            E2E_TAG: options.tag,
            E2E_APP_ID: options.appId || 'io.refleet.e2e',
            E2E_CODE: String(options.code || '1'),
            ...(options.tps ? { E2E_TPS: String(options.tps) } : {}),
            ...(options.rejoinLimit !== undefined ? { E2E_REJOIN_LIMIT: String(options.rejoinLimit) } : {}),
            ...(options.stepMs ? { E2E_STEP_MS: String(options.stepMs) } : {}),
            ...options.env,
        });
        this.joined = new Promise((resolve, reject) => {
            this.resolveJoined = resolve;
            this.rejectJoined = reject;
        });
        this.joined.catch(() => {});
    }

    onMessage(msg) {
        if (msg.type === 'joined') this.resolveJoined(msg.state);
        else if (msg.type === 'fatal') this.rejectJoined(new Error(`participant ${this.tag} failed to join: ${msg.error}`));
    }

    onExit(err) { this.rejectJoined(err); }

    /** Waits for the initial Session.join to finish; returns the state reported then. */
    async waitJoined(timeout = 30000) {
        return withTimeout(this.joined, timeout, `participant ${this.tag} to join; stderr:\n${this.stderr.tail(2000)}`);
    }

    async snapshot() { return this.request('snapshot'); }

    async persist() { return this.request('persist'); }

    async leave() { return this.request('leave'); }

    async join(timeout = 30000) { return (await this.request('join', {}, timeout)).state; }
}
