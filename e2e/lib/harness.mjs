// Per-test resource tracking: reflectors, proxies, participants, temp dirs; cleanup and logs.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { startReflector } from './reflector.mjs';
import { startProxy } from './proxy.mjs';
import { Participant } from './participant.mjs';
import { makeTempDir, randomSuffix } from './util.mjs';
import { wireViolations } from './wire.mjs';

// Every child process started by any harness in this test file, killed on exit no matter what.
const allChildren = new Set();
process.on('exit', () => {
    for (const child of allChildren) {
        try { child.kill('SIGKILL'); } catch { /* already gone */ }
    }
});

export class Harness {
    constructor(name) {
        this.name = name;
        this.slug = name.replace(/[^A-Za-z0-9]+/g, '-').replace(/^-|-$/g, '').slice(0, 60);
        this.reflectors = [];
        this.proxies = [];
        this.participants = [];
        this.tempDirs = [];
        this.extraProcesses = [];   // {name, proc, stderr: LogTail}
        this.t0 = Date.now();
        this.marks = [];
    }

    /** Records a timestamped note; dumped with the logs and handy for timings. */
    mark(what) {
        const entry = { t: Date.now() - this.t0, what };
        this.marks.push(entry);
        return entry;
    }

    tempDir() {
        const dir = makeTempDir(`refleet-e2e-${this.slug.slice(0, 20)}-`);
        this.tempDirs.push(dir);
        return dir;
    }

    /** A unique session name, so tests never share a session. */
    sessionName(label = 'session') {
        return `${this.slug}-${label}-${randomSuffix()}`;
    }

    async reflector(options) {
        const reflector = await startReflector(options);
        this.reflectors.push(reflector);
        allChildren.add(reflector.proc);
        reflector.exited.then(() => allChildren.delete(reflector.proc));
        return reflector;
    }

    async proxy(target) {
        const proxy = await startProxy(target);
        this.proxies.push(proxy);
        return proxy;
    }

    /** Starts a participant process (does not wait for it to join). */
    participant(options) {
        const participant = new Participant(options);
        this.participants.push(participant);
        allChildren.add(participant.proc);
        participant.exited.then(() => allChildren.delete(participant.proc));
        return participant;
    }

    /** Starts participants and waits until every one of them has joined. */
    async participantsJoined(optionsList, timeout = 60000) {
        const list = optionsList.map(o => this.participant(o));
        await Promise.all(list.map(p => p.waitJoined(timeout)));
        return list;
    }

    trackProcess(name, proc, stderr) {
        this.extraProcesses.push({ name, proc, stderr });
        allChildren.add(proc);
        proc.on('exit', () => allChildren.delete(proc));
    }

    saveLogs(error) {
        const dir = path.join(process.env.E2E_LOG_DIR || path.join(os.tmpdir(), 'refleet-e2e-logs'),
            `${this.slug}-${Date.now()}`);
        fs.mkdirSync(dir, { recursive: true });
        if (error) fs.writeFileSync(path.join(dir, 'error.txt'), `${error.stack || error}\n`);
        fs.writeFileSync(path.join(dir, 'marks.jsonl'), this.marks.map(m => JSON.stringify(m)).join('\n') + '\n');
        this.reflectors.forEach((r, i) => {
            fs.writeFileSync(path.join(dir, `reflector-${i}.stderr.log`), r.stderr.text);
            fs.writeFileSync(path.join(dir, `reflector-${i}.info.json`),
                JSON.stringify({ args: r.options.args, box: r.box, exit: r.exitStatus }, null, 2));
        });
        this.proxies.forEach((p, i) => fs.writeFileSync(path.join(dir, `proxy-${i}.jsonl`), p.dump()));
        this.participants.forEach(p => {
            fs.writeFileSync(path.join(dir, `participant-${p.tag}.stderr.log`), p.stderr.text);
            fs.writeFileSync(path.join(dir, `participant-${p.tag}.stdout.jsonl`), p.lines.map(l => JSON.stringify(l)).join('\n') + '\n');
        });
        for (const extra of this.extraProcesses) {
            if (extra.stderr) fs.writeFileSync(path.join(dir, `${extra.name}.log`), extra.stderr.text);
        }
        return dir;
    }

    async cleanup() {
        await Promise.allSettled(this.participants.map(p => p.kill()));
        await Promise.allSettled(this.reflectors.map(r => r.kill()));
        await Promise.allSettled(this.proxies.map(p => p.close()));
        for (const extra of this.extraProcesses) {
            if (extra.proc.exitCode === null && extra.proc.signalCode === null) {
                try { extra.proc.kill('SIGKILL'); } catch { /* ignore */ }
            }
        }
        if (!process.env.E2E_KEEP_TEMP) {
            for (const dir of this.tempDirs) fs.rmSync(dir, { recursive: true, force: true });
        }
    }
}

/**
 * Declares one e2e test: creates a Harness, runs fn(t, harness), saves logs on failure
 * (path reported as a test diagnostic) and always cleans up every process it started.
 */
export function e2eTest(name, options, fn) {
    return test(name, options, async t => {
        const harness = new Harness(name);
        const onAbort = () => { harness.cleanup().catch(() => {}); };
        t.signal?.addEventListener('abort', onAbort);
        try {
            await fn(t, harness);
            // Whatever the scenario, the frames the proxies saw must follow the protocol.
            for (const proxy of harness.proxies) {
                const problems = wireViolations(proxy);
                assert.deepEqual(problems.slice(0, 10), [], `protocol violations on the wire (${problems.length} in all)`);
            }
            if (process.env.E2E_SAVE_LOGS) t.diagnostic(`logs: ${harness.saveLogs()}`);
        } catch (err) {
            try {
                const dir = harness.saveLogs(err);
                t.diagnostic(`logs of the failed test: ${dir}`);
                err.message += `\n(logs: ${dir})`;
            } catch { /* ignore */ }
            throw err;
        } finally {
            t.signal?.removeEventListener('abort', onAbort);
            await harness.cleanup();
            t.diagnostic(`timeline: ${harness.marks.map(m => `${(m.t / 1000).toFixed(1)}s ${m.what}`).join('; ')}`);
        }
    });
}

// ---------------------------------------------------------------- assertions on model state

/** Asserts that, for each sender in `expected` ({tag: count}), the log has exactly n=1..count in order. */
export function assertSenderOrder(entries, expected, who = 'log') {
    const bySender = new Map();
    for (const [sender, n] of entries) {
        if (!bySender.has(sender)) bySender.set(sender, []);
        bySender.get(sender).push(n);
    }
    for (const [sender, count] of Object.entries(expected)) {
        const got = bySender.get(sender) || [];
        const want = Array.from({ length: count }, (_, i) => i + 1);
        assert.deepEqual(got, want, `${who}: entries of ${sender} should be 1..${count} in order`);
    }
    const unexpected = [...bySender.keys()].filter(s => !(s in expected));
    assert.deepEqual(unexpected, [], `${who}: entries from unexpected senders`);
}

/** Asserts that all states have identical logs; returns that log. */
export function assertSameLogs(states) {
    const [first, ...rest] = states;
    for (const s of rest) {
        assert.deepEqual(s.entries, first.entries, `log of ${s.tag} differs from log of ${first.tag}`);
    }
    return first.entries;
}
