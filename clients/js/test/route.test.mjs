// Unit tests of @refleet/route against a small local HTTP stub of the router's JSON endpoint.
import assert from 'node:assert/strict';
import http from 'node:http';
import { test } from 'node:test';
import { route, RouteError, routeUrl, parseRetryAfter } from '../index.js';

const OK = {
    shard: 'lobby~2',
    reflectorUrl: 'http://127.0.0.1:7171/abc.def/',
    filesUrl: 'http://127.0.0.1:7080/files',
    region: 'local-b',
    joinToken: 'abc.def',
    tokenExpiresAt: '2030-01-02T03:04:05Z',
    appId: 'io.refleet.demo',
};

/**
 * A stub router: `answers` is a list of (req) => {status, headers, body}; the i-th request gets
 * the i-th answer (the last one repeats). Records every request with its arrival time.
 */
async function stub(t, answers) {
    const requests = [];
    const server = http.createServer((req, res) => {
        const i = Math.min(requests.length, answers.length - 1);
        requests.push({ url: new URL(req.url, 'http://stub'), headers: req.headers, at: Date.now() });
        const a = answers[i](req);
        res.writeHead(a.status, { 'content-type': 'application/json', ...a.headers });
        res.end(typeof a.body === 'string' ? a.body : JSON.stringify(a.body));
    });
    await new Promise(resolve => server.listen(0, '127.0.0.1', resolve));
    t.after(() => new Promise(resolve => server.close(resolve)));
    return { endpoint: `http://127.0.0.1:${server.address().port}/`, requests };
}

const ok = () => ({ status: 200, body: OK });
const err = (status, body, headers = {}) => () => ({ status, body, headers });

test('maps the router answer to Session.join options and sends the query', async t => {
    const s = await stub(t, [ok]);
    const r = await route({ endpoint: s.endpoint, namespace: 'games', session: 'lobby', region: 'local-b', userId: 'u 1', apiKey: 'k1' });
    assert.deepEqual(r, {
        reflector: OK.reflectorUrl,
        files: OK.filesUrl,
        name: 'lobby~2',
        appId: 'io.refleet.demo',
        region: 'local-b',
        shard: 'lobby~2',
        expiresAt: new Date('2030-01-02T03:04:05Z'),
    });
    const [req] = s.requests;
    assert.equal(req.url.pathname, '/v1/route');
    assert.deepEqual(Object.fromEntries(req.url.searchParams), { namespace: 'games', session: 'lobby', region: 'local-b', userId: 'u 1' });
    assert.equal(req.headers['x-api-key'], 'k1');
    // Defaults: namespace "default", no region/userId/key.
    await route({ endpoint: s.endpoint, session: 'lobby' });
    assert.deepEqual(Object.fromEntries(s.requests[1].url.searchParams), { namespace: 'default', session: 'lobby' });
    assert.equal(s.requests[1].headers['x-api-key'], undefined);
});

test('leaves out options the router did not give (Session.join rejects some undefined ones)', async t => {
    const s = await stub(t, [() => ({ status: 200, body: { ...OK, filesUrl: '', region: '', tokenExpiresAt: '' } })]);
    const r = await route({ endpoint: s.endpoint, session: 'lobby' });
    assert.deepEqual(Object.keys(r).sort(), ['appId', 'name', 'reflector', 'shard']);
});

test('endpoint: a base URL with or without a path and slash, or the full route URL', () => {
    assert.equal(routeUrl('http://h:1').href, 'http://h:1/v1/route');
    assert.equal(routeUrl('http://h:1/').href, 'http://h:1/v1/route');
    assert.equal(routeUrl('https://h/router').href, 'https://h/router/v1/route');
    assert.equal(routeUrl('https://h/router/v1/route').href, 'https://h/router/v1/route');
    assert.equal(routeUrl(new URL('http://h:1/x/')).href, 'http://h:1/x/v1/route');
    assert.throws(() => routeUrl(''), TypeError);
    assert.throws(() => routeUrl(undefined), TypeError);
});

test('error answers become RouteErrors with code, status and field; 4xx other than 429 are not retried', async t => {
    const cases = [
        [400, { code: 'INVALID_ARGUMENT', message: 'session: required', field: 'session' }],
        [401, { code: 'UNAUTHENTICATED', message: 'an API key is required' }],
        [403, { code: 'PERMISSION_DENIED', message: 'origin not allowed' }],
        [404, { code: 'NOT_FOUND', message: 'no Session covers "x"' }],
    ];
    for (const [status, body] of cases) {
        const s = await stub(t, [err(status, body)]);
        const e = await route({ endpoint: s.endpoint, session: 'x' }).then(() => null, x => x);
        assert.ok(e instanceof RouteError, `${status}: a RouteError`);
        assert.equal(e.name, 'RouteError');
        assert.equal(e.code, body.code);
        assert.equal(e.status, status);
        assert.equal(e.message, body.message);
        assert.equal(e.field, body.field);
        assert.equal(e.attempts, 1);
        assert.equal(s.requests.length, 1, `${status}: not retried`);
    }
});

test('429 waits Retry-After seconds, then tries again', async t => {
    const s = await stub(t, [
        err(429, { code: 'RESOURCE_EXHAUSTED', message: 'no room' }, { 'retry-after': '1' }),
        ok,
    ]);
    const r = await route({ endpoint: s.endpoint, session: 'lobby' });
    assert.equal(r.name, 'lobby~2');
    assert.equal(s.requests.length, 2);
    const gap = s.requests[1].at - s.requests[0].at;
    assert.ok(gap >= 1000 && gap < 1600, `waited ${gap} ms for Retry-After: 1`);
});

