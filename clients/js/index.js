// @refleet/route: asks Refleet's router where to join a session and returns the options to
// spread into Multisynq's Session.join. Plain ESM without dependencies: runs in browsers and
// in Node 20+ (global fetch).

/** HTTP statuses worth another try: rate limit / no room (429), no leader or a gateway between leaders. */
const RETRIABLE = new Set([429, 502, 503, 504]);

/** gRPC code names the JSON endpoint uses, by HTTP status, for error bodies that carry none. */
const CODE_OF_STATUS = {
    400: 'INVALID_ARGUMENT',
    401: 'UNAUTHENTICATED',
    403: 'PERMISSION_DENIED',
    404: 'NOT_FOUND',
    429: 'RESOURCE_EXHAUSTED',
    503: 'UNAVAILABLE',
};

/**
 * A failed route lookup.
 *   code        the router's code (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNAUTHENTICATED,
 *               PERMISSION_DENIED, UNAVAILABLE, INTERNAL), or NETWORK (no HTTP answer) or
 *               BAD_RESPONSE (an answer that is not a route)
 *   status      the HTTP status (0 when there was no HTTP answer)
 *   field       for INVALID_ARGUMENT: the request field the router names
 *   retryAfter  milliseconds the router asked to wait (429 / 503 with Retry-After)
 *   attempts    how many requests were made
 */
export class RouteError extends Error {
    constructor(message, { code, status = 0, field, retryAfter, attempts = 1, cause } = {}) {
        super(message, cause === undefined ? undefined : { cause });
        this.name = 'RouteError';
        this.code = code;
        this.status = status;
        if (field !== undefined) this.field = field;
        if (retryAfter !== undefined) this.retryAfter = retryAfter;
        this.attempts = attempts;
    }
}

/** The `/v1/route` URL for an endpoint given as the router's base URL or as the full route URL. */
export function routeUrl(endpoint) {
    if (endpoint === undefined || endpoint === null || endpoint === '') {
        throw new TypeError('route: `endpoint` (the router URL) is required');
    }
    const here = globalThis.location?.href;
    const url = here ? new URL(String(endpoint), here) : new URL(String(endpoint));
    if (/\/v1\/route\/?$/.test(url.pathname)) return url;
    if (!url.pathname.endsWith('/')) url.pathname += '/';
    return new URL('v1/route', url);
}

/** Parses Retry-After (delta-seconds or an HTTP date) into milliseconds; undefined if absent or bad. */
export function parseRetryAfter(value, now = Date.now()) {
    if (value === null || value === undefined || value === '') return undefined;
    const text = String(value).trim();
    if (/^\d+$/.test(text)) return Number(text) * 1000;
    const date = Date.parse(text);
    if (Number.isNaN(date)) return undefined;
    return Math.max(0, date - now);
}

function sleep(ms, signal) {
    return new Promise((resolve, reject) => {
        if (signal?.aborted) {
            reject(signal.reason);
            return;
        }
        const onAbort = () => {
            clearTimeout(timer);
            reject(signal.reason);
        };
        const timer = setTimeout(() => {
            signal?.removeEventListener('abort', onAbort);
            resolve();
        }, ms);
        signal?.addEventListener('abort', onAbort, { once: true });
    });
}

async function errorFromResponse(res, attempts) {
    let body = null;
    let text = '';
    try {
        text = await res.text();
        body = JSON.parse(text);
    } catch {
        body = null;
    }
    const retryAfter = parseRetryAfter(res.headers.get('retry-after'));
    const code = (body && typeof body.code === 'string' && body.code) || CODE_OF_STATUS[res.status] || 'INTERNAL';
    const message = (body && typeof body.message === 'string' && body.message)
        || `router answered HTTP ${res.status}${text ? `: ${text.slice(0, 200)}` : ''}`;
    return new RouteError(message, {
        code,
        status: res.status,
        field: body && typeof body.field === 'string' ? body.field : undefined,
        retryAfter,
        attempts,
    });
}

function toRoute(body, attempts) {
    if (!body || typeof body.reflectorUrl !== 'string' || !body.reflectorUrl || typeof body.shard !== 'string' || !body.shard) {
        throw new RouteError('router answered without a reflector URL or shard', { code: 'BAD_RESPONSE', status: 200, attempts });
    }
    // Only keys with a value: Session.join rejects some options that are present but undefined.
    const out = { reflector: body.reflectorUrl };
    if (body.filesUrl) out.files = body.filesUrl;
    out.name = body.shard;
    if (body.appId) out.appId = body.appId;
    if (body.region) out.region = body.region;
    out.shard = body.shard;
    const expires = body.tokenExpiresAt ? new Date(body.tokenExpiresAt) : null;
    if (expires && !Number.isNaN(expires.getTime())) out.expiresAt = expires;
    return out;
}

/**
 * Asks the router where to join `session` and returns `{reflector, files, name, appId, region,
 * shard, expiresAt}`: spread it into Session.join's options, after your own
 * (`Session.join({...options, ...await route({...})})`), and join before `expiresAt`.
 *
 * Retries, at most `retries` times, when the router answers 429 (no room yet, or rate limit)
 * or 503/502/504 (no leader at the moment) — waiting what Retry-After says, or a short backoff
 * without it — and when the request fails without an answer. A wait longer than
 * `maxRetryDelay` is not made: the RouteError is thrown with its `retryAfter` instead.
 */
export async function route(options = {}) {
    const {
        endpoint,
        namespace = 'default',
        session,
        region,
        userId,
        apiKey,
        signal,
        retries = 3,
        maxRetryDelay = 30000,
        fetch: fetchImpl = globalThis.fetch,
    } = options;
    if (typeof fetchImpl !== 'function') throw new TypeError('route: no fetch available (Node 20+ or a browser)');
    const url = routeUrl(endpoint);
    for (const [key, value] of Object.entries({ namespace, session, region, userId })) {
        if (value !== undefined && value !== null && value !== '') url.searchParams.set(key, String(value));
    }
    const headers = { accept: 'application/json' };
    if (apiKey) headers['x-api-key'] = apiKey;

    for (let attempt = 1; ; attempt++) {
        signal?.throwIfAborted();
        let res;
        let error;
        try {
            res = await fetchImpl(url.href, { method: 'GET', headers, signal });
        } catch (err) {
            if (signal?.aborted) throw signal.reason;
            // No HTTP answer: refused, reset, DNS, or (in a browser) a CORS refusal.
            error = new RouteError(`router unreachable at ${url.origin}: ${err?.message || err}`, {
                code: 'NETWORK', status: 0, attempts: attempt, cause: err,
            });
        }
        if (res?.ok) {
            let body;
            try {
                body = await res.json();
            } catch (err) {
                if (signal?.aborted) throw signal.reason;
                throw new RouteError('router answered with something that is not JSON', {
                    code: 'BAD_RESPONSE', status: res.status, attempts: attempt, cause: err,
                });
            }
            return toRoute(body, attempt);
        }
        if (res) {
            error = await errorFromResponse(res, attempt);
            if (signal?.aborted) throw signal.reason;
            if (!RETRIABLE.has(res.status)) throw error;
        }
        if (attempt > retries) throw error;
        // The router's Retry-After, plus up to 20% so that a crowd told the same delay spreads out;
        // without one, 250 ms doubling per attempt.
        const base = error.retryAfter ?? 250 * 2 ** (attempt - 1);
        if (base > maxRetryDelay) throw error;
        await sleep(Math.min(maxRetryDelay, base * (1 + 0.2 * Math.random())), signal);
    }
}

export default route;
