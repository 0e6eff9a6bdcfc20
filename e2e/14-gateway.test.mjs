// Scenario 14: the regional gateway with the real client. Clients routed by `refleet up` join
// through its in-process gateway (Route answers the gateway's URL, never a reflector's) and
// exchange events; bad upgrades get their HTTP status at the gateway. Then a standalone
// `refleet gateway` follows refleet up's placement watch; clients joined through it keep
// their session across a restart of that gateway: they reconnect by themselves and go on.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import http from 'node:http';
import path from 'node:path';
import { e2eTest, assertSameLogs } from './lib/harness.mjs';
import { startFleet, refleetBinary } from './lib/fleet.mjs';
import { routedParticipant, splitToken } from './lib/routed.mjs';
import { LogTail, freePort, sleep, waitFor, withTimeout } from './lib/util.mjs';

const CONFIG = `
apiVersion: refleet.dev/v1alpha1
kind: LocalFleet
spec:
  reportIntervalMillis: 300
  joinTokens: true
  tokenTtlSeconds: 120
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
  gateway: {enabled: true}
  drainGracePeriodSeconds: 5
---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: hall}
spec:
  poolRef: {name: e2e}
  appId: io.refleet.e2e
  name: hall
  maxUsersPerShard: 10
  scaleUpThreshold: 0.8
  minShards: 1
  maxShards: 2
  closeIdleShardsAfterSeconds: 60
`;

/** The HTTP status an upgrade request to `url` gets (without completing any upgrade). */
function upgradeStatus(url) {
    return new Promise((resolve, reject) => {
        const req = http.get(url, {
            headers: {
                Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Version': '13',
                'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==',
            },
        });
        req.on('response', res => { res.resume(); resolve(res.statusCode); });
        req.on('upgrade', (res, socket) => { socket.destroy(); resolve(res.statusCode); });
        req.on('error', reject);
        req.setTimeout(10000, () => req.destroy(new Error(`no answer from ${url}`)));
    });
}

/** Starts `refleet gateway` on `port`; resolves once it printed its URL. */
async function startGateway(h, { port, router, credentialFile, files, tag }) {
    const stderr = new LogTail();
    const proc = spawn(refleetBinary(), ['gateway', '--region', 'local-a', '--router', router,
        '--credential-file', credentialFile, '--listen', `127.0.0.1:${port}`,
        '--metrics-listen', '127.0.0.1:0', '--files-url', files], {
        env: { RUST_LOG: 'info', NO_COLOR: '1', ...process.env },
        stdio: ['ignore', 'pipe', 'pipe'],
    });
    proc.stderr.on('data', d => stderr.push(d));
    h.trackProcess(tag, proc, stderr);
    const exited = new Promise(resolve => proc.on('exit', (code, signal) => resolve({ code, signal })));
    const [url, metrics] = await withTimeout(new Promise((resolve, reject) => {
        let out = '';
        proc.stdout.on('data', chunk => {
            out += chunk.toString();
            const g = /^gateway:\s*(\S+)\s*$/m.exec(out);
            const m = /^metrics:\s*(\S+)\s*$/m.exec(out);
            if (g && m) resolve([g[1], m[1]]);
        });
        exited.then(s => reject(new Error(`refleet gateway exited (${JSON.stringify(s)}); stderr:\n${stderr.tail()}`)));
    }), 20000, 'refleet gateway to print its URLs');
    /** A sample of its /metrics, e.g. `refleet_gateway_connections{region="local-a"}`. */
    const sample = async (series) => {
        const text = await (await fetch(metrics)).text();
        const line = text.split('\n').find(l => l.startsWith(`${series} `));
        return line ? Number(line.split(' ').pop()) : NaN;
    };
    return { url, proc, exited, stderr, sample };
}

async function route(endpoint, userId) {
    const res = await fetch(new URL(`v1/route?namespace=default&session=hall&userId=${userId}`, endpoint));
    assert.equal(res.status, 200, await res.clone().text());
    return res.json();
}

