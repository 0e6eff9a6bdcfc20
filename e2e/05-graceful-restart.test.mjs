// Scenario 5: SIGTERM drains the reflector, which stores live sessions; a new reflector on the same
// storage and port resumes them and the connected clients rejoin seamlessly.
import assert from 'node:assert/strict';
import { e2eTest, assertSameLogs, assertSenderOrder } from './lib/harness.mjs';
import { createRequire } from 'node:module';
import { randomSuffix, sleep, waitFor } from './lib/util.mjs';

const { WebSocket } = createRequire(import.meta.url)('ws');

/**
 * Opens a WebSocket for a session the reflector has never seen and sends `join` (a JOIN frame
 * copied from a real client, so only the session differs). Resolves after `ms` with what happened:
 * {httpStatus} if the upgrade was refused, else {syncs, close: {code, reason} | null}.
 */
function probeNewSession(box, join, ms) {
    const sessionId = `drainprobe${randomSuffix()}${randomSuffix()}`;
    const ws = new WebSocket(`${box.replace(/^http/, 'ws')}reflector/${sessionId}`);
    const result = { sessionId, httpStatus: null, error: null, syncs: 0, close: null };
    ws.on('unexpected-response', (_req, res) => { result.httpStatus = res.statusCode; ws.terminate(); });
    ws.on('error', err => { result.error = err.message; });
    ws.on('open', () => ws.send(JSON.stringify({ ...join, id: sessionId })));
    ws.on('message', data => { if (JSON.parse(data.toString()).action === 'SYNC') result.syncs += 1; });
    ws.on('close', (code, reason) => { result.close = { code, reason: reason.toString() }; });
    return sleep(ms).then(() => { ws.terminate(); return result; });
}

/** Largest teatime the proxy saw sent to connection `conn` (SYNC, RECV and TICK frames). */
function lastTimeSeen(proxy, conn) {
    let max = -1;
    for (const f of proxy.messages({ conn, dir: 's2c' })) {
        const { action, args } = f.msg;
        if (action === 'SYNC') max = Math.max(max, args.time);
        else if (action === 'RECV') max = Math.max(max, args[0]);
        else if (action === 'TICK') max = Math.max(max, typeof args === 'number' ? args : args.time);
    }
    return max;
}

