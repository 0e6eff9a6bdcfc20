// Scenario 12: join tokens at the reflector, with the real client. A routed client is admitted;
// clients that join without a token, with another shard's token, with a tampered token or with
// an expired one are refused with close 4103, which the client treats as final (it does not
// try again), and the reflector counts each refusal under its reason.
import assert from 'node:assert/strict';
import { e2eTest } from './lib/harness.mjs';
import { startFleet } from './lib/fleet.mjs';
import { routedParticipant, reflectorCounter, splitToken } from './lib/routed.mjs';
import { sleep, waitFor } from './lib/util.mjs';
import { route } from '../clients/js/index.js';

// Tokens live 3 s (so that the expired case is quick); two sessions on one reflector.
const CONFIG = `
apiVersion: refleet.dev/v1alpha1
kind: LocalFleet
spec:
  reportIntervalMillis: 300
  joinTokens: true
  tokenTtlSeconds: 3
---
apiVersion: refleet.dev/v1alpha1
kind: ReflectorPool
metadata: {name: e2e}
spec:
  defaults:
    capacity: {sessions: 10, users: 100}
    minReflectors: 1
    maxReflectors: 1
    warmBuffer: 0
  regions: [{name: local-a}]
---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: lobby}
spec:
  poolRef: {name: e2e}
  appId: io.refleet.e2e
  name: lobby
  maxUsersPerShard: 10
  scaleUpThreshold: 0.8
---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: arena}
spec:
  poolRef: {name: e2e}
  appId: io.refleet.e2e
  name: arena
  maxUsersPerShard: 10
  scaleUpThreshold: 0.8
`;

const REASONS = ['missing_token', 'invalid_token', 'expired_token', 'wrong_shard', 'shard_full'];

/** The token with one character of its claims part changed (still well-formed base64url). */
function tamper(token) {
    const dot = token.indexOf('.');
    const i = Math.floor(dot / 2);
    const c = token[i] === 'A' ? 'B' : 'A';
    return token.slice(0, i) + c + token.slice(i + 1);
}

e2eTest('the reflector refuses a first JOIN without a valid token for its shard with 4103, and the client gives up', { timeout: 90000 }, async (t, h) => {
    const fleet = await startFleet(h, CONFIG);
    const endpoint = fleet.url;
    await waitFor(async () => {
        const list = await Promise.all(['lobby', 'arena'].map(s => fleet.shards(s)));
        return list.every(shards => shards.length === 1 && shards[0].url);
    }, { timeout: 20000, what: 'lobby and arena open on the reflector' });
    h.mark(`refleet up at ${endpoint}`);

    // A client routed to lobby is admitted.
    const good = routedParticipant(h, { tag: 'routed', route: endpoint, session: 'lobby' });
    const goodState = await good.waitJoined(30000);
    assert.equal(goodState.name, 'lobby');
    const { base } = splitToken(good.route.reflector);
    const files = good.route.files;
    const counts = async () => Object.fromEntries(await Promise.all(REASONS.map(async r => [r, await reflectorCounter(base, 'refleet_reflector_join_refusals_total', { reason: r })])));
    const before = await counts();
    assert.deepEqual(before, Object.fromEntries(REASONS.map(r => [r, 0])), 'the routed client was not refused');
    h.mark('routed client admitted');

    // Bad tokens, each from the real client. Routes for the other cases come from the helper.
    const forArena = await route({ endpoint, session: 'arena' });
    const forLobby = await route({ endpoint, session: 'lobby' });
    const expiring = await route({ endpoint, session: 'lobby' });
    assert.equal(forArena.name, 'arena');
    assert.equal(splitToken(forArena.reflector).base, base, 'arena shares the reflector');
    const cases = [
        { tag: 'no-token', reason: 'missing_token', reflector: base },
        { tag: 'other-shard', reason: 'wrong_shard', reflector: forArena.reflector },
        {
            tag: 'tampered', reason: 'invalid_token',
            reflector: `${base}${tamper(splitToken(forLobby.reflector).token)}/`,
        },
    ];
    const refused = cases.map(c => ({
        ...c,
        client: routedParticipant(h, { tag: c.tag, reflector: c.reflector, files, name: 'lobby', appId: 'io.refleet.e2e' }),
    }));
    // The expired one joins once its token is past its expiry.
    const wait = expiring.expiresAt.getTime() + 1200 - Date.now();
    h.mark(`waiting ${wait} ms for a token to expire`);
    await sleep(Math.max(0, wait));
    refused.push({
        tag: 'expired', reason: 'expired_token', reflector: expiring.reflector,
        client: routedParticipant(h, { tag: 'expired', reflector: expiring.reflector, files, name: 'lobby', appId: 'io.refleet.e2e' }),
    });

    for (const c of refused) {
        const r = await c.client.waitRefused(30000);
        assert.equal(r.code, 4103, `${c.tag}: close code (${r.reason})`);
        h.mark(`${c.tag}: refused with ${r.code} "${r.reason}"`);
    }
    // Exactly one refusal per case: 4103 is final, the client does not come back.
    await sleep(1500);
    const after = await counts();
    const want = { ...before };
    for (const c of refused) want[c.reason] += 1;
    assert.deepEqual(after, want, 'one refusal per bad token, each under its reason');
    for (const c of refused) assert.ok(c.client.running && !c.client.lines.some(l => l.type === 'joined'), `${c.tag} never joined`);

    // The admitted client was not disturbed, and nobody else got into lobby.
    await good.send(2);
    const state = await good.waitForCount(2, 10000);
    assert.deepEqual(state.entries, [['routed', 1], ['routed', 2]]);
    const lobby = (await fleet.shards('lobby'))[0];
    assert.equal(lobby.users, 1, 'lobby holds only the routed client');
    await good.exit();
});
