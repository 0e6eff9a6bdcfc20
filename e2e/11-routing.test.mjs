// Scenario 11: 25 real clients ask `refleet up`'s router where to join (with the @refleet/route
// helper) and join with the signed token it hands out. Shards fill to the threshold one after
// another, none ever holds more than its cap at the reflectors, and every shard converges.
import assert from 'node:assert/strict';
import { e2eTest, assertSameLogs, assertSenderOrder } from './lib/harness.mjs';
import { startFleet, reflectorsOf } from './lib/fleet.mjs';
import { routedParticipant, reflectorCounter, watchShardUsers } from './lib/routed.mjs';
import { sleep, waitFor } from './lib/util.mjs';

const CLIENTS = 25;
const CAP = 10;
const EVENTS = 3;

// One region and one reflector with room for ten shards (each commits its cap of 10 users), so
// new shards open on the warm reflector at once. Join tokens are on (refleet up's default).
const CONFIG = `
apiVersion: refleet.dev/v1alpha1
kind: LocalFleet
spec:
  reportIntervalMillis: 300
  joinTokens: true
  tokenTtlSeconds: 60
---
apiVersion: refleet.dev/v1alpha1
kind: ReflectorPool
metadata: {name: e2e}
spec:
  defaults:
    capacity: {sessions: 20, users: 100}
    minReflectors: 1
    maxReflectors: 2
    warmBuffer: 0
  regions: [{name: local-a}]
  # Clients join through the region's gateway (Route answers its URL).
  gateway: {enabled: true}
---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: crowd}
spec:
  poolRef: {name: e2e}
  appId: io.refleet.e2e
  name: crowd
  maxUsersPerShard: ${CAP}
  scaleUpThreshold: 0.8
  minShards: 1
  maxShards: 8
  closeIdleShardsAfterSeconds: 30
`;

const REFUSALS = ['missing_token', 'invalid_token', 'expired_token', 'wrong_shard', 'shard_full'];

e2eTest(`${CLIENTS} routed clients fill shards to the threshold, never over the cap, and each shard converges`, { timeout: 120000 }, async (t, h) => {
    const fleet = await startFleet(h, CONFIG);
    await waitFor(async () => {
        const shards = await fleet.shards('crowd');
        return shards.length === 1 && shards[0].state === 'Open' && shards[0].url;
    }, { timeout: 20000, what: 'shard 0 of crowd open on a ready reflector' });
    h.mark(`refleet up at ${fleet.url}, shard 0 open`);

    // Users per shard as the reflectors count them, polled all through the run; refleet up's
    // own view (from the same reports) is watched too.
    const reflectorUrls = async () => reflectorsOf(await fleet.status()).map(r => r.url).filter(Boolean);
    const watch = watchShardUsers(reflectorUrls, { interval: 25 });
    const statusPeaks = new Map();
    let watchingStatus = true;
    const statusLoop = (async () => {
        while (watchingStatus) {
            try {
                for (const s of (await fleet.status()).shards) statusPeaks.set(s.name, Math.max(statusPeaks.get(s.name) || 0, s.users));
            } catch { /* refleet up busy; next poll */ }
            await new Promise(r => setTimeout(r, 100));
        }
    })();

    const stopWatching = async () => {
        watchingStatus = false;
        await statusLoop;
        return watch.stop();
    };
    try {
        await crowdScenario(h, fleet, watch, statusPeaks, stopWatching);
    } finally {
        await stopWatching();
    }
});

