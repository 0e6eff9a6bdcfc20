// Starting `refleet up` (the local fleet) and reading its status.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { REPO_DIR, LogTail, withTimeout } from './util.mjs';
import { assertReflectorBinary } from './reflector.mjs';

export function refleetBinary() {
    return process.env.REFLEET_BIN || path.join(REPO_DIR, 'target', 'debug', 'refleet');
}

/**
 * Starts `refleet up --config <file>` with `configText` on 127.0.0.1:0 and a fresh data
 * directory; resolves once it printed its `refleet: URL` line. The reflector binary is
 * REFLEET_REFLECTOR_BIN (or target/debug/refleet-reflector). Tracked by the harness, so it is
 * killed when the test ends. `extraArgs` are appended to the command line (e.g. `--demo DIR`).
 */
export async function startFleet(h, configText, { extraArgs = [] } = {}) {
    const bin = refleetBinary();
    if (!fs.existsSync(bin)) {
        throw new Error(`refleet binary not found at ${bin}: run \`cargo build -p refleet-operator\`, or set REFLEET_BIN`);
    }
    const reflectorBin = assertReflectorBinary();
    const dir = h.tempDir();
    const config = path.join(dir, 'fleet.yaml');
    fs.writeFileSync(config, configText);
    // In a process group of its own, so that cleanup can kill its reflector children too: a
    // SIGKILLed refleet up cannot stop them itself.
    const proc = spawn(bin, ['up', '--config', config, '--listen', '127.0.0.1:0', '--data-dir', path.join(dir, 'data'),
        '--reflector-bin', reflectorBin, ...extraArgs], {
        env: { RUST_LOG: 'info', NO_COLOR: '1', ...process.env },
        stdio: ['ignore', 'pipe', 'pipe'],
        detached: true,
    });
    const stderr = new LogTail();
    const stdout = new LogTail();
    proc.stderr.on('data', d => stderr.push(d));
    h.trackProcess('refleet-up', processGroup(proc), stderr);
    h.trackProcess('refleet-up-stdout', { on() {}, exitCode: 0, signalCode: null }, stdout);
    const exited = new Promise(resolve => proc.on('exit', (code, signal) => resolve({ code, signal })));
    const url = await withTimeout(new Promise((resolve, reject) => {
        let buffered = '';
        proc.stdout.on('data', chunk => {
            stdout.push(chunk);
            buffered += chunk.toString();
            const m = /^refleet:\s*(\S+)\s*$/m.exec(buffered);
            if (m) resolve(m[1]);
        });
        exited.then(s => reject(new Error(`refleet up exited (${JSON.stringify(s)}); stderr:\n${stderr.tail()}`)));
    }), 20000, 'refleet up to print its URL');
    // Reflectors' own logs, saved with the test's logs on failure.
    const logDir = path.join(dir, 'data', 'logs');
    h.trackProcess('refleet-up-reflector-logs', { on() {}, exitCode: 0, signalCode: null }, {
        get text() {
            if (!fs.existsSync(logDir)) return '';
            return fs.readdirSync(logDir).map(f => `==> ${f}\n${fs.readFileSync(path.join(logDir, f), 'utf8')}`).join('\n');
        },
    });
    return {
        url, proc, stdout, stderr, exited,
        /** The data directory (`<dir>/storage` holds the pool's stored files). */
        dataDir: path.join(dir, 'data'),
        async status() {
            const res = await fetch(new URL('v1/status', url));
            if (!res.ok) throw new Error(`GET /v1/status: ${res.status}`);
            return res.json();
        },
        async shards(session, namespace = 'default') {
            const res = await fetch(new URL(`v1/shards?namespace=${namespace}&session=${session}`, url));
            if (!res.ok) throw new Error(`GET /v1/shards: ${res.status}`);
            return (await res.json()).shards;
        },
        /** SIGTERM and wait for a clean exit. */
        async stop(timeout = 30000) {
            proc.kill('SIGTERM');
            return withTimeout(exited, timeout, 'refleet up to exit after SIGTERM');
        },
    };
}

/** `proc` as the harness tracks it, whose kill() signals its whole process group. */
function processGroup(proc) {
    return {
        on: (...args) => proc.on(...args),
        get exitCode() { return proc.exitCode; },
        get signalCode() { return proc.signalCode; },
        kill(signal = 'SIGTERM') {
            try {
                process.kill(-proc.pid, signal);
            } catch {
                proc.kill(signal);
            }
        },
    };
}

/** Every reflector of a status, flattened. */
export function reflectorsOf(status) {
    return status.regions.flatMap(r => r.reflectors.map(x => ({ ...x, region: r.name })));
}
