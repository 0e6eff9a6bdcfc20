/** Where to ask, what to ask for. */
export interface RouteOptions {
    /**
     * The router: its base URL (`https://route.example.com/`, `http://127.0.0.1:7080/` for
     * `refleet up`) or the full `…/v1/route` URL. Relative URLs resolve against the page.
     */
    endpoint: string | URL;
    /** Namespace of the Session resource. Default `"default"`. */
    namespace?: string;
    /** The session name, without any `~N` shard suffix. */
    session: string;
    /** Preferred region (e.g. the closest one); the router falls back to the session's other regions. */
    region?: string;
    /** An opaque user id: repeated calls for the same user get the same place while it is pending. */
    userId?: string;
    /** Refleet route API key (sent as `x-api-key`), when the router requires one. Not Multisynq's apiKey. */
    apiKey?: string;
    /** Aborts the request and any wait between retries; the promise rejects with `signal.reason`. */
    signal?: AbortSignal;
    /** Further tries after a 429/502/503/504 answer or a network failure. Default 3. */
    retries?: number;
    /** Longest wait (ms) between tries; a longer Retry-After throws instead. Default 30000. */
    maxRetryDelay?: number;
    /** A fetch implementation (default: the global one). */
    fetch?: typeof globalThis.fetch;
}

/** The options to spread into `Multisynq.Session.join`, plus what the router said about them. */
export interface Route {
    /** Reflector base URL with the join token as its last segment; the client appends the session id. */
    reflector: string;
    /** The pool's stable files base URL (absent when the router has none). */
    files?: string;
    /** The shard to join: the session name itself for shard 0, `<session>~N` for shard N. */
    name: string;
    /** The Session's appId; the token is only valid for it. */
    appId?: string;
    /** Region of the reflector. */
    region?: string;
    /** Same as `name`. */
    shard: string;
    /** The token must be used for the first JOIN before this instant; reconnects are fine after it. */
    expiresAt?: Date;
}

/** Codes a RouteError carries: the router's gRPC code names, plus two of the helper's own. */
export type RouteErrorCode =
    | 'INVALID_ARGUMENT'
    | 'NOT_FOUND'
    | 'RESOURCE_EXHAUSTED'
    | 'UNAUTHENTICATED'
    | 'PERMISSION_DENIED'
    | 'UNAVAILABLE'
    | 'INTERNAL'
    | 'NETWORK'
    | 'BAD_RESPONSE'
    | (string & {});

/** A failed route lookup. */
export declare class RouteError extends Error {
    constructor(message: string, details?: {
        code?: RouteErrorCode;
        status?: number;
        field?: string;
        retryAfter?: number;
        attempts?: number;
        cause?: unknown;
    });
    readonly name: 'RouteError';
    /** The router's code, or NETWORK (no HTTP answer) / BAD_RESPONSE (an answer that is not a route). */
    code: RouteErrorCode;
    /** HTTP status; 0 without an HTTP answer. */
    status: number;
    /** For INVALID_ARGUMENT: the request field the router names. */
    field?: string;
    /** Milliseconds the router asked to wait (Retry-After). */
    retryAfter?: number;
    /** Requests made, retries included. */
    attempts: number;
}

/** Asks the router where to join; resolves with the Session.join options. */
export declare function route(options: RouteOptions): Promise<Route>;
export default route;

/** The `/v1/route` URL for an endpoint. */
export declare function routeUrl(endpoint: string | URL): URL;

/** Retry-After (delta-seconds or HTTP date) in milliseconds; undefined when absent or unreadable. */
export declare function parseRetryAfter(value: string | null | undefined, now?: number): number | undefined;
