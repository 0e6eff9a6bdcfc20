// Scenario 17: the live fleet view and the browser demo, in a real browser (headless Chromium
// from the system, driven by playwright-core).
//
// 1. `refleet up` with examples/local-fleet.yaml (regions local-a and local-b): the root page
//    shows both regions; real @multisynq/client participants join and leave, and the user
//    counts change in the page without a reload (Server-Sent Events). The same page with
//    JavaScript off still has its tables.
// 2. `refleet up --demo DIR` serving examples/browser-demo with the route helper (clients/js)
//    and the client's browser bundle: two tabs routed to one shard see each other's messages; a
//    third tab, past the session's cap of 2, is routed to lobby~1.
//
// Screenshots go to $REFLEET_ARTIFACTS/17-fleet-view (else a fresh temp dir); the path is
// printed as a test diagnostic.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { e2eTest } from './lib/harness.mjs';
import { startFleet } from './lib/fleet.mjs';
import { routedParticipant } from './lib/routed.mjs';
import { E2E_DIR, REPO_DIR, waitFor } from './lib/util.mjs';

const CHROMIUM = process.env.REFLEET_CHROMIUM || '/usr/bin/chromium';

let artifactsPath = null;
/** One directory for both tests' screenshots and browser console logs. */
function artifactsDir() {
    if (artifactsPath) return artifactsPath;
    const root = process.env.REFLEET_ARTIFACTS;
    if (root) {
        artifactsPath = path.join(root, '17-fleet-view');
        fs.mkdirSync(artifactsPath, { recursive: true });
    } else {
        artifactsPath = fs.mkdtempSync(path.join(os.tmpdir(), 'refleet-17-fleet-view-'));
    }
    return artifactsPath;
}

async function launchBrowser(t) {
    if (!fs.existsSync(CHROMIUM)) {
        throw new Error(`no Chromium at ${CHROMIUM}: apt-get install -y chromium (scripts/test does), or set REFLEET_CHROMIUM`);
    }
    // --no-sandbox: the tests may run as root, where Chromium's sandbox refuses to start.
    const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
    t.after(() => browser.close());
    return browser;
}

/** Console errors and failed requests of a page, for the artifacts and the assertion messages. */
function watchPage(page, log) {
    page.on('console', m => log.push(`[${m.type()}] ${m.text()}`));
    page.on('pageerror', e => log.push(`[pageerror] ${e.message}`));
    page.on('requestfailed', r => log.push(`[requestfailed] ${r.url()} ${r.failure()?.errorText}`));
    page.on('response', r => { if (r.status() >= 400) log.push(`[response ${r.status()}] ${r.url()}`); });
}

const usersOfShard = (page, shard) => page.evaluate(
    s => document.querySelector(`#fleet tr[data-shard="${s}"] td.users`)?.dataset.users ?? null, shard);

