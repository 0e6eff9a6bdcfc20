// Scenario 15: a live shard moves to another reflector while its real clients keep sending.
// The clients joined through the region's gateway; a move asked for by hand (refleet up's
// POST /v1/moves) makes the source store the shard and close its clients with 4003; they
// reconnect to the same gateway URL, which now forwards to the target, and the target resumes
// the shard on the same timeline. Every client must end with the same log, with every
// message and each sender's order intact, without a rebuilt view (a seamless rejoin).
import assert from 'node:assert/strict';
import { e2eTest } from './lib/harness.mjs';
import { startFleet, reflectorsOf } from './lib/fleet.mjs';
import { routedParticipant } from './lib/routed.mjs';
import { sleep, waitFor } from './lib/util.mjs';

// One region with two reflectors kept ready; moves on (rebalancing off: only the move asked
// for happens).
const CONFIG = `
apiVersion: refleet.dev/v1alpha1
kind: LocalFleet
spec:
  reportIntervalMillis: 300
  joinTokens: true
---
apiVersion: refleet.dev/v1alpha1
kind: ReflectorPool
metadata: {name: e2e}
spec:
  defaults:
    capacity: {sessions: 10, users: 100}
    minReflectors: 2
    maxReflectors: 2
    warmBuffer: 0
  regions: [{name: local-a}]
  gateway: {enabled: true}
  moves: {enabled: true, rebalanceAbovePercent: 1000, rebalanceTargetPercent: 70}
---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: lobby}
spec:
  poolRef: {name: e2e}
  appId: io.refleet.e2e
  name: lobby
  maxUsersPerShard: 20
  minShards: 1
  maxShards: 1
`;

const CLIENTS = 6;
const BEFORE = 5;
const DURING = 40;

/** The longest pause between two arrivals of new entries within [from, to] (wall-clock ms). */
function longestGap(arrivals, from, to) {
    const times = arrivals.map(a => a[0]).filter(t => t >= from && t <= to);
    let gap = 0;
    for (let i = 1; i < times.length; i++) gap = Math.max(gap, times[i] - times[i - 1]);
    return gap;
}

e2eTest('a shard moved by hand keeps every message and its clients rejoin seamlessly through the gateway', { timeout: 120000 }, async (t, h) => {
    const fleet = await startFleet(h, CONFIG);
    await waitFor(async () => reflectorsOf(await fleet.status()).filter(r => r.state === 'Ready').length === 2,
        { timeout: 30000, what: 'two ready reflectors' });
    const clients = Array.from({ length: CLIENTS }, (_, i) =>
        routedParticipant(h, { tag: `c${i}`, route: fleet.url, session: 'lobby' }));
    await Promise.all(clients.map(p => p.waitJoined(30000)));
    const gateway = (await fleet.status()).gateways.find(g => g.region === 'local-a').url;
    for (const p of clients) assert.ok(p.route.reflector.startsWith(gateway), `${p.tag} joined through the gateway`);
    const [before] = await fleet.shards('lobby');
    const source = before.reflector;
    const target = reflectorsOf(await fleet.status()).find(r => r.name !== source).name;
    h.mark(`${CLIENTS} clients on ${source}; moving lobby to ${target}`);

    await Promise.all(clients.map(p => p.send(BEFORE)));
    await Promise.all(clients.map(p => p.waitForCount(CLIENTS * BEFORE)));

    // Everyone keeps sending while the shard moves.
    const sending = Promise.all(clients.map(p => p.send(DURING, 50)));
    await sleep(500);
    const asked = Date.now();
    const res = await fetch(new URL('v1/moves', fleet.url), {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ session: 'lobby', shard: 'lobby', to: target }),
    });
    assert.equal(res.status, 202, await res.text());
    await waitFor(async () => {
        const [s] = await fleet.shards('lobby');
        return s.reflector === target && s.state === 'Open';
    }, { timeout: 30000, what: `lobby to land on ${target}` });
    const landed = Date.now();
    // Its clients are on the target now.
    await waitFor(async () => (await fleet.shards('lobby'))[0].users === CLIENTS,
        { timeout: 15000, what: `the ${CLIENTS} clients to report on ${target}` });
    h.mark(`moved in ${landed - asked} ms`);
    await sending;
    const total = CLIENTS * (BEFORE + DURING);
    const states = await Promise.all(clients.map(p => p.waitForCount(total, 40000)));

    // The same log everywhere: every message, each sender's order intact.
    const reference = JSON.stringify(states[0].entries);
    for (const s of states) {
        assert.equal(s.count, total, `${s.tag} has every message`);
        assert.equal(JSON.stringify(s.entries), reference, `${s.tag} has the same log as ${states[0].tag}`);
        for (const p of clients) {
            const own = s.entries.filter(e => e[0] === p.tag).map(e => e[1]);
            assert.deepEqual(own, Array.from({ length: BEFORE + DURING }, (_, i) => i + 1), `${p.tag}'s order in ${s.tag}'s log`);
        }
        assert.equal(s.viewConstructions, 1, `${s.tag} rejoined without rebuilding its view`);
    }
    const gaps = states.map(s => longestGap(s.arrivals, asked - 1000, landed + 5000));
    gaps.sort((a, b) => a - b);
    h.mark(`longest gap per client (ms): ${gaps.join(', ')}`);
    t.diagnostic(`move: asked→landed ${landed - asked} ms; client gaps ms: ${gaps.join(', ')}`);

    // The move is on the record: the planner's decision and the router's counter.
    const status = await fleet.status();
    const decisions = status.decisions.map(d => d.decision).join('\n');
    assert.match(decisions, /MoveShard \{[^\n]*shard: "lobby"[^\n]*reason: Requested/);
    const metrics = await (await fetch(new URL('metrics', fleet.url))).text();
    assert.match(metrics, /^refleet_router_moves_total\{outcome="landed"\} 1$/m);
    await Promise.all(clients.map(p => p.exit()));
});
