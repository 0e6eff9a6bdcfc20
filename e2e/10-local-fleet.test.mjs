// Scenario 10: `refleet up` scales a session out with real clients and back in after they leave.
// The clients ask the router where to join (join tokens are on, as by default): the router's
// reservations count as load, so the planner opens the second shard once three users are routed
// to the first, and the fourth user is routed to it.
import assert from 'node:assert/strict';
import { e2eTest } from './lib/harness.mjs';
import { startFleet, reflectorsOf } from './lib/fleet.mjs';
import { routedParticipant } from './lib/routed.mjs';
import { waitFor } from './lib/util.mjs';

// One region; a reflector carries one shard of 4 users, so a second shard needs a second
// reflector. Short idle and cool-down periods so the scale-in happens within seconds.
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
    capacity: {sessions: 10, users: 4}
    minReflectors: 1
    maxReflectors: 3
    warmBuffer: 0
  regions: [{name: local-a}]
  # Clients join through the region's gateway (Route answers its URL).
  gateway: {enabled: true}
  drainGracePeriodSeconds: 5
  scaleDownCooldownSeconds: 4
---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: lobby}
spec:
  poolRef: {name: e2e}
  appId: io.refleet.e2e
  name: lobby
  maxUsersPerShard: 4
  scaleUpThreshold: 0.75
  closeIdleShardsAfterSeconds: 2
`;

e2eTest('refleet up opens a second shard on a second reflector past the threshold and drains it after the clients leave', { timeout: 120000 }, async (t, h) => {
    const fleet = await startFleet(h, CONFIG);
    h.mark(`refleet up at ${fleet.url}`);

    const [shard0] = await waitFor(async () => {
        const shards = await fleet.shards('lobby');
        return shards.length === 1 && shards[0].state === 'Open' && shards[0].url && shards;
    }, { timeout: 20000, what: 'shard 0 open on a ready reflector' });
    assert.equal(shard0.shard, 'lobby');
    assert.equal(shard0.region, 'local-a');
    assert.equal(reflectorsOf(await fleet.status()).length, 1, 'one reflector before any load');
    h.mark(`shard 0 on ${shard0.reflector} at ${shard0.url}`);
    const gateway = (await fleet.status()).gateways.find(g => g.region === 'local-a').url;

    // Three users reach the threshold (0.75 × 4).
    const crowd = ['a', 'b', 'c'].map(tag => routedParticipant(h, { tag, route: fleet.url, session: 'lobby' }));
    await Promise.all(crowd.map(p => p.waitJoined(30000)));
    for (const p of crowd) {
        assert.equal(p.route.name, 'lobby', `${p.tag} is routed to shard 0`);
        assert.ok(p.route.reflector.startsWith(gateway), `${p.tag} joins through the region's gateway`);
    }
    h.mark('3 clients routed to and joined shard 0');

    const shards = await waitFor(async () => {
        const list = await fleet.shards('lobby');
        const s1 = list.find(s => s.shard === 'lobby~1');
        return s1 && s1.url && list;
    }, { timeout: 20000, what: 'shard lobby~1 placed on a ready reflector' });
    const s1 = shards.find(s => s.shard === 'lobby~1');
    assert.equal(shards.find(s => s.shard === 'lobby').users, 3, 'shard 0 counts its 3 users');
    assert.notEqual(s1.reflector, shard0.reflector, 'the second shard needs a second reflector');
    assert.notEqual(s1.url, shard0.url);
    const ready = reflectorsOf(await fleet.status()).filter(r => r.state === 'Ready');
    assert.equal(ready.length, 2, 'two reflector processes');
    h.mark(`shard lobby~1 on ${s1.reflector} at ${s1.url}`);

    // The next user is routed to the new shard on the new reflector, and its load is seen.
    const d = [routedParticipant(h, { tag: 'd', route: fleet.url, session: 'lobby' })];
    await d[0].waitJoined(30000);
    assert.equal(d[0].route.name, 'lobby~1', 'd is routed to the new shard');
    assert.ok(d[0].route.reflector.startsWith(gateway), 'd joins through the same gateway address');
    await waitFor(async () => (await fleet.shards('lobby')).find(s => s.shard === 'lobby~1')?.users === 1,
        { timeout: 10000, what: 'lobby~1 (on the second reflector) to report 1 user' });
    h.mark('client d on lobby~1');

    await Promise.all([...crowd, ...d].map(p => p.exit()));
    h.mark('all clients left');

    const settled = await waitFor(async () => {
        const status = await fleet.status();
        const reflectors = reflectorsOf(status);
        return status.shards.length === 1 && reflectors.length === 1 && status;
    }, { timeout: 40000, interval: 200, what: 'the extra shard to close and the extra reflector to drain away' });
    assert.equal(settled.shards[0].name, 'lobby');
    assert.equal(reflectorsOf(settled)[0].name, shard0.reflector, 'the first reflector stays');
    h.mark('back to one shard on one reflector');
    const decisions = settled.decisions.map(d => d.decision).join('\n');
    assert.match(decisions, /OpenShard \{ session: "default\/io.refleet.e2e\/lobby", shard: "lobby~1", [^\n]*reason: AllShardsAtThreshold/,
        'the planner opened the second shard because the first reached its threshold');
    assert.match(decisions, /DrainReflector \{ reflector: "local-a-2", reason: Surplus/);
    assert.match(decisions, /CloseShard \{ session: "default\/io.refleet.e2e\/lobby", shard: "lobby~1", reason: Idle/);

    // The drained reflector's process is gone.
    await assert.rejects(fetch(new URL('healthz', s1.url)), 'the drained reflector no longer answers');

    // SIGTERM stops refleet up and its remaining reflector cleanly.
    const exit = await fleet.stop();
    assert.deepEqual(exit, { code: 0, signal: null });
    await assert.rejects(fetch(new URL('healthz', shard0.url)), 'every reflector stopped with refleet up');
    h.mark('refleet up stopped');
});
