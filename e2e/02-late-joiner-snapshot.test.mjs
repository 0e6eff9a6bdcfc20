// Scenario 2: a late joiner starts from the snapshot the earlier clients uploaded.
import assert from 'node:assert/strict';
import { e2eTest, assertSameLogs, assertSenderOrder } from './lib/harness.mjs';
import { waitFor } from './lib/util.mjs';

// "b is after a" with 32-bit wrap-around (REFLECTOR_PROTOCOL §5)
const seqAfter = (a, b) => { const d = (b - a) >>> 0; return d > 0 && d < 0x80000000; };

e2eTest('late joiner gets the snapshot URL in SYNC, downloads it from the files endpoint and converges', { timeout: 120000 }, async (t, h) => {
    const proxy = await h.proxy();
    const reflector = await h.reflector({ storage: `file://${h.tempDir()}`, filesUrl: proxy.filesUrl });
    proxy.setTarget(reflector.box);
    const session = h.sessionName('late');
    const common = { box: proxy.box, session, tps: 10 };
    const [a, b] = await h.participantsJoined([{ ...common, tag: 'A' }, { ...common, tag: 'B' }]);
    h.mark('A and B joined');

    await Promise.all([a.send(3, 50), b.send(3, 50)]);
    await Promise.all([a.waitForCount(6), b.waitForCount(6)]);

    await a.snapshot();
    const snap = await waitFor(() => proxy.messages({ dir: 'c2s', action: 'SNAP' })[0], { timeout: 20000, what: 'a SNAP frame' });
    const snapArgs = snap.msg.args;
    h.mark(`SNAP seen: time ${snapArgs.time} seq ${snapArgs.seq}`);
    const snapPath = new URL(snapArgs.url).pathname;
    assert.ok(snapPath.startsWith('/files/'), `snapshot URL ${snapArgs.url} should be under the files base`);
    const put = proxy.httpLog.find(r => r.method === 'PUT' && new URL(r.path, 'http://x').pathname === snapPath);
    assert.ok(put, 'the snapshot upload (PUT) should have gone through the files endpoint');
    assert.ok(put.status >= 200 && put.status < 300, `snapshot PUT status ${put.status}`);

    await Promise.all([a.send(2, 50), b.send(2, 50)]);
    await Promise.all([a.waitForCount(10), b.waitForCount(10)]);
    h.mark('events after the snapshot delivered');

    const [c] = await h.participantsJoined([{ ...common, tag: 'C' }]);
    h.mark('C joined');
    const cState = await c.waitForCount(10);
    const syncs = proxy.syncsOf(cState.viewId);
    assert.equal(syncs.length, 1, 'C should have received exactly one SYNC');
    const sync = syncs[0];
    assert.equal(sync.url, snapArgs.url, 'SYNC url should be the uploaded snapshot');
    assert.equal(sync.snapshotSeq, snapArgs.seq, 'SYNC snapshotSeq should be the SNAP seq');
    assert.equal(sync.snapshotTime, snapArgs.time, 'SYNC snapshotTime should be the SNAP time');
    assert.ok(!sync.persisted, 'a snapshot SYNC must not be flagged persisted');
    for (const m of sync.messages) {
        assert.ok(seqAfter(snapArgs.seq, m[1]), `SYNC message seq ${m[1]} should come after snapshotSeq ${snapArgs.seq}`);
    }
    const clientMessages = sync.messages.filter(m => typeof m[2] === 'string');
    assert.ok(clientMessages.length >= 4, `SYNC should carry the 4 events sent after the snapshot (got ${clientMessages.length} client messages)`);
    for (let i = 1; i < sync.messages.length; i++) {
        assert.equal(sync.messages[i][1], (sync.messages[i - 1][1] + 1) >>> 0, 'SYNC messages should have consecutive seqs');
    }

    const get = await waitFor(() => proxy.httpLog.find(r => r.method === 'GET' && new URL(r.path, 'http://x').pathname === snapPath),
        { timeout: 5000, what: 'the GET of the snapshot' });
    assert.equal(get.status, 200, 'snapshot GET status');
    assert.equal(get.resSha256, put.reqSha256, 'the snapshot GET should return the bytes that were PUT');

    const states = await Promise.all([a, b, c].map(p => p.state()));
    for (const s of states) assert.equal(s.count, 10, `${s.tag} entry count`);
    const log = assertSameLogs(states);
    assertSenderOrder(log, { A: 5, B: 5 });
    assert.equal(states[2].viewConstructions, 1, 'C built its view once');
    await Promise.all([a, b, c].map(p => p.exit()));
});
