// Scenario 13: tenant isolation. Two apps share one fleet (`refleet up`, one reflector): real
// @multisynq/client participants of the victim app work in their session while an attacker
// script, which knows the victim's session id, view id and files URL, tries to get in, to
// take a member's place, to plant persisted data, to rewrite or prune stored files, to pose
// as a reflector and to lock the victim's Session with reservations (issue #16, items 1-6 and
// 11-13). Every attempt must fail with a clear refusal, and the victim's users must never be
// refused, their logs and stored files untouched.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { createRequire } from 'node:module';
import { e2eTest } from './lib/harness.mjs';
import { startFleet } from './lib/fleet.mjs';
import { routedParticipant, reflectorCounter, splitToken } from './lib/routed.mjs';
import { sleep, waitFor, withTimeout } from './lib/util.mjs';

const require = createRequire(import.meta.url);
const { WebSocket } = require('ws');

const VICTIM = 'com.victim.e2e';
const ATTACKER = 'com.attacker.e2e';

// One reflector for both apps; the router's per-client reservation limits on (refleet up has
// them off by default, since every local client is the same address).
const CONFIG = `
apiVersion: refleet.dev/v1alpha1
kind: LocalFleet
spec:
  reportIntervalMillis: 300
  joinTokens: true
  tokenTtlSeconds: 30
  reservationsPerClient: 4
  anonymousReservationShare: 0.5
---
apiVersion: refleet.dev/v1alpha1
kind: ReflectorPool
metadata: {name: shared}
spec:
  defaults:
    capacity: {sessions: 20, users: 200}
    minReflectors: 1
    maxReflectors: 1
    warmBuffer: 0
  regions: [{name: local-a}]
  # Clients join through the region's gateway (Route answers its URL).
  gateway: {enabled: true}
---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: lobby}
spec:
  poolRef: {name: shared}
  appId: ${VICTIM}
  name: lobby
  maxUsersPerShard: 40
  scaleUpThreshold: 0.8
---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: public}
spec:
  poolRef: {name: shared}
  appId: ${ATTACKER}
  name: public
  maxUsersPerShard: 40
  scaleUpThreshold: 0.8
`;

/** `GET /v1/route` from loopback address `from` (every 127.x address is this machine). */
function routeFrom(endpoint, session, from) {
    const url = new URL(`v1/route?namespace=default&session=${session}`, endpoint);
    return new Promise((resolve, reject) => {
        const req = http.get({ host: url.hostname, port: url.port, path: `${url.pathname}${url.search}`, localAddress: from }, res => {
            let body = '';
            res.on('data', d => { body += d; });
            res.on('end', () => {
                let json = null;
                try { json = JSON.parse(body); } catch { /* not JSON */ }
                resolve({ status: res.statusCode, body: json });
            });
        });
        req.on('error', reject);
    });
}

/**
 * A raw WebSocket JOIN into `sessionId` at `url` (which ends with '/'), as an attacker would
 * send it. Resolves with {code, reason} when the reflector closes, or {synced: true} on SYNC.
 */
function rawJoin(url, sessionId, args) {
    const ws = new WebSocket(`${url.replace(/^http/, 'ws')}${sessionId}`);
    const done = new Promise((resolve, reject) => {
        ws.on('open', () => ws.send(JSON.stringify({ id: sessionId, action: 'JOIN', args: { version: 1, apiKey: 'none', ...args } })));
        ws.on('message', data => {
            const msg = JSON.parse(data.toString());
            if (msg.action === 'SYNC') {
                ws.close();
                resolve({ synced: true, sync: msg.args });
            }
        });
        ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() }));
        ws.on('error', reject);
    });
    return withTimeout(done, 10000, `the reflector to answer a JOIN into ${sessionId}`);
}

/** A raw session of the attacker's own: JOINs and keeps the socket once SYNCed. */
function rawSession(url, sessionId, args) {
    const ws = new WebSocket(`${url.replace(/^http/, 'ws')}${sessionId}`);
    const synced = new Promise((resolve, reject) => {
        ws.on('open', () => ws.send(JSON.stringify({ id: sessionId, action: 'JOIN', args: { version: 1, apiKey: 'none', ...args } })));
        ws.on('message', data => {
            if (JSON.parse(data.toString()).action === 'SYNC') resolve(ws);
        });
        ws.on('close', code => reject(new Error(`closed ${code} before SYNC`)));
        ws.on('error', reject);
    });
    return withTimeout(synced, 10000, `a SYNC in ${sessionId}`);
}

