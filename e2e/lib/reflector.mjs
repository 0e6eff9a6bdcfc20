// Spawning and stopping the refleet-reflector binary under test.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { REPO_DIR, LogTail, withTimeout } from './util.mjs';

export function reflectorBinary() {
    return process.env.REFLEET_REFLECTOR_BIN || path.join(REPO_DIR, 'target', 'debug', 'refleet-reflector');
}

export function assertReflectorBinary() {
    const bin = reflectorBinary();
    if (!fs.existsSync(bin)) {
        throw new Error(`reflector binary not found at ${bin}: run \`cargo build -p refleet-reflector\` ` +
            'in the repository root, or set REFLEET_REFLECTOR_BIN');
    }
    return bin;
}

/**
 * A running reflector process.
 *   box       the box URL it printed, e.g. http://127.0.0.1:PORT/
 *   port      the port parsed from that line
 *   stderr    LogTail of its log output
 *   exited    promise of {code, signal} once the process has exited
 */
export class ReflectorProcess {
    constructor({ proc, options }) {
        this.proc = proc;
        this.options = options;
        this.stdout = new LogTail();
        this.stderr = new LogTail();
        this.box = null;
        this.port = null;
        this.exitStatus = null;
        this.exited = new Promise(resolve => {
            proc.on('exit', (code, signal) => {
                this.exitStatus = { code, signal };
                resolve(this.exitStatus);
            });
        });
        proc.stderr.on('data', d => this.stderr.push(d));
    }

    get pid() { return this.proc.pid; }

    get running() { return this.exitStatus === null; }

    /** Sends SIGTERM (graceful drain) once, without waiting. */
    sigterm() {
        if (this.running && !this.sigtermSent) {
            this.sigtermSent = Date.now();
            this.proc.kill('SIGTERM');
        }
    }

    /** Waits for the process to exit by itself. */
    async waitExit(timeout = 30000) {
        return withTimeout(this.exited, timeout, `reflector pid ${this.pid} to exit`);
    }

    /** SIGTERM (graceful drain) and wait for the process to exit by itself. */
    async terminate(timeout = 30000) {
        if (!this.running) return this.exitStatus;
        this.sigterm();
        return this.waitExit(timeout);
    }

    /** SIGKILL, used for cleanup. */
    async kill() {
        if (!this.running) return this.exitStatus;
        this.proc.kill('SIGKILL');
        return withTimeout(this.exited, 10000, `reflector pid ${this.pid} to die after SIGKILL`);
    }

    /** Plain HTTP GET against the reflector itself (healthz, metrics...). */
    async get(urlPath) {
        const res = await fetch(new URL(urlPath, this.box));
        return { status: res.status, text: await res.text() };
    }
}

/**
 * Starts the reflector and waits for its `box: http://127.0.0.1:PORT/` line.
 * options: storage (URL), listen (default 127.0.0.1:0), drainTimeout, emptySessionTtl,
 *          publicUrl, filesUrl, snapshotRetention, env (extra environment), args (extra argv),
 *          readyTimeout (ms).
 */
export async function startReflector(options = {}) {
    const bin = assertReflectorBinary();
    const args = ['--listen', options.listen || '127.0.0.1:0'];
    if (options.storage) args.push('--storage', options.storage);
    if (options.publicUrl) args.push('--public-url', options.publicUrl);
    if (options.filesUrl) args.push('--files-url', options.filesUrl);
    if (options.drainTimeout) args.push('--drain-timeout', options.drainTimeout);
    if (options.emptySessionTtl) args.push('--empty-session-ttl', options.emptySessionTtl);
    if (options.snapshotRetention !== undefined) args.push('--snapshot-retention', String(options.snapshotRetention));
    if (options.args) args.push(...options.args);
    const proc = spawn(bin, args, {
        cwd: options.cwd,
        env: { RUST_LOG: 'info', NO_COLOR: '1', ...process.env, ...options.env },
        stdio: ['ignore', 'pipe', 'pipe'],
    });
    const reflector = new ReflectorProcess({ proc, options: { ...options, args } });
    const ready = new Promise((resolve, reject) => {
        let buffered = '';
        proc.stdout.on('data', chunk => {
            reflector.stdout.push(chunk);
            if (reflector.box) return;
            buffered += chunk.toString();
            const match = /^box:\s*(\S+)\s*$/m.exec(buffered);
            if (match) {
                reflector.box = match[1];
                reflector.port = Number(new URL(match[1]).port);
                resolve(reflector);
            }
        });
        proc.on('error', reject);
        reflector.exited.then(status => reject(new Error(
            `reflector exited (${JSON.stringify(status)}) before printing its box line; stderr:\n${reflector.stderr.tail()}`)));
    });
    try {
        await withTimeout(ready, options.readyTimeout || 20000, 'reflector to print its "box:" line');
    } catch (err) {
        if (reflector.running) await reflector.kill().catch(() => {});
        throw err;
    }
    return reflector;
}