e2eTest('the fleet view shows both regions and follows users joining and leaving without a reload; without JavaScript it still has its tables', { timeout: 180000 }, async (t, h) => {
    const artifacts = artifactsDir();
    t.diagnostic(`screenshots: ${artifacts}`);
    const config = fs.readFileSync(path.join(REPO_DIR, 'examples', 'local-fleet.yaml'), 'utf8');
    const fleet = await startFleet(h, config);
    h.mark(`refleet up at ${fleet.url}`);
    await waitFor(async () => {
        const s = await fleet.status();
        return s.regions.length === 2 && s.shards.some(x => x.name === 'lobby' && x.reflector);
    }, { timeout: 30000, what: 'both regions and shard lobby placed' });

    const browser = await launchBrowser(t);
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    const log = [];
    watchPage(page, log);
    t.after(() => fs.writeFileSync(path.join(artifacts, 'fleet-view-console.log'), log.join('\n') + '\n'));
    await page.goto(fleet.url);
    for (const region of ['local-a', 'local-b']) {
        const table = page.locator(`#fleet table.reflectors[data-region="${region}"]`);
        assert.equal(await table.count(), 1, `a table for region ${region}`);
        assert.match(await table.locator('caption').innerText(), new RegExp(`Region ${region}`));
    }
    assert.equal(await page.locator('#fleet table.shards caption').innerText(), 'Shards');
    assert.ok(await page.locator('th[scope="col"]').count() >= 4, 'column headers');
    assert.equal(await usersOfShard(page, 'lobby'), '0');
    await page.waitForFunction(() => document.getElementById('live').dataset.state === 'live', null, { timeout: 10000 });
    // Survives only while the page is not reloaded.
    await page.evaluate(() => { window.refleetNoReload = true; });
    await page.screenshot({ path: path.join(artifacts, 'fleet-view-empty.png'), fullPage: true });

    const crowd = ['a', 'b', 'c'].map(tag => routedParticipant(h, { tag, route: fleet.url, session: 'lobby' }));
    await Promise.all(crowd.map(p => p.waitJoined(30000)));
    h.mark('3 clients joined lobby');
    await page.waitForFunction(() => document.querySelector('#fleet tr[data-shard="lobby"] td.users')?.dataset.users === '3',
        null, { timeout: 20000 }).catch(async e => {
        throw new Error(`${e.message}; the page shows ${await usersOfShard(page, 'lobby')} users of lobby; console:\n${log.join('\n')}`);
    });
    const regionUsers = await page.$$eval('#fleet .region-users', els => els.reduce((n, el) => n + Number(el.dataset.users), 0));
    assert.equal(regionUsers, 3, 'the regions count the 3 users');
    assert.match(await page.locator('#summary').innerText(), /3 users/);
    assert.equal(await page.evaluate(() => window.refleetNoReload), true, 'updated in place, not reloaded');
    assert.ok(Number(await page.evaluate(() => document.body.dataset.updates)) > 0, 'updates came over SSE');
    assert.match(await page.locator('#events').innerText(), /shard lobby of default\/lobby/);
    // Two samples at least: both regions' lines are drawn.
    await page.waitForFunction(() => document.querySelectorAll('#chart-users polyline').length === 2, null, { timeout: 15000 });
    assert.equal(await page.locator('#chart-routes polyline').count(), 1);
    await page.screenshot({ path: path.join(artifacts, 'fleet-view-3-users.png'), fullPage: true });

    await crowd[2].kill();
    await page.waitForFunction(() => document.querySelector('#fleet tr[data-shard="lobby"] td.users')?.dataset.users === '2',
        null, { timeout: 20000 });
    assert.equal(await page.evaluate(() => window.refleetNoReload), true);
    h.mark('the page followed a client leaving');

    // Phone width: the tables stack; nothing needs scrolling sideways.
    await page.setViewportSize({ width: 390, height: 844 });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.ok(overflow <= 0, `the page is ${overflow}px wider than a phone`);
    await page.screenshot({ path: path.join(artifacts, 'fleet-view-phone.png'), fullPage: true });

    // JavaScript off: the server's rendering alone.
    const still = await browser.newContext({ javaScriptEnabled: false, viewport: { width: 1280, height: 900 } });
    const plain = await still.newPage();
    await plain.goto(fleet.url);
    assert.equal(await plain.locator('#fleet table.reflectors').count(), 2, 'a table per region');
    assert.equal(await usersOfShard(plain, 'lobby'), '2');
    assert.match(await plain.locator('#live').innerText(), /Static page/);
    assert.ok(await plain.locator('#events table.events tbody tr').count() > 0, 'the events table');
    await plain.screenshot({ path: path.join(artifacts, 'fleet-view-no-javascript.png'), fullPage: true });
    await still.close();
    await context.close();
});

// One region, shards of 2 users (threshold 100%): the third tab needs lobby~1.
const DEMO_CONFIG = `
apiVersion: refleet.dev/v1alpha1
kind: LocalFleet
spec:
  reportIntervalMillis: 300
  joinTokens: true
---
apiVersion: refleet.dev/v1alpha1
kind: ReflectorPool
metadata: {name: demo}
spec:
  defaults:
    capacity: {sessions: 10, users: 20}
    minReflectors: 1
    maxReflectors: 2
    warmBuffer: 0
  regions: [{name: local-a}]
  drainGracePeriodSeconds: 5
---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: lobby}
spec:
  poolRef: {name: demo}
  appId: io.refleet.demo
  name: lobby
  maxUsersPerShard: 2
  scaleUpThreshold: 1.0
  minShards: 1
  maxShards: 3
`;

/** The demo directory `refleet up --demo` serves: the page, the route helper, the client bundle. */
function demoDir(h) {
    const dir = h.tempDir();
    const bundle = path.join(E2E_DIR, 'node_modules', '@multisynq', 'client', 'bundled', 'multisynq-client.esm.js');
    assert.ok(fs.existsSync(bundle), `the client's browser bundle at ${bundle} (npm ci in e2e/)`);
    const links = {
        'index.html': path.join(REPO_DIR, 'examples', 'browser-demo', 'index.html'),
        'demo.mjs': path.join(REPO_DIR, 'examples', 'browser-demo', 'demo.mjs'),
        'route.js': path.join(REPO_DIR, 'clients', 'js', 'index.js'),
        'multisynq-client.esm.js': bundle,
    };
    for (const [name, target] of Object.entries(links)) fs.symlinkSync(target, path.join(dir, name));
    return dir;
}

