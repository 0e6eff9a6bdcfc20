// Scenario 16: `kill -9` of the reflector hosting three shards with real clients. refleet up
// sees its process gone, the planner (moves on) places the shards again on the other
// reflector of the region, the clients reconnect through the region's gateway, and the new
// host resumes each shard from its last checkpoint on a fresh timeline: every client of a
// shard rebuilds from the same state, so each shard's clients end with identical logs. What a
// crash may lose is at most what was sent within one checkpoint interval before it; the test
// counts and reports it.
import assert from 'node:assert/strict';
import { e2eTest } from './lib/harness.mjs';
import { startFleet, reflectorsOf } from './lib/fleet.mjs';
import { routedParticipant } from './lib/routed.mjs';
import { sleep, waitFor } from './lib/util.mjs';

const SHARDS = ['room-1', 'room-2', 'room-3'];
const PER_SHARD = +(process.env.E2E_CRASH_CLIENTS_PER_SHARD || 10);
const BEFORE = 3;
const AT_RISK = 2;
const AFTER = 2;

const CONFIG = `
apiVersion: refleet.dev/v1alpha1
kind: LocalFleet
spec:
  reportIntervalMillis: 300
  joinTokens: true
  reflectorArgs: ["--checkpoint-interval", "1s"]
---
apiVersion: refleet.dev/v1alpha1
kind: ReflectorPool
metadata: {name: e2e}
spec:
  defaults:
    capacity: {sessions: 10, users: 100}
    minReflectors: 2
    maxReflectors: 3
    warmBuffer: 0
  regions: [{name: local-a}]
  placement: Pack
  gateway: {enabled: true}
  moves: {enabled: true, rebalanceAbovePercent: 1000, rebalanceTargetPercent: 70}
${SHARDS.map(name => `---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: ${name}}
spec:
  poolRef: {name: e2e}
  appId: io.refleet.e2e
  name: ${name}
  maxUsersPerShard: ${PER_SHARD}
  scaleUpThreshold: 1
  minShards: 1
  maxShards: 1
`).join('')}`;

e2eTest('after kill -9 of a reflector its shards resume elsewhere from their checkpoints with one log per shard', { timeout: 180000 }, async (t, h) => {
    const fleet = await startFleet(h, CONFIG);
    await waitFor(async () => reflectorsOf(await fleet.status()).filter(r => r.state === 'Ready').length === 2,
        { timeout: 30000, what: 'two ready reflectors' });
    const clients = new Map();
    for (const shard of SHARDS) {
        clients.set(shard, Array.from({ length: PER_SHARD }, (_, i) =>
            routedParticipant(h, { tag: `${shard}-${i}`, route: fleet.url, session: shard })));
    }
    const all = [...clients.values()].flat();
    await Promise.all(all.map(p => p.waitJoined(60000)));
    const status = await fleet.status();
    const hosts = new Set(status.shards.map(s => s.reflector));
    assert.equal(hosts.size, 1, `the three shards are packed on one reflector: ${[...hosts]}`);
    const [victim] = hosts;
    const pid = reflectorsOf(status).find(r => r.name === victim).pid;
    assert.ok(pid, `${victim} has a pid in the status`);
    h.mark(`${all.length} clients in ${SHARDS.length} shards on ${victim} (pid ${pid})`);

    // Checkpointed for sure: sent, seen by everyone, then more than one interval passes.
    await Promise.all(all.map(p => p.send(BEFORE)));
    for (const [, ps] of clients) await Promise.all(ps.map(p => p.waitForCount(PER_SHARD * BEFORE, 30000)));
    await sleep(2500);
    // At risk: sent just before the crash.
    await Promise.all(all.map(p => p.send(AT_RISK)));
    await sleep(100);
    process.kill(pid, 'SIGKILL');
    const killed = Date.now();
    h.mark(`SIGKILL ${victim}`);

    // Declared gone: the router places its shards on another reflector.
    await waitFor(async () => {
        const shards = (await fleet.status()).shards;
        return shards.length === SHARDS.length && shards.every(s => s.reflector && s.reflector !== victim);
    }, { timeout: 30000, interval: 100, what: 'the shards to be placed again' });
    const declared = Date.now();
    h.mark(`shards placed again ${declared - killed} ms after the kill`);

    // Everyone sends again once rejoined; each shard's clients end with one log.
    const finals = new Map();
    const rejoinedAt = [];
    for (const [shard, ps] of clients) {
        // A client is back once it rebuilt its view on the resumed shard's fresh timeline
        // (what it sends before that goes to the old, dead connection).
        await Promise.all(ps.map(p => waitFor(async () => (await p.state()).viewConstructions >= 2,
            { timeout: 30000, interval: 100, what: `${p.tag} to rebuild on the fresh timeline` })));
        await Promise.all(ps.map(p => p.send(AFTER)));
        const expectedAfter = PER_SHARD * AFTER;
        const states = await waitFor(async () => {
            const ss = await Promise.all(ps.map(p => p.state()));
            const done = ss.every(s => s.entries && s.entries.filter(e => e[1] > BEFORE + AT_RISK).length === expectedAfter);
            return done && ss;
        }, { timeout: 60000, interval: 200, what: `every message sent after the crash in ${shard}` });
        rejoinedAt.push(Date.now() - declared);
        finals.set(shard, states);
    }

    let lost = 0;
    let rebuilt = 0;
    for (const [shard, states] of finals) {
        const reference = JSON.stringify(states[0].entries);
        for (const s of states) {
            assert.equal(JSON.stringify(s.entries), reference, `${s.tag} has the same log as ${states[0].tag} (${shard})`);
            if (s.viewConstructions > 1) rebuilt++;
        }
        const entries = states[0].entries;
        for (const p of clients.get(shard)) {
            const own = entries.filter(e => e[0] === p.tag).map(e => e[1]);
            for (let n = 1; n <= BEFORE; n++) assert.ok(own.includes(n), `${p.tag}'s checkpointed message ${n} survived in ${shard}`);
            const sorted = [...own].sort((a, b) => a - b);
            assert.deepEqual(own, sorted, `${p.tag}'s order in ${shard}`);
            lost += AT_RISK - own.filter(n => n > BEFORE && n <= BEFORE + AT_RISK).length;
        }
    }
    const atRisk = all.length * AT_RISK;
    assert.ok(lost <= atRisk, 'only what was sent within the checkpoint window can be lost');
    assert.equal(rebuilt, all.length, 'every client rebuilt from the checkpoint (no silent fork)');
    t.diagnostic(`kill -9 → shards placed again: ${declared - killed} ms; every shard whole again after (ms): ${rejoinedAt.join(', ')}; lost ${lost} of ${atRisk} messages sent < 1 checkpoint interval before the crash; ${rebuilt} of ${all.length} clients rebuilt on the fresh timeline`);
    await Promise.all(all.map(p => p.kill()));
});
