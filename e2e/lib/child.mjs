// One participant fixture in its own Node process, spoken to over the JSON-lines protocol of
// fixtures/commands.cjs. Subclasses add what their fixture reports (onMessage, onExit).
import { spawn } from 'node:child_process';
import { E2E_DIR, LogTail, withTimeout } from './util.mjs';

export class FixtureProcess {
    constructor(script, options, env) {
        this.options = options;
        this.tag = options.tag;
        this.stderr = new LogTail();
        this.lines = [];            // every JSON line received
        this.pending = new Map();   // id -> {resolve, reject, cmd}
        this.nextId = 1;
        this.final = null;
        this.exitStatus = null;
        this.proc = spawn(process.execPath, [script], { cwd: E2E_DIR, env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
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
        this.exited = new Promise(resolve => {
            this.proc.on('exit', (code, signal) => {
                this.exitStatus = { code, signal };
                const err = new Error(`participant ${this.tag} exited (${JSON.stringify(this.exitStatus)}); stderr:\n${this.stderr.tail()}`);
                this.onExit(err);
                for (const p of this.pending.values()) p.reject(err);
                this.pending.clear();
                resolve(this.exitStatus);
            });
        });
    }

    get running() { return this.exitStatus === null; }

    /** A fixture-specific line (joined, fatal, routed, closed, …). */
    onMessage(_msg) {}

    /** The process ended: reject what waits for fixture-specific events. */
    onExit(_err) {}

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
        if (msg.type === 'final') this.final = msg.state;
        else if (msg.type === 'reply') {
            const p = this.pending.get(msg.id);
            if (!p) return;
            this.pending.delete(msg.id);
            if (msg.error) p.reject(new Error(`participant ${this.tag} ${p.cmd}: ${msg.error}`));
            else p.resolve(msg);
        } else this.onMessage(msg);
    }

    request(cmd, args = {}, timeout = 30000) {
        if (!this.running) return Promise.reject(new Error(`participant ${this.tag} is not running`));
        const id = this.nextId++;
        const reply = new Promise((resolve, reject) => this.pending.set(id, { resolve, reject, cmd }));
        this.proc.stdin.write(JSON.stringify({ id, cmd, ...args }) + '\n');
        return withTimeout(reply, timeout, `participant ${this.tag} to answer ${cmd}`).finally(() => this.pending.delete(id));
    }

    async state() { return (await this.request('state')).state; }

    /** Publishes `count` append events (numbered on from the participant's previous sends). */
    async send(count, gap = 0) { return (await this.request('send', { count, gap }, 60000 + count * gap)).sent; }

    /** Resolves with the state once the model log has >= count entries; throws on timeout. */
    async waitForCount(count, timeout = 30000) {
        const reply = await this.request('wait', { count, timeout }, timeout + 10000);
        if (!reply.ok) {
            throw new Error(`participant ${this.tag} has ${reply.state.count} log entries after ${timeout} ms, expected ${count}`);
        }
        return reply.state;
    }

    /** Leaves the session, collects the final state and lets the process exit. */
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