async function openTab(context, base, tag, log) {
    const page = await context.newPage();
    watchPage(page, log);
    await page.goto(new URL(`demo/?session=lobby&tag=${tag}`, base).href);
    await page.waitForFunction(() => ['joined', 'failed'].includes(document.body.dataset.state), null, { timeout: 60000 });
    const state = await page.evaluate(() => document.body.dataset.state);
    assert.equal(state, 'joined', `tab ${tag} joined (error: ${await page.locator('#error').innerText()}; console:\n${log.join('\n')})`);
    return page;
}

async function say(page, text) {
    await page.fill('#text', text);
    await page.click('#say button');
}

const logOf = page => page.$$eval('#log li', els => els.map(e => e.textContent));

e2eTest('two browser tabs routed to one shard see each other; a third past the cap is routed to lobby~1', { timeout: 180000 }, async (t, h) => {
    const artifacts = artifactsDir();
    t.diagnostic(`screenshots: ${artifacts}`);
    const fleet = await startFleet(h, DEMO_CONFIG, { extraArgs: ['--demo', demoDir(h)] });
    await waitFor(async () => {
        const shards = await fleet.shards('lobby');
        return shards.length === 1 && shards[0].state === 'Open' && shards[0].url;
    }, { timeout: 30000, what: 'shard lobby open on a ready reflector' });
    const browser = await launchBrowser(t);
    const context = await browser.newContext({ viewport: { width: 900, height: 700 } });
    const log = [];
    t.after(() => fs.writeFileSync(path.join(artifacts, 'demo-console.log'), log.join('\n') + '\n'));

    const a = await openTab(context, fleet.url, 'A', log);
    const b = await openTab(context, fleet.url, 'B', log);
    for (const [tag, page] of [['A', a], ['B', b]]) {
        assert.equal(await page.locator('#shard').innerText(), 'lobby', `tab ${tag} is routed to shard 0`);
    }
    h.mark('tabs A and B joined lobby');
    await say(a, 'hello from A');
    await b.waitForFunction(() => [...document.querySelectorAll('#log li')].some(li => li.textContent === 'A: hello from A'),
        null, { timeout: 15000 });
    await say(b, 'hello from B');
    // The reflector sends B's message to both tabs; either may render it first, so wait on both.
    for (const page of [a, b]) {
        await page.waitForFunction(() => [...document.querySelectorAll('#log li')].some(li => li.textContent === 'B: hello from B'),
            null, { timeout: 15000 });
    }
    assert.deepEqual(await logOf(a), ['A: hello from A', 'B: hello from B']);
    assert.deepEqual(await logOf(b), await logOf(a), 'one shared log');
    h.mark('A and B see each other');

    const c = await openTab(context, fleet.url, 'C', log);
    assert.equal(await c.locator('#shard').innerText(), 'lobby~1', 'past the cap of 2: the next shard');
    h.mark('tab C joined lobby~1');
    await say(c, 'hello from C');
    await c.waitForFunction(() => document.querySelectorAll('#log li').length === 1, null, { timeout: 15000 });
    assert.deepEqual(await logOf(c), ['C: hello from C'], 'lobby~1 is a session of its own');
    assert.deepEqual(await logOf(a), ['A: hello from A', 'B: hello from B'], 'C is not in lobby');
    await waitFor(async () => {
        const shards = await fleet.shards('lobby');
        const users = Object.fromEntries(shards.map(s => [s.shard, s.users]));
        return users.lobby === 2 && users['lobby~1'] === 1;
    }, { timeout: 20000, what: 'the router counting 2 users on lobby and 1 on lobby~1' });

    for (const [tag, page] of [['A', a], ['B', b], ['C', c]]) {
        await page.screenshot({ path: path.join(artifacts, `demo-tab-${tag}.png`), fullPage: true });
    }
    // The fleet view beside them shows the two shards.
    const view = await context.newPage();
    await view.goto(fleet.url);
    assert.equal(await usersOfShard(view, 'lobby'), '2');
    assert.equal(await usersOfShard(view, 'lobby~1'), '1');
    await view.screenshot({ path: path.join(artifacts, 'demo-fleet-view.png'), fullPage: true });
    await context.close();
});
