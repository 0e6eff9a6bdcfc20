// @refleet/route against a real `refleet up` (join tokens on), with the real, unmodified
// @multisynq/client 1.1.0 from e2e/node_modules: each client is its own Node process that calls
// route() and passes the result to Session.join (e2e/fixtures/routed-participant.cjs).
// Needs the binaries (cargo build -p refleet-reflector -p refleet-operator, or REFLEET_BIN and
// REFLEET_REFLECTOR_BIN) and `npm ci --ignore-scripts --prefix e2e`.
import assert from 'node:assert/strict';
import { e2eTest, assertSameLogs, assertSenderOrder } from '../../../e2e/lib/harness.mjs';
import { startFleet } from '../../../e2e/lib/fleet.mjs';
import { routedParticipant } from '../../../e2e/lib/routed.mjs';
import { waitFor } from '../../../e2e/lib/util.mjs';
import { route, RouteError } from '../index.js';

// `tiny` has room for one user below its threshold and may not open a second shard, so the
// router answers RESOURCE_EXHAUSTED (HTTP 429 with Retry-After) once that place is reserved.
const CONFIG = `
apiVersion: refleet.dev/v1alpha1
kind: LocalFleet
spec:
  reportIntervalMillis: 300
---
apiVersion: refleet.dev/v1alpha1
kind: ReflectorPool
metadata: {name: js}
spec:
  defaults:
    capacity: {sessions: 10, users: 100}
    minReflectors: 1
    maxReflectors: 1
    warmBuffer: 0
  regions: [{name: local-a}, {name: local-b}]
---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: lobby}
spec:
  poolRef: {name: js}
  appId: io.refleet.jsclient
  name: lobby
  regions: [local-a]
  maxUsersPerShard: 10
  scaleUpThreshold: 0.8
---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: tiny}
spec:
  poolRef: {name: js}
  appId: io.refleet.jsclient
  name: tiny
  regions: [local-a]
  maxUsersPerShard: 2
  scaleUpThreshold: 0.5
  minShards: 1
  maxShards: 1
`;

e2eTest('route() + Session.join: real clients join the routed shard with the token, and router errors arrive as RouteErrors', { timeout: 90000 }, async (t, h) => {
    const fleet = await startFleet(h, CONFIG);
    const endpoint = fleet.url;
    await waitFor(async () => (await fleet.shards('lobby'))[0]?.url && (await fleet.shards('tiny'))[0]?.url,
        { timeout: 20000, what: 'lobby and tiny open' });
    h.mark(`refleet up at ${endpoint}`);

    // Two clients, each: Session.join({...app, ...await route({endpoint, session: 'lobby'})}).
    // The app passes another appId; the route's (which the token is bound to) wins.
    const clients = ['a', 'b'].map(tag => routedParticipant(h, { tag, route: endpoint, session: 'lobby', userId: tag, appId: 'io.refleet.someother' }));
    const states = await Promise.all(clients.map(c => c.waitJoined(40000)));
    h.mark('2 routed clients joined');
    for (const [i, c] of clients.entries()) {
        assert.equal(c.route.name, 'lobby');
        assert.equal(c.route.appId, 'io.refleet.jsclient');
        assert.equal(c.route.files, new URL('files', endpoint).href);
        assert.equal(states[i].name, 'lobby');
    }
    const [shard] = await fleet.shards('lobby');
    assert.ok(clients[0].route.reflector.startsWith(shard.url), 'the route names the reflector that hosts the shard');
    await Promise.all(clients.map(c => c.send(3)));
    const finals = await Promise.all(clients.map(c => c.waitForCount(6, 20000)));
    assertSenderOrder(assertSameLogs(finals), { a: 3, b: 3 });
    await waitFor(async () => (await fleet.shards('lobby'))[0].users === 2, { timeout: 10000, what: 'lobby to count 2 users' });
    h.mark('clients converged');

    // Router errors, as the helper surfaces them.
    await assert.rejects(route({ endpoint, session: 'nope' }), e => e instanceof RouteError && e.code === 'NOT_FOUND' && e.status === 404);
    await assert.rejects(route({ endpoint, session: 'a~b' }), { code: 'INVALID_ARGUMENT', status: 400, field: 'session' });
    await assert.rejects(route({ endpoint, session: 'lobby', region: 'mars' }), { code: 'INVALID_ARGUMENT', status: 400, field: 'preferred_region' });
    await assert.rejects(route({ endpoint, namespace: 'Not_A_Namespace', session: 'lobby' }), { code: 'INVALID_ARGUMENT', field: 'namespace' });

    // tiny: the first route takes the one place below the threshold; the next is told to come
    // back later (429 + Retry-After), and the helper waits that long before its second try.
    const first = await route({ endpoint, session: 'tiny' });
    assert.equal(first.name, 'tiny');
    const refused = await route({ endpoint, session: 'tiny', retries: 0 }).then(() => null, e => e);
    assert.ok(refused instanceof RouteError, 'a RouteError');
    assert.equal(refused.code, 'RESOURCE_EXHAUSTED');
    assert.equal(refused.status, 429);
    assert.ok(refused.retryAfter >= 1000, `Retry-After given (${refused.retryAfter} ms)`);
    const started = Date.now();
    const again = await route({ endpoint, session: 'tiny', retries: 1 }).then(() => null, e => e);
    const took = Date.now() - started;
    assert.equal(again.code, 'RESOURCE_EXHAUSTED');
    assert.equal(again.attempts, 2);
    assert.ok(took >= again.retryAfter, `the helper waited Retry-After (${again.retryAfter} ms) before trying again (took ${took} ms)`);
    h.mark(`tiny: 429 with Retry-After ${refused.retryAfter} ms, honoured`);

    await Promise.all(clients.map(c => c.exit()));
});
