// Small helpers shared by the e2e harness.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import net from 'node:net';
import { fileURLToPath } from 'node:url';

export const E2E_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const REPO_DIR = path.resolve(E2E_DIR, '..');

export const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

/** Rejects with `message` if `promise` does not settle within `ms`. */
export function withTimeout(promise, ms, message) {
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${message}`)), ms);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Polls `fn` (sync or async) until it returns a truthy value, which is returned.
 * Throws after `timeout` ms, including the last falsy value / error in the message.
 */
export async function waitFor(fn, { timeout = 10000, interval = 50, what = 'condition' } = {}) {
    const deadline = Date.now() + timeout;
    let last;
    for (;;) {
        try {
            last = await fn();
            if (last) return last;
        } catch (err) {
            last = err;
        }
        if (Date.now() > deadline) {
            const detail = last instanceof Error ? last.message : JSON.stringify(last);
            throw new Error(`timed out after ${timeout} ms waiting for ${what} (last: ${detail})`);
        }
        await sleep(interval);
    }
}

/** A fresh temporary directory (removed by the harness cleanup). */
export function makeTempDir(prefix = 'refleet-e2e-') {
    return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** A port that was free a moment ago on 127.0.0.1 (for servers that cannot take port 0). */
export function freePort() {
    return new Promise((resolve, reject) => {
        const srv = net.createServer();
        srv.unref();
        srv.on('error', reject);
        srv.listen(0, '127.0.0.1', () => {
            const { port } = srv.address();
            srv.close(() => resolve(port));
        });
    });
}

/** Keeps the last `limit` characters written to it (for process logs). */
export class LogTail {
    constructor(limit = 256 * 1024) {
        this.limit = limit;
        this.text = '';
    }

    push(chunk) {
        this.text += chunk.toString();
        if (this.text.length > this.limit) this.text = this.text.slice(this.text.length - this.limit);
    }

    tail(chars = 4000) {
        return this.text.slice(Math.max(0, this.text.length - chars));
    }
}

export function randomSuffix() {
    return Math.random().toString(36).slice(2, 10);
}