test('retries are bounded: the last RESOURCE_EXHAUSTED is thrown with its retryAfter', async t => {
    const s = await stub(t, [err(429, { code: 'RESOURCE_EXHAUSTED', message: 'no room' }, { 'retry-after': '0' })]);
    const e = await route({ endpoint: s.endpoint, session: 'lobby', retries: 2 }).then(() => null, x => x);
    assert.equal(e.code, 'RESOURCE_EXHAUSTED');
    assert.equal(e.status, 429);
    assert.equal(e.retryAfter, 0);
    assert.equal(e.attempts, 3);
    assert.equal(s.requests.length, 3);
    // retries: 0 makes one request only.
    const once = await stub(t, [err(429, { code: 'RESOURCE_EXHAUSTED', message: 'no room' }, { 'retry-after': '0' })]);
    await assert.rejects(route({ endpoint: once.endpoint, session: 'lobby', retries: 0 }), { code: 'RESOURCE_EXHAUSTED', attempts: 1 });
    assert.equal(once.requests.length, 1);
});

test('a Retry-After longer than maxRetryDelay is not waited for', async t => {
    const s = await stub(t, [err(429, { code: 'RESOURCE_EXHAUSTED', message: 'no room' }, { 'retry-after': '120' })]);
    const started = Date.now();
    await assert.rejects(route({ endpoint: s.endpoint, session: 'lobby', maxRetryDelay: 5000 }),
        { name: 'RouteError', code: 'RESOURCE_EXHAUSTED', retryAfter: 120000, attempts: 1 });
    assert.ok(Date.now() - started < 1000);
    assert.equal(s.requests.length, 1);
});

test('503 (no leader) and gateway errors are retried with a backoff; non-JSON bodies still map', async t => {
    const s = await stub(t, [
        err(503, { code: 'UNAVAILABLE', message: 'not the leader' }),
        () => ({ status: 502, body: '<html>bad gateway</html>', headers: { 'content-type': 'text/html' } }),
        ok,
    ]);
    const r = await route({ endpoint: s.endpoint, session: 'lobby' });
    assert.equal(r.shard, 'lobby~2');
    assert.equal(s.requests.length, 3);
    const s2 = await stub(t, [() => ({ status: 502, body: '<html>bad gateway</html>', headers: { 'content-type': 'text/html' } })]);
    const e = await route({ endpoint: s2.endpoint, session: 'lobby', retries: 0 }).then(() => null, x => x);
    assert.equal(e.code, 'INTERNAL');
    assert.equal(e.status, 502);
    assert.match(e.message, /HTTP 502: <html>bad gateway/);
    const s3 = await stub(t, [() => ({ status: 503, body: '' })]);
    await assert.rejects(route({ endpoint: s3.endpoint, session: 'lobby', retries: 0 }), { code: 'UNAVAILABLE', status: 503 });
});

test('no answer at all: NETWORK after the retries', async t => {
    const s = await stub(t, [ok]);
    const closed = s.endpoint.replace(/:\d+\//, ':1/');
    const e = await route({ endpoint: closed, session: 'lobby', retries: 1 }).then(() => null, x => x);
    assert.ok(e instanceof RouteError);
    assert.equal(e.code, 'NETWORK');
    assert.equal(e.status, 0);
    assert.equal(e.attempts, 2);
    assert.ok(e.cause, 'the fetch failure is the cause');
});

test('an answer that is not a route: BAD_RESPONSE', async t => {
    const s = await stub(t, [() => ({ status: 200, body: { shard: 'x' } })]);
    await assert.rejects(route({ endpoint: s.endpoint, session: 'lobby' }), { code: 'BAD_RESPONSE', status: 200 });
    const s2 = await stub(t, [() => ({ status: 200, body: 'not json' })]);
    await assert.rejects(route({ endpoint: s2.endpoint, session: 'lobby' }), { code: 'BAD_RESPONSE' });
});

test('the signal aborts a wait between retries and a request', async t => {
    const s = await stub(t, [err(429, { code: 'RESOURCE_EXHAUSTED', message: 'no room' }, { 'retry-after': '10' })]);
    const controller = new AbortController();
    const started = Date.now();
    setTimeout(() => controller.abort(), 200);
    await assert.rejects(route({ endpoint: s.endpoint, session: 'lobby', signal: controller.signal }), { name: 'AbortError' });
    assert.ok(Date.now() - started < 2000, 'aborted during the 10 s wait');
    await assert.rejects(route({ endpoint: s.endpoint, session: 'lobby', signal: AbortSignal.abort() }), { name: 'AbortError' });
    const reason = new Error('gave up');
    await assert.rejects(route({ endpoint: s.endpoint, session: 'lobby', signal: AbortSignal.abort(reason) }), reason);
});

test('a custom fetch is used', async () => {
    const seen = [];
    const r = await route({
        endpoint: 'https://router.example/', session: 'lobby',
        fetch: async (url, init) => {
            seen.push([url, init.headers]);
            return new Response(JSON.stringify(OK), { status: 200, headers: { 'content-type': 'application/json' } });
        },
    });
    assert.equal(r.reflector, OK.reflectorUrl);
    assert.equal(seen[0][0], 'https://router.example/v1/route?namespace=default&session=lobby');
});

test('parseRetryAfter: seconds or an HTTP date', () => {
    assert.equal(parseRetryAfter('2'), 2000);
    assert.equal(parseRetryAfter(' 0 '), 0);
    assert.equal(parseRetryAfter(null), undefined);
    assert.equal(parseRetryAfter('soon'), undefined);
    const now = Date.parse('2030-01-01T00:00:00Z');
    assert.equal(parseRetryAfter('Tue, 01 Jan 2030 00:00:03 GMT', now), 3000);
    assert.equal(parseRetryAfter('Tue, 01 Jan 2030 00:00:00 GMT', now + 5000), 0);
});