async function crowdScenario(h, fleet, watch, statusPeaks, stopWatching) {
    // Every client routes and joins on its own, started 50 ms apart (so that 25 Node processes
    // loading the client do not starve each other on a small machine); they route and join
    // while the others are still starting.
    const tags = Array.from({ length: CLIENTS }, (_, i) => `c${String(i + 1).padStart(2, '0')}`);
    const clients = [];
    for (const tag of tags) {
        clients.push(routedParticipant(h, { tag, route: fleet.url, session: 'crowd', userId: `user-${tag}` }));
        await sleep(50);
    }
    const joined = await Promise.all(clients.map(c => c.waitJoined(60000)));
    h.mark(`${CLIENTS} clients routed and joined`);

    // Routes: tokens in the URL, the pool's files URL, the Session's appId; shards filled to
    // the threshold (0.8 × 10 = 8) in turn: 8 + 8 + 8 + 1.
    const filesUrl = new URL('files', fleet.url).href;
    for (const c of clients) {
        const r = c.route;
        assert.match(r.name, /^crowd(~\d+)?$/, `${c.tag}: shard name`);
        assert.equal(r.shard, r.name);
        assert.equal(r.appId, 'io.refleet.e2e');
        assert.equal(r.region, 'local-a');
        assert.equal(r.files, filesUrl);
        assert.match(r.reflector, /^https?:\/\/127\.0\.0\.1:\d+\/[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\/$/, `${c.tag}: reflector URL ends with /<token>/`);
        assert.ok(Date.parse(r.expiresAt) > Date.now(), `${c.tag}: token still valid`);
    }
    const groups = new Map();
    for (const c of clients) {
        if (!groups.has(c.route.name)) groups.set(c.route.name, []);
        groups.get(c.route.name).push(c);
    }
    const sizes = Object.fromEntries([...groups].map(([name, list]) => [name, list.length]));
    h.mark(`shards: ${JSON.stringify(sizes)}`);
    assert.ok(groups.size >= 4, `at least 4 shards, got ${JSON.stringify(sizes)}`);
    assert.deepEqual(Object.values(sizes).sort((a, b) => b - a), [8, 8, 8, 1], 'shards fill to the threshold one after another');
    for (const [i, state] of joined.entries()) assert.equal(state.name, clients[i].route.name, `${clients[i].tag} joined the shard it was routed to`);

    // Each shard converges on the same log holding exactly its own clients' events.
    await Promise.all(clients.map(c => c.send(EVENTS)));
    for (const [name, list] of groups) {
        const states = await Promise.all(list.map(c => c.waitForCount(EVENTS * list.length, 30000)));
        const entries = assertSameLogs(states);
        assertSenderOrder(entries, Object.fromEntries(list.map(c => [c.tag, EVENTS])), `shard ${name}`);
    }
    h.mark('every shard converged');

    // The reflectors saw every client, and never more than the cap on a shard.
    await waitFor(() => [...groups].every(([name, list]) => watch.peaks.get(name) === list.length),
        { timeout: 10000, what: 'the reflectors to count every client', interval: 100 })
        .catch(err => { throw new Error(`${err.message}; peaks ${JSON.stringify(Object.fromEntries(watch.peaks))}, expected ${JSON.stringify(sizes)}`); });
    const { peaks, polls, errors } = await stopWatching();
    h.mark(`${polls} polls of the reflectors' /sessions (${errors} failed); peaks ${JSON.stringify(Object.fromEntries(peaks))}`);
    assert.ok(polls >= 20, `the reflectors were polled often (${polls} polls)`);
    for (const [name, peak] of peaks) assert.ok(peak <= CAP, `shard ${name} peaked at ${peak} users at the reflectors, over its cap of ${CAP}`);
    for (const [name, peak] of statusPeaks) assert.ok(peak <= CAP, `shard ${name} peaked at ${peak} users in refleet up's status`);
    for (const [name, list] of groups) assert.equal(peaks.get(name), list.length, `shard ${name} counted at its reflector`);

    // Nobody was refused.
    const status = await fleet.status();
    for (const r of reflectorsOf(status).filter(x => x.url)) {
        for (const reason of REFUSALS) {
            assert.equal(await reflectorCounter(r.url, 'refleet_reflector_join_refusals_total', { reason }), 0, `${r.name}: no ${reason} refusals`);
        }
    }
    assert.deepEqual(status.shards.map(s => s.name).sort(), [...groups.keys()].sort(), 'refleet up knows exactly the routed shards');

    await Promise.all(clients.map(c => c.exit()));
    h.mark('all clients left');
}