e2eTest('graceful restart: sessions survive SIGTERM and a restart on the same storage and port', { timeout: 150000 }, async (t, h) => {
    const storageDir = h.tempDir();
    const proxy = await h.proxy();
    const options = { storage: `file://${storageDir}`, filesUrl: proxy.filesUrl, drainTimeout: '2s' };
    const first = await h.reflector(options);
    proxy.setTarget(first.box);
    const session = h.sessionName('restart');
    // rejoinLimit 10 s: the clients keep their views while the reflector restarts
    const common = { box: proxy.box, session, tps: 10, rejoinLimit: 10000 };
    const [a, b] = await h.participantsJoined(['A', 'B'].map(tag => ({ ...common, tag })));
    const sent = { A: 0, B: 0 };
    const sendBoth = async n => {
        await Promise.all([a.send(n, 30), b.send(n, 30)]);
        sent.A += n;
        sent.B += n;
    };
    const total = () => sent.A + sent.B;

    await sendBoth(3);
    await Promise.all([a.waitForCount(total()), b.waitForCount(total())]);
    await a.snapshot();
    const snap = await waitFor(() => proxy.messages({ dir: 'c2s', action: 'SNAP' })[0], { timeout: 20000, what: 'a SNAP frame' });
    h.mark('snapshot taken');
    await sendBoth(2);
    await Promise.all([a.waitForCount(total()), b.waitForCount(total())]);
    await b.persist();
    await waitFor(() => proxy.messages({ dir: 'c2s', action: 'SAVE' })[0], { timeout: 20000, what: 'a SAVE frame' });
    h.mark('persisted');
    await sendBoth(2); // after the last snapshot and the last persist
    await Promise.all([a.waitForCount(total()), b.waitForCount(total())]);

    const aView = (await a.state()).viewId;
    const bView = (await b.state()).viewId;
    const [aConn1] = proxy.connsOfUser(aView);
    const [bConn1] = proxy.connsOfUser(bView);
    const timeline = proxy.syncsOf(aView)[0].timeline;

    // --- SIGTERM: the reflector drains (still serving its sessions), then stores them and exits
    const realJoin = proxy.messages({ conn: aConn1.conn, dir: 'c2s', action: 'JOIN' })[0].msg;
    const termAt = Date.now();
    first.sigterm();
    h.mark('SIGTERM sent');
    await sleep(200);
    // A new session is refused while draining (directly at the reflector, no proxy involved),
    // in a way the client retries: an HTTP refusal of the upgrade or a close code below 4100.
    const probe = probeNewSession(first.box, realJoin, 1200);
    // A real client of another session trying to join during the drain gets in after the restart.
    const late = h.participant({ ...common, session: h.sessionName('newcomer'), tag: 'D' });
    await sendBoth(1); // served during the drain
    await Promise.all([a.waitForCount(total(), 5000), b.waitForCount(total(), 5000)]);
    const refused = await probe;
    h.mark(`new-session probe during drain: ${JSON.stringify(refused)}`);
    assert.equal(refused.syncs, 0, 'no SYNC for a new session while draining');
    if (refused.httpStatus === null && refused.close) {
        assert.ok(refused.close.code !== 1000 && refused.close.code < 4100,
            `a refused JOIN must be closed with a code the client retries (got ${refused.close.code})`);
    }
    const status = await first.waitExit(20000);
    const drainMs = Date.now() - termAt;
    h.mark(`first reflector exited after ${drainMs} ms`);
    assert.deepEqual(status, { code: 0, signal: null }, 'the drained reflector exits 0');
    assert.ok(drainMs < 15000, `exit within the drain timeout plus storing time (took ${drainMs} ms)`);
    // The proxy notes each close as it relays it, which can be a moment after the process exit.
    await waitFor(() => aConn1.closed && bConn1.closed, { timeout: 3000, what: 'the proxy to see both closes' }).catch(() => {});
    for (const conn of [aConn1, bConn1]) {
        assert.ok(conn.closed, `connection #${conn.conn} was closed`);
        assert.equal(conn.closed.by, 'server', 'the reflector closed the connection');
        assert.equal(conn.closed.code, 4003, 'closed with 4003 "please reconnect"');
    }
    const timeBeforeRestart = Math.max(lastTimeSeen(proxy, aConn1.conn), lastTimeSeen(proxy, bConn1.conn));

    // A keeps publishing while the reflector is down; its client buffers the event.
    await waitFor(() => proxy.events.some(e => e.event === 'upgrade' && e.conn > Math.max(aConn1.conn, bConn1.conn)),
        { timeout: 10000, what: 'a client to retry connecting' });
    await a.send(1);
    sent.A += 1;

    // --- a new reflector on the same storage and port
    const second = await h.reflector({ ...options, listen: `127.0.0.1:${first.port}` });
    h.mark('second reflector up');
    assert.equal(second.port, first.port);

    await sendBoth(2); // after the restart
    const states = await Promise.all([a.waitForCount(total(), 30000), b.waitForCount(total(), 30000)]);
    h.mark('clients caught up after restart');
    for (const s of states) {
        assert.equal(s.count, total(), `${s.tag} entry count`);
        assert.equal(s.viewConstructions, 1, `${s.tag} kept its view (seamless rejoin)`);
    }
    const log = assertSameLogs(states);
    assertSenderOrder(log, sent);

    for (const user of [aView, bView]) {
        const syncs = proxy.syncsOf(user);
        assert.ok(syncs.length >= 2, 'a SYNC before and after the restart');
        const resumed = syncs[syncs.length - 1];
        assert.equal(resumed.timeline, timeline, 'resumed on the same timeline');
        assert.equal(resumed.url, snap.msg.args.url, 'the resumed session still points at the snapshot');
        assert.equal(resumed.snapshotSeq, snap.msg.args.seq, 'and at its seq');
        assert.ok(resumed.time >= timeBeforeRestart, `teatime continues (${resumed.time} >= ${timeBeforeRestart})`);
    }

    // --- the newcomer refused during the drain got its own, new session on the second reflector
    const lateState = await late.waitJoined(30000);
    const lateSyncs = proxy.syncsOf(lateState.viewId);
    assert.equal(lateSyncs.length, 1, 'the newcomer got exactly one SYNC, from the second reflector');
    assert.notEqual(lateState.sessionId, states[0].sessionId);
    await late.exit();

    // --- a fresh client converges to the same state
    const [c] = await h.participantsJoined([{ ...common, tag: 'C' }]);
    const cState = await c.waitForCount(total());
    assert.equal(cState.count, total());
    assert.deepEqual(cState.entries, log, 'the fresh client has the same log');
    assert.equal(proxy.syncsOf(cState.viewId)[0].timeline, timeline, 'the fresh client joined the resumed session');
    await Promise.all([a, b, c].map(p => p.exit()));
});
