// Scenario 3: leaving and joining again, and a dropped connection followed by a seamless rejoin.
import assert from 'node:assert/strict';
import { e2eTest, assertSameLogs, assertSenderOrder } from './lib/harness.mjs';
import { sleep, waitFor } from './lib/util.mjs';

/** The `users` meta messages the proxy saw reflected to the client with viewId `user`. */
function usersMessagesSeenBy(proxy, user) {
    const conns = new Set(proxy.connsOfUser(user).map(c => c.conn));
    return proxy.messages({ dir: 's2c', action: 'RECV' })
        .filter(f => conns.has(f.conn) && f.msg.args[2] && f.msg.args[2].what === 'users')
        .map(f => f.msg.args[2]);
}

e2eTest('a client that leaves and joins again receives the current state and everyone converges', { timeout: 120000 }, async (t, h) => {
    const proxy = await h.proxy();
    const reflector = await h.reflector({ storage: `file://${h.tempDir()}`, filesUrl: proxy.filesUrl });
    proxy.setTarget(reflector.box);
    const session = h.sessionName('leave');
    const common = { box: proxy.box, session, tps: 10 };
    const [a, b, c] = await h.participantsJoined(['A', 'B', 'C'].map(tag => ({ ...common, tag })));
    h.mark('A, B, C joined');

    await Promise.all([a, b, c].map(p => p.send(2, 30)));
    await Promise.all([a, b, c].map(p => p.waitForCount(6)));
    const cFirst = await c.state();

    await c.leave();
    h.mark('C left');
    const cConn = proxy.connsOfUser(cFirst.viewId)[0];
    await waitFor(() => cConn.closed, { timeout: 5000, what: "C's connection to close" });
    assert.deepEqual([cConn.closed.by, cConn.closed.code], ['client', 1000], 'Session.leave() closes with 1000');

    // The others keep going while C is away; the reflector reports C as gone.
    await Promise.all([a.send(3, 30), b.send(3, 30)]);
    await Promise.all([a.waitForCount(12), b.waitForCount(12)]);
    const aState = await a.state();
    await waitFor(() => usersMessagesSeenBy(proxy, aState.viewId).some(u => (u.left || []).includes(cFirst.viewId)),
        { timeout: 10000, what: `a users message reporting ${cFirst.viewId} as left` });
    h.mark('C reported as left');

    const cSecond = await c.join();
    h.mark('C joined again');
    assert.notEqual(cSecond.viewId, cFirst.viewId, 'a new Session.join is a new view');
    const rejoined = await c.waitForCount(12);
    assert.equal(rejoined.viewConstructions, 2, 'C built a second view for its second join');
    const cSyncs = proxy.syncsOf(cSecond.viewId);
    assert.equal(cSyncs.length, 1, "C's second join got one SYNC");

    await Promise.all([a, b, c].map(p => p.send(1)));
    const states = await Promise.all([a, b, c].map(p => p.waitForCount(15)));
    for (const s of states) assert.equal(s.count, 15, `${s.tag} entry count`);
    const log = assertSameLogs(states);
    assertSenderOrder(log, { A: 6, B: 6, C: 3 });
    await Promise.all([a, b, c].map(p => p.exit()));
});

e2eTest('a dropped connection is followed by a seamless rejoin on the same timeline', { timeout: 120000 }, async (t, h) => {
    const proxy = await h.proxy();
    const reflector = await h.reflector({ storage: `file://${h.tempDir()}`, filesUrl: proxy.filesUrl });
    proxy.setTarget(reflector.box);
    const session = h.sessionName('drop');
    // rejoinLimit: how long the client keeps its view while reconnecting (client default 1000 ms);
    // raised so that the deliberate reconnect delay below cannot make a slow machine reboot the view.
    const common = { box: proxy.box, session, tps: 10, rejoinLimit: 5000 };
    const [a, b] = await h.participantsJoined(['A', 'B'].map(tag => ({ ...common, tag })));
    await Promise.all([a.send(2, 30), b.send(2, 30)]);
    await Promise.all([a.waitForCount(4), b.waitForCount(4)]);
    const aBefore = await a.state();

    const [firstConn] = proxy.connsOfUser(aBefore.viewId);
    // Hold A's reconnection for a while so that the session moves on without it.
    proxy.holdUpgrades(1500);
    proxy.drop(firstConn.conn);
    h.mark("A's connection dropped");
    await waitFor(() => proxy.events.some(e => e.event === 'upgrade' && e.conn > firstConn.conn),
        { timeout: 5000, what: 'A to try to reconnect' });
    h.mark('A is reconnecting');
    // B's events while A is away reach A through its rejoin SYNC; A's own events are buffered
    // by its client until it has rejoined. (Events published in the instant between the drop and
    // the client noticing it are lost by the client itself, which is why we wait for the retry.)
    await b.send(3, 20);
    await b.waitForCount(7, 5000);
    await a.send(2, 20);
    const afterDrop = await Promise.all([a.waitForCount(9), b.waitForCount(9)]);
    h.mark('all events delivered after the rejoin');

    const aConns = proxy.connsOfUser(aBefore.viewId);
    assert.equal(aConns.length, 2, 'A reconnected exactly once');
    const syncs = proxy.syncsOf(aBefore.viewId);
    assert.equal(syncs.length, 2, 'A received a SYNC on each connection');
    assert.ok(syncs[0].timeline, 'SYNC carries a timeline');
    assert.equal(syncs[1].timeline, syncs[0].timeline, 'the rejoin SYNC is on the same timeline');
    assert.ok(syncs[1].time >= syncs[0].time, 'teatime does not go backwards');
    const caughtUp = syncs[1].messages.filter(m => typeof m[2] === 'string').length;
    assert.ok(caughtUp >= 3, `the rejoin SYNC carries the events sent while A was away (got ${caughtUp} client messages)`);
    assert.equal(afterDrop[0].viewConstructions, 1, "A's view was not rebuilt (seamless rejoin)");
    assert.equal(afterDrop[0].viewDetaches, 0, "A's view was never detached");

    // Past the leave delay of the dropped socket (rejoinLimit + 250 ms + batching), things keep
    // working and A's model never dropped its view.
    await sleep(6000);
    await Promise.all([a.send(1), b.send(1)]);
    const states = await Promise.all([a.waitForCount(11), b.waitForCount(11)]);
    for (const s of states) assert.equal(s.count, 11, `${s.tag} entry count`);
    assert.equal(states[0].viewConstructions, 1, "A's view still the original one");
    const log = assertSameLogs(states);
    assertSenderOrder(log, { A: 5, B: 6 });
    await Promise.all([a, b].map(p => p.exit()));
});