e2eTest('clients join through the gateway, bad upgrades stop there, and a gateway restart is survived', { timeout: 120000 }, async (t, h) => {
    const fleet = await startFleet(h, CONFIG);
    await waitFor(async () => {
        const shards = await fleet.shards('hall');
        return shards.length === 1 && shards[0].url;
    }, { timeout: 20000, what: 'hall open on a ready reflector' });
    const status = await fleet.status();
    const gateway = status.gateways.find(g => g.region === 'local-a')?.url;
    assert.ok(gateway, `refleet up runs a gateway for local-a: ${JSON.stringify(status.gateways)}`);
    assert.match(fleet.stdout.text, new RegExp(`^gateway: local-a ${gateway}$`, 'm'), 'the banner names it');
    const reflectorUrl = (await fleet.shards('hall'))[0].url;
    h.mark(`refleet up at ${fleet.url}, gateway ${gateway}, hall on ${reflectorUrl}`);

    // 1. Routed clients get the gateway's URL and exchange events through it.
    const a = routedParticipant(h, { tag: 'a', route: fleet.url, session: 'hall', userId: 'a' });
    const b = routedParticipant(h, { tag: 'b', route: fleet.url, session: 'hall', userId: 'b' });
    await Promise.all([a.waitJoined(30000), b.waitJoined(30000)]);
    for (const c of [a, b]) {
        assert.equal(splitToken(c.route.reflector).base, gateway, `${c.tag} is routed to the gateway`);
        assert.ok(!c.route.reflector.startsWith(reflectorUrl), `${c.tag} never gets the reflector's own URL`);
    }
    await a.send(3);
    await b.send(3);
    assertSameLogs(await Promise.all([a.waitForCount(6, 15000), b.waitForCount(6, 15000)]));
    h.mark('1: two clients exchanged events through the in-process gateway');

    // 2. Bad upgrades get their status at the gateway, before any reflector sees them.
    const { token } = splitToken(a.route.reflector);
    assert.equal(await upgradeStatus(`${gateway}some-session`), 401, 'no token');
    assert.equal(await upgradeStatus(`${gateway}${token.slice(0, -4)}AAAA/some-session`), 401, 'forged signature');
    assert.equal(await upgradeStatus(`${gateway}${token}/`), 400, 'no session id');
    h.mark('2: bad upgrades refused at the gateway');

    // 3. A standalone gateway following refleet up's placement watch; its clients keep
    // their session across its restart.
    const router = /report stream listening.*url=(\S+)/.exec(fleet.stderr.text)?.[1];
    assert.ok(router, 'refleet up logs its report-stream URL');
    const port = await freePort();
    const options = {
        port, router, credentialFile: path.join(fleet.dataDir, 'gateway.credential'),
        files: new URL('files', fleet.url).href,
    };
    let standalone = await startGateway(h, { ...options, tag: 'gateway-1' });
    await waitFor(async () => (await upgradeStatus(`${standalone.url}${token}/probe`)) !== 503,
        { timeout: 15000, what: 'the standalone gateway to receive its placement table' });
    const viaStandalone = async (tag) => {
        const r = await route(fleet.url, tag);
        const { token: own } = splitToken(r.reflectorUrl);
        // A rejoin limit longer than the restart, as an app expecting network blips sets it:
        // the clients keep their views instead of rebuilding them.
        return routedParticipant(h, {
            tag, reflector: `${standalone.url}${own}/`, files: r.filesUrl, name: r.shard, appId: r.appId,
            env: { E2E_REJOIN_LIMIT: '15000' },
        });
    };
    const c = await viaStandalone('c');
    const d = await viaStandalone('d');
    await Promise.all([c.waitJoined(30000), d.waitJoined(30000)]);
    await c.send(2);
    const before = await Promise.all([a, b, c, d].map(p => p.waitForCount(8, 15000)));
    assertSameLogs(before);
    h.mark('3: two more clients joined the same session through the standalone gateway');

    standalone.proc.kill('SIGKILL');
    await standalone.exited;
    h.mark('standalone gateway killed');
    await sleep(500);
    standalone = await startGateway(h, { ...options, tag: 'gateway-2' });
    h.mark('standalone gateway restarted on the same port');
    await waitFor(async () => (await standalone.sample('refleet_gateway_connections{region="local-a"}')) === 2,
        { timeout: 30000, interval: 100, what: 'c and d to reconnect through the restarted gateway' });
    assert.equal(await standalone.sample('refleet_gateway_watch_connected'), 1);
    h.mark('c and d reconnected by themselves');

    // c and d reconnect through it by themselves and go on with the same session.
    await d.send(2);
    await a.send(1);
    const after = await Promise.all([a, b, c, d].map(p => p.waitForCount(11, 60000)));
    assertSameLogs(after);
    h.mark('every client saw every event after the restart');
    for (const p of [c, d]) assert.equal((await p.state()).viewConstructions, 1, `${p.tag} kept its view (seamless rejoin)`);
    for (const p of [a, b, c, d]) await p.exit();
    await fleet.stop();
});
