// Scenario 4: persisted data carries an app's state across a code change (and a reflector restart).
import assert from 'node:assert/strict';
import { e2eTest, assertSenderOrder } from './lib/harness.mjs';
import { sleep, waitFor } from './lib/util.mjs';

const pathOf = url => new URL(url, 'http://x').pathname;

e2eTest('code version 2 starts from the data persisted by code version 1', { timeout: 120000 }, async (t, h) => {
    const storageDir = h.tempDir();
    const proxy = await h.proxy();
    const first = await h.reflector({ storage: `file://${storageDir}`, filesUrl: proxy.filesUrl, emptySessionTtl: '1s', drainTimeout: '2s' });
    proxy.setTarget(first.box);
    const session = h.sessionName('persist');
    const common = { box: proxy.box, session, tps: 10 };

    // --- code version 1 builds some state and persists it
    const [a, b] = await h.participantsJoined([{ ...common, tag: 'A', code: 1 }, { ...common, tag: 'B', code: 1 }]);
    await Promise.all([a.send(4, 30), b.send(4, 30)]);
    await Promise.all([a.waitForCount(8), b.waitForCount(8)]);
    await a.persist();
    const save = await waitFor(() => proxy.messages({ dir: 'c2s', action: 'SAVE' })[0], { timeout: 20000, what: 'a SAVE frame' });
    h.mark('SAVE seen');
    const saveUrl = save.msg.args.url;
    const v1 = await a.state();
    assert.ok(pathOf(saveUrl).startsWith(`/files/apps/io.refleet.e2e/${v1.persistentId}/save/`),
        `persisted data URL ${saveUrl} has the documented shape`);
    const put = proxy.httpLog.find(r => r.method === 'PUT' && pathOf(r.path) === pathOf(saveUrl));
    assert.ok(put && put.status >= 200 && put.status < 300, `the persisted data was uploaded (${JSON.stringify(put)})`);

    await Promise.all([a.exit(), b.exit()]);
    h.mark('version 1 left');

    // --- the first session is gone: wait past the empty-session TTL, then restart the reflector
    // on the same storage, so the persisted record must have been stored durably.
    await sleep(2000);
    const status = await first.terminate(15000);
    assert.deepEqual(status, { code: 0, signal: null }, 'the reflector exits 0 on SIGTERM');
    const second = await h.reflector({ storage: `file://${storageDir}`, filesUrl: proxy.filesUrl, emptySessionTtl: '1s' });
    proxy.setTarget(second.box);
    h.mark('reflector restarted');

    // --- code version 2: a new session (different code hash) with the same persistentId
    const [c] = await h.participantsJoined([{ ...common, tag: 'C', code: 2 }]);
    const v2 = await c.state();
    h.mark('version 2 joined');
    assert.notEqual(v2.sessionId, v1.sessionId, 'a code change makes a different session');
    assert.equal(v2.persistentId, v1.persistentId, 'same app and name, same persistentId');

    const [sync] = proxy.syncsOf(v2.viewId);
    assert.ok(sync, 'version 2 got a SYNC');
    assert.equal(sync.persisted, true, 'SYNC is flagged persisted');
    assert.equal(sync.url, saveUrl, 'SYNC url is the persisted data URL from SAVE');
    assert.equal(sync.snapshotSeq, undefined, 'no snapshot in a fresh session');
    const get = proxy.httpLog.find(r => r.method === 'GET' && pathOf(r.path) === pathOf(saveUrl));
    assert.ok(get, 'version 2 downloaded the persisted data through the files endpoint');
    assert.equal(get.status, 200, 'persisted data GET status');
    assert.equal(get.resSha256, put.reqSha256, 'persisted data GET returns the uploaded bytes');

    assert.ok(v2.restored, 'init() of version 2 received persisted data');
    assert.equal(v2.restored.code, 1, 'the persisted data was written by code version 1');
    assert.equal(v2.restored.count, 8);
    assert.deepEqual(v2.entries, v1.entries, 'version 2 starts with the log of version 1');

    await c.send(1);
    const after = await c.waitForCount(9);
    assertSenderOrder(after.entries, { A: 4, B: 4, C: 1 });
    await c.exit();
});
