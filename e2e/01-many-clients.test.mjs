// Scenario 1: many real clients in one session, all sending concurrently.
import assert from 'node:assert/strict';
import { e2eTest, assertSameLogs, assertSenderOrder } from './lib/harness.mjs';

const CLIENTS = Number(process.env.E2E_CLIENTS || 20);
const EVENTS = Number(process.env.E2E_EVENTS || 10);

e2eTest(`${CLIENTS} clients each send ${EVENTS} events concurrently and end with identical logs`, { timeout: 180000 }, async (t, h) => {
    const reflector = await h.reflector({ storage: `file://${h.tempDir()}` });
    h.mark(`reflector up at ${reflector.box}`);
    for (const path of ['/healthz', '/readyz']) {
        assert.equal((await reflector.get(path)).status, 200, `${path} answers 200`);
    }
    // Half of the clients use the box URL the reflector printed, the other half go through the
    // recording proxy, so the wire checks also cover a busy session.
    const proxy = await h.proxy(reflector.box);
    const session = h.sessionName('crowd');
    const participants = await h.participantsJoined(Array.from({ length: CLIENTS }, (_, i) => ({
        box: i % 2 ? proxy.box : reflector.box, session, tag: `c${String(i + 1).padStart(2, '0')}`, tps: 10, stepMs: 30,
    })), 90000);
    h.mark(`${CLIENTS} clients joined`);

    const joinedStates = await Promise.all(participants.map(p => p.state()));
    const sessionIds = new Set(joinedStates.map(s => s.sessionId));
    assert.equal(sessionIds.size, 1, 'all clients should be in the same session');

    await Promise.all(participants.map(p => p.send(EVENTS, 25)));
    h.mark('all events published');

    const total = CLIENTS * EVENTS;
    const states = await Promise.all(participants.map(p => p.waitForCount(total, 60000)));
    h.mark(`all clients have ${total} entries`);

    for (const s of states) assert.equal(s.count, total, `${s.tag} should have exactly ${total} entries`);
    const log = assertSameLogs(states);
    const expected = Object.fromEntries(participants.map(p => [p.tag, EVENTS]));
    assertSenderOrder(log, expected);
    // Everyone saw the session from a single view construction (no reboot along the way).
    for (const s of states) assert.equal(s.viewConstructions, 1, `${s.tag} view constructions`);

    const finals = await Promise.all(participants.map(p => p.exit()));
    assertSameLogs(finals);
    h.mark('all clients left');
    const metrics = await reflector.get('/metrics');
    assert.equal(metrics.status, 200, '/metrics answers 200');
    assert.match(metrics.text, /_total[{ ]/, '/metrics is Prometheus text with counters');
});