/** An HTTP request from loopback address `from`; resolves {status, body}. */
function request(method, url, from, body) {
    const u = new URL(url);
    return new Promise((resolve, reject) => {
        const req = http.request({ method, host: u.hostname, port: u.port, path: u.pathname, localAddress: from,
            headers: body ? { 'content-length': Buffer.byteLength(body) } : {} }, res => {
            const chunks = [];
            res.on('data', d => chunks.push(d));
            res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString() }));
        });
        req.on('error', reject);
        req.end(body);
    });
}

/** Every file below `dir` with its contents (relative path -> base64). */
function snapshotTree(dir) {
    const out = {};
    const walk = d => {
        if (!fs.existsSync(d)) return;
        for (const entry of fs.readdirSync(d, { withFileTypes: true })) {
            const p = path.join(d, entry.name);
            if (entry.isDirectory()) walk(p);
            else out[path.relative(dir, p)] = fs.readFileSync(p).toString('base64');
        }
    };
    walk(dir);
    return out;
}

e2eTest('an attacker app on the same fleet cannot join, impersonate, overwrite, pose as a reflector or lock out the victim', { timeout: 180000 }, async (t, h) => {
    const fleet = await startFleet(h, CONFIG);
    const endpoint = fleet.url;
    await waitFor(async () => {
        const list = await Promise.all(['lobby', 'public'].map(s => fleet.shards(s)));
        return list.every(shards => shards.length >= 1 && shards[0].url);
    }, { timeout: 20000, what: 'both Sessions open on the reflector' });
    h.mark(`refleet up at ${endpoint}`);

    // The victim's users: two real clients, working.
    const v1 = routedParticipant(h, { tag: 'v1', route: endpoint, session: 'lobby', appId: VICTIM });
    const v2 = routedParticipant(h, { tag: 'v2', route: endpoint, session: 'lobby', appId: VICTIM });
    const s1 = await v1.waitJoined(30000);
    await v2.waitJoined(30000);
    await v1.send(3);
    await v2.waitForCount(3, 15000);
    const victimSid = s1.sessionId;
    const victimView = s1.viewId;
    // Clients join through the region's gateway; the attacks below that need the reflector
    // itself (no token at all, its /sessions and /metrics) go to its own address.
    const gateway = splitToken(v1.route.reflector).base;
    const base = (await fleet.shards('lobby'))[0].url;
    assert.ok(base && base !== gateway, `lobby's reflector has its own address (${base})`);
    h.mark(`victim joined: session ${victimSid}, view ${victimView}, gateway ${gateway}, reflector ${base}`);
    // The victim's persisted data, uploaded from its clients' address (as its client would).
    const files = v1.route.files;
    const entry = await waitFor(async () => {
        const res = await fetch(new URL('sessions', base));
        return (await res.json()).sessions.find(x => x.sessionId === victimSid);
    }, { what: 'the victim session in /sessions' });
    const victimPid = entry.persistentId;
    const savedPath = `${files}/apps/${VICTIM}/${victimPid}/save/victim-data-hash`;
    const put = await request('PUT', savedPath, '127.0.0.1', 'the victim\'s encrypted data');
    assert.equal(put.status, 201, `the victim's own upload: ${JSON.stringify(put)}`);
    const storageDir = path.join(fleet.dataDir, 'storage');
    const storedBefore = snapshotTree(storageDir);
    const refusals = reason => reflectorCounter(base, 'refleet_reflector_join_refusals_total', { reason });

    // 1. A valid token of the attacker's own app, aimed at the victim's session id.
    const own = await routeFrom(endpoint, 'public', '127.0.0.9');
    assert.equal(own.status, 200, JSON.stringify(own.body));
    const intoVictim = await rawJoin(own.body.reflectorUrl, victimSid, {
        appId: ATTACKER, name: `${ATTACKER}/public`, user: 'mallory', persistentId: 'p',
    });
    assert.equal(intoVictim.code, 4103, `attacker token into the victim's session: ${JSON.stringify(intoVictim)}`);
    // ...and naming the victim's app and shard with that token.
    const posing = await rawJoin(own.body.reflectorUrl, victimSid, {
        appId: VICTIM, name: `${VICTIM}/lobby`, user: 'mallory', persistentId: 'p',
    });
    assert.equal(posing.code, 4103, `attacker token naming the victim's shard: ${JSON.stringify(posing)}`);
    assert.ok(await refusals('wrong_session') >= 1, 'counted as wrong_session');
    h.mark('1: foreign tokens refused');

    // 2. The victim's view id (every member sees it in `users` messages) is no pass: not
    // without a token, and not with a valid token of the victim's own shard either.
    const bare = await rawJoin(base, victimSid, { appId: VICTIM, name: `${VICTIM}/lobby`, user: victimView, persistentId: 'p' });
    assert.equal(bare.code, 4103, `user record without a token: ${JSON.stringify(bare)}`);
    const shardToken = await routeFrom(endpoint, 'lobby', '127.0.0.10');
    assert.equal(shardToken.status, 200);
    const taking = await rawJoin(shardToken.body.reflectorUrl, victimSid, { appId: VICTIM, name: `${VICTIM}/lobby`, user: victimView, persistentId: 'p' });
    assert.equal(taking.code, 4103, `user record with another token: ${JSON.stringify(taking)}`);
    assert.equal(await refusals('view_taken'), 1);
    h.mark('2: the victim view id is no pass');

    // 3. An unadmitted JOIN for a fresh session id looks nothing up and creates nothing.
    const lookups = async () => (await reflectorCounter(base, 'refleet_reflector_persistence_operations_total', { op: 'lookup_hit' }).catch(() => 0))
        + (await reflectorCounter(base, 'refleet_reflector_persistence_operations_total', { op: 'lookup_miss' }).catch(() => 0));
    const lookupsBefore = await lookups();
    const fresh = await rawJoin(base, 'fresh-session-of-the-attacker', { appId: VICTIM, name: `${VICTIM}/lobby`, user: 'mallory', persistentId: 'victim-pid' });
    assert.equal(fresh.code, 4103);
    assert.equal(await lookups(), lookupsBefore, 'no storage look-up for a refused JOIN');
    h.mark('3: nothing looked up before admission');

    // 4/5. A member of the attacker's own session sends SAVE and SNAP naming the victim's
    // files: neither is recorded, and nothing of the victim's is pruned.
    const storedRefusals = async () => {
        const text = await (await fetch(new URL('metrics', base))).text();
        return text.split('\n').filter(l => l.startsWith('refleet_reflector_stored_url_refusals_total'))
            .reduce((sum, l) => sum + Number(l.split(/\s+/).pop()), 0);
    };
    const storedRefusalsBefore = await storedRefusals();
    const mine = await routeFrom(endpoint, 'public', '127.0.0.9');
    const attackerSession = await rawSession(mine.body.reflectorUrl, 'attacker-own-session', {
        appId: ATTACKER, name: `${ATTACKER}/public`, user: 'mallory', persistentId: 'attacker-pid', codeHash: 'c',
    });
    attackerSession.send(JSON.stringify({ id: 'attacker-own-session', action: 'SAVE', args: { persistTime: 1, url: `${files}/apps/${VICTIM}/${victimPid}/save/evil`, dissident: null } }));
    attackerSession.send(JSON.stringify({ id: 'attacker-own-session', action: 'SNAP', args: { time: 1e9, seq: 1, hash: 'h', url: `${files}/apps/${VICTIM}/snap/c/${victimPid}.${victimSid}/1000000000_1.h`, dissident: null } }));
    await waitFor(async () => (await storedRefusals()) >= storedRefusalsBefore + 2, { what: 'the SAVE and SNAP refused' });
    attackerSession.close();
    h.mark('4/5: foreign SAVE and SNAP URLs refused');

    // 6. Overwriting the victim's persisted data over HTTP: refused from another address, and
    // from the victim's own address the first bytes stay (write-once).
    const fromElsewhere = await request('PUT', savedPath, '127.0.0.5', 'evil');
    assert.ok(fromElsewhere.status >= 400, `PUT from a non-member address: ${JSON.stringify(fromElsewhere)}`);
    await request('PUT', savedPath, '127.0.0.1', 'evil');
    const back = await request('GET', savedPath, '127.0.0.5');
    assert.equal(back.body, 'the victim\'s encrypted data', 'persisted data keeps its first bytes');
    h.mark('6: the victim\'s persisted file could not be overwritten');

    // 11/12. A process posing as the fleet's reflector on the report stream, with a forged
    // credential, proposing its own URL: refused, and Route keeps answering the real URL.
    const reportUrl = await waitFor(() => {
        const m = /report stream listening.*url=(\S+)/.exec(fleet.stderr.text);
        return m && m[1];
    }, { timeout: 5000, what: 'the report stream URL in refleet up\'s log' });
    const reflectorName = (await fleet.shards('lobby'))[0].reflector;
    const refusedReports = async () => {
        const res = await fetch(new URL('metrics', endpoint));
        const text = await res.text();
        return text.split('\n').filter(l => l.startsWith('refleet_report_refusals_total'))
            .reduce((sum, l) => sum + Number(l.split(/\s+/).pop()), 0);
    };
    const reportsBefore = await refusedReports();
    const impostor = await h.reflector({
        storage: path.join(h.tempDir(), 'impostor'),
        args: ['--reflector-name', reflectorName, '--region', 'local-a', '--report-url', reportUrl,
            '--public-url', 'ws://127.0.0.1:9499/attacker/', '--report-interval', '200ms'],
        env: { REFLEET_REPORT_TOKEN: `${reflectorName}.local-a.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA` },
    });
    await waitFor(async () => (await refusedReports()) > reportsBefore, { timeout: 10000, what: 'the impostor\'s reports refused' });
    for (let i = 0; i < 10; i++) {
        const r = await routeFrom(endpoint, 'lobby', `127.0.1.${i + 1}`);
        assert.equal(r.status, 200, JSON.stringify(r.body));
        assert.ok(!r.body.reflectorUrl.includes('attacker'), `Route sent a client to ${r.body.reflectorUrl}`);
        assert.equal(splitToken(r.body.reflectorUrl).base, gateway);
    }
    await impostor.kill();
    h.mark('11/12: the impostor reflector was refused; routes go to the real reflector');

    // 13. One address asking again and again holds a few places, then gets 429 that says why;
    // a new victim user is still routed and joins.
    let answered = 0;
    let refused = null;
    for (let i = 0; i < 32; i++) {
        const r = await routeFrom(endpoint, 'lobby', '127.0.0.2');
        if (r.status === 200) answered++;
        else refused = r;
    }
    assert.equal(answered, 4, 'the per-client reservation limit');
    assert.equal(refused.status, 429);
    assert.match(refused.body.message, /limit per client/);
    const v3 = routedParticipant(h, { tag: 'v3', route: endpoint, session: 'lobby', appId: VICTIM });
    await v3.waitJoined(30000);
    h.mark('13: 32 anonymous Routes did not lock the victim out');

    // The victim's users were never refused or replaced, and their log is theirs alone.
    await v2.send(2);
    const want = 5;
    const [f1, f2, f3] = await Promise.all([v1, v2, v3].map(p => p.waitForCount(want, 15000)));
    for (const [tag, s] of [['v1', f1], ['v2', f2], ['v3', f3]]) {
        assert.deepEqual(s.entries, [['v1', 1], ['v1', 2], ['v1', 3], ['v2', 1], ['v2', 2]], `${tag}'s log`);
    }
    for (const p of [v1, v2, v3]) {
        assert.equal(p.closed, null, `${p.tag} was never refused`);
    }
    // Stored files the victim had before are all still there, byte for byte, and no record
    // of the attacker's points into the victim's files.
    const storedAfter = snapshotTree(storageDir);
    assert.ok(Object.keys(storedBefore).some(f => f.includes('victim-data-hash')), 'the victim file is among those checked');
    for (const [file, content] of Object.entries(storedAfter)) {
        if (file.includes(ATTACKER) || file.includes('attacker-pid')) {
            assert.ok(!Buffer.from(content, 'base64').toString().includes(VICTIM), `${file} names the victim`);
        }
    }
    for (const [file, content] of Object.entries(storedBefore)) {
        assert.equal(storedAfter[file], content, `stored file ${file} unchanged`);
    }
    await Promise.all([v1, v2, v3].map(p => p.exit()));
    await sleep(100);
});
