// Scenario 6: the late-joiner and persistence checks again, with the reflector storing everything in
// S3 (a moto server on loopback) instead of a local directory.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { e2eTest, assertSameLogs, assertSenderOrder } from './lib/harness.mjs';
import { motoSkipReason, startMoto } from './lib/moto.mjs';
import { randomSuffix, sleep, waitFor } from './lib/util.mjs';

const BUCKET = 'refleet-e2e';
const pathOf = url => new URL(url, 'http://x').pathname;

e2eTest('S3 storage: snapshot for a late joiner and persisted data across a code change and restart', {
    timeout: 150000,
    skip: motoSkipReason() || false,
}, async (t, h) => {
    const moto = await startMoto(h);
    await moto.createBucket(BUCKET);
    const prefix = `run-${randomSuffix()}`;
    h.mark(`moto up on ${moto.endpoint}, prefix ${prefix}`);
    // An empty working directory: with S3 storage nothing may land in a local default directory.
    const cwd = h.tempDir();
    const proxy = await h.proxy();
    const options = {
        storage: `s3://${BUCKET}/${prefix}`, env: moto.clientEnv(), cwd, emptySessionTtl: '1s', drainTimeout: '2s',
        filesUrl: proxy.filesUrl,
    };
    const first = await h.reflector(options);
    proxy.setTarget(first.box);
    const session = h.sessionName('s3');
    const common = { box: proxy.box, session, tps: 10 };

    // --- late joiner from a snapshot stored in S3
    const [a, b] = await h.participantsJoined([{ ...common, tag: 'A' }, { ...common, tag: 'B' }]);
    await Promise.all([a.send(3, 30), b.send(3, 30)]);
    await Promise.all([a.waitForCount(6), b.waitForCount(6)]);
    await a.snapshot();
    const snap = (await waitFor(() => proxy.messages({ dir: 'c2s', action: 'SNAP' })[0], { timeout: 20000, what: 'a SNAP frame' })).msg.args;
    h.mark('snapshot taken');
    const snapPut = proxy.httpLog.find(r => r.method === 'PUT' && pathOf(r.path) === pathOf(snap.url));
    assert.ok(snapPut && snapPut.status >= 200 && snapPut.status < 300, `snapshot uploaded (${JSON.stringify(snapPut)})`);
    await Promise.all([a.send(2, 30), b.send(2, 30)]);
    await Promise.all([a.waitForCount(10), b.waitForCount(10)]);

    const [c] = await h.participantsJoined([{ ...common, tag: 'C' }]);
    const cState = await c.waitForCount(10);
    const [cSync] = proxy.syncsOf(cState.viewId);
    assert.equal(cSync.url, snap.url, "late joiner's SYNC points at the snapshot");
    assert.equal(cSync.snapshotSeq, snap.seq);
    const snapGet = proxy.httpLog.find(r => r.method === 'GET' && pathOf(r.path) === pathOf(snap.url));
    assert.ok(snapGet, 'late joiner downloaded the snapshot');
    assert.equal(snapGet.status, 200);
    assert.equal(snapGet.resSha256, snapPut.reqSha256, 'snapshot bytes served back unchanged');
    const v1States = await Promise.all([a, b, c].map(p => p.state()));
    const v1Log = assertSameLogs(v1States);
    assertSenderOrder(v1Log, { A: 5, B: 5 });

    // --- persist, leave, restart on the same bucket/prefix, new code version
    await c.persist();
    const saveUrl = (await waitFor(() => proxy.messages({ dir: 'c2s', action: 'SAVE' })[0], { timeout: 20000, what: 'a SAVE frame' })).msg.args.url;
    const savePut = proxy.httpLog.find(r => r.method === 'PUT' && pathOf(r.path) === pathOf(saveUrl));
    assert.ok(savePut && savePut.status >= 200 && savePut.status < 300, `persisted data uploaded (${JSON.stringify(savePut)})`);
    await Promise.all([a, b, c].map(p => p.exit()));
    h.mark('version 1 left');
    await sleep(2000);
    assert.deepEqual(await first.terminate(15000), { code: 0, signal: null }, 'reflector exits 0 on SIGTERM');
    const second = await h.reflector(options);
    proxy.setTarget(second.box);
    h.mark('reflector restarted');

    const [d] = await h.participantsJoined([{ ...common, tag: 'D', code: 2 }]);
    const dState = await d.state();
    assert.notEqual(dState.sessionId, v1States[0].sessionId, 'code version 2 is a different session');
    const [dSync] = proxy.syncsOf(dState.viewId);
    assert.equal(dSync.persisted, true, 'SYNC is flagged persisted');
    assert.equal(dSync.url, saveUrl, 'SYNC url is the persisted data from SAVE');
    const saveGet = proxy.httpLog.find(r => r.method === 'GET' && pathOf(r.path) === pathOf(saveUrl));
    assert.ok(saveGet && saveGet.status === 200, `persisted data downloaded (${JSON.stringify(saveGet)})`);
    assert.equal(saveGet.resSha256, savePut.reqSha256, 'persisted bytes served back unchanged');
    assert.ok(dState.restored, 'init() received persisted data');
    assert.equal(dState.restored.code, 1);
    assert.deepEqual(dState.entries, v1Log, 'version 2 starts with the log of version 1');
    await d.exit();

    // --- the bytes really live in the bucket, under the configured prefix, and nothing went to disk
    const objects = await moto.list(BUCKET, `${prefix}/`);
    assert.ok(objects.length >= 2, `objects under ${prefix}/: ${JSON.stringify(objects)}`);
    const hashes = new Set();
    for (const o of objects) hashes.add(await moto.objectSha256(BUCKET, o.key));
    assert.ok(hashes.has(snapPut.reqSha256), 'the snapshot bytes are stored in S3');
    assert.ok(hashes.has(savePut.reqSha256), 'the persisted bytes are stored in S3');
    assert.deepEqual(fs.readdirSync(cwd), [], 'nothing was written to the working directory');
});
