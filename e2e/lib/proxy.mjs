// A recording proxy that sits between the clients and the reflector: an observer, not a mock.
//
// Clients use the proxy's URL as their `box`. WebSocket upgrades are forwarded to the reflector
// (same path and query) and every frame in both directions is recorded; any other HTTP request
// (the files endpoint) is forwarded as-is and recorded as {method, path, status, reqBytes, resBytes}.
// If the reflector cannot be reached, the upgrade is answered with 502 and the socket closed, so
// the client sees a failed connection and retries, as it would against a reflector that is down.
// The proxy may start without a target (set it with setTarget): a reflector records SNAP and SAVE
// URLs only under its --files-url, so it is started with `filesUrl: proxy.filesUrl` once the
// proxy's address is known.
import crypto from 'node:crypto';
import http from 'node:http';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const { WebSocket, WebSocketServer } = require('ws');

const canSendCode = code => code === 1000 || (code >= 3000 && code <= 4999);

/** Reassembles `_CHUNK` frames (REFLECTOR_PROTOCOL §2.2) and parses JSON. */
class FrameDecoder {
    constructor() { this.pending = ''; }

    decode(text) {
        if (text.startsWith('_CHUNK')) {
            const first = text[6] === '1';
            const last = text[7] === '1';
            if (first) this.pending = '';
            this.pending += text.slice(8);
            if (!last) return undefined;
            text = this.pending;
            this.pending = '';
        }
        try {
            return JSON.parse(text);
        } catch {
            return { unparsable: text };
        }
    }
}

export class RecordingProxy {
    constructor(target) {
        if (target) this.setTarget(target);
        this.t0 = Date.now();
        this.events = [];        // {t, conn, event:'open'|'close'|'refused', ...}
        this.frames = [];        // {t, conn, dir:'c2s'|'s2c', text, msg}
        this.httpLog = [];       // {t, method, path, status, reqBytes, resBytes}
        this.conns = new Map();  // conn -> {conn, path, sessionId, user, client, upstream, closed}
        this.connCount = 0;
        this.wss = new WebSocketServer({ noServer: true, maxPayload: 256 * 1024 * 1024 });
        this.server = http.createServer((req, res) => this.forwardHttp(req, res));
        this.server.on('upgrade', (req, socket, head) => this.forwardUpgrade(req, socket, head));
        this.sockets = new Set();
        this.server.on('connection', socket => {
            this.sockets.add(socket);
            socket.on('close', () => this.sockets.delete(socket));
        });
    }

    /** target: http://127.0.0.1:PORT/ (the reflector's box) */
    setTarget(target) {
        const url = new URL(target);
        this.targetHost = url.hostname;
        this.targetPort = Number(url.port);
    }

    async listen() {
        await new Promise((resolve, reject) => {
            this.server.once('error', reject);
            this.server.listen(0, '127.0.0.1', resolve);
        });
        this.port = this.server.address().port;
        this.box = `http://127.0.0.1:${this.port}/`;
        /** The files base clients derive from `box`: a proxied reflector's --files-url. */
        this.filesUrl = `${this.box}files`;
        return this;
    }

    now() { return Date.now() - this.t0; }

    /** Delays every WebSocket upgrade that arrives in the next `ms` milliseconds until then. */
    holdUpgrades(ms) {
        this.holdUntil = Date.now() + ms;
    }

    forwardUpgrade(req, socket, head) {
        const conn = ++this.connCount;
        const path = req.url;
        socket.on('error', () => {});
        this.events.push({ t: this.now(), conn, event: 'upgrade', path });
        const hold = (this.holdUntil || 0) - Date.now();
        if (hold > 0) {
            setTimeout(() => this.connectUpstream(conn, req, socket, head), hold);
        } else {
            this.connectUpstream(conn, req, socket, head);
        }
    }

    connectUpstream(conn, req, socket, head) {
        const path = req.url;
        if (socket.destroyed) {
            this.events.push({ t: this.now(), conn, event: 'refused', path, reason: 'client went away while held' });
            return;
        }
        const upstream = new WebSocket(`ws://${this.targetHost}:${this.targetPort}${path}`, {
            perMessageDeflate: false,
            maxPayload: 256 * 1024 * 1024,
        });
        let settled = false;
        const refuse = reason => {
            if (settled) return;
            settled = true;
            this.events.push({ t: this.now(), conn, event: 'refused', path, reason });
            try {
                socket.end('HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
            } catch { /* ignore */ }
            socket.destroy();
            try { upstream.terminate(); } catch { /* ignore */ }
        };
        upstream.on('unexpected-response', (_req, res) => refuse(`upstream answered HTTP ${res.statusCode}`));
        upstream.on('error', err => refuse(`upstream error: ${err.message}`));
        socket.on('close', () => { if (!settled) refuse('client went away during connect'); });
        upstream.once('open', () => {
            if (settled) return;
            settled = true;
            this.wss.handleUpgrade(req, socket, head, client => this.wire(conn, path, client, upstream));
        });
    }

    wire(conn, path, client, upstream) {
        const sessionId = new URL(path, 'http://x').pathname.split('/').pop();
        const record = { conn, path, sessionId, user: null, client, upstream, closed: null };
        this.conns.set(conn, record);
        this.events.push({ t: this.now(), conn, event: 'open', path });
        const decoders = { c2s: new FrameDecoder(), s2c: new FrameDecoder() };
        const relay = (dir, to) => (data, isBinary) => {
            const text = isBinary ? null : data.toString();
            const entry = { t: this.now(), conn, dir, text: isBinary ? `<binary ${data.length} bytes>` : text };
            if (!isBinary) {
                const msg = decoders[dir].decode(text);
                if (msg !== undefined) entry.msg = msg;
                if (dir === 'c2s' && msg && msg.action === 'JOIN' && msg.args) record.user = msg.args.user;
            }
            this.frames.push(entry);
            if (to.readyState === WebSocket.OPEN) to.send(isBinary ? data : text, { binary: isBinary });
        };
        client.on('message', relay('c2s', upstream));
        upstream.on('message', relay('s2c', client));
        const onClose = by => (code, reasonBuf) => {
            const reason = reasonBuf.toString();
            if (!record.closed) record.closed = { by, code, reason, t: this.now() };
            this.events.push({ t: this.now(), conn, event: 'close', by, code, reason });
            const other = by === 'client' ? upstream : client;
            if (other.readyState === WebSocket.CLOSED) return;
            // mirror the close; an abnormal close (1005/1006) is mirrored as an abrupt drop
            if (canSendCode(code)) {
                try { other.close(code, reason); } catch { other.terminate(); }
            } else {
                other.terminate();
            }
        };
        client.on('close', onClose('client'));
        upstream.on('close', onClose('server'));
        client.on('error', () => {});
        upstream.on('error', () => {});
    }

    forwardHttp(req, res) {
        const started = { t: this.now(), method: req.method, path: req.url };
        let reqBytes = 0;
        let resBytes = 0;
        // SHA-256 of the request body (PUT) and of the response body, so tests can compare bytes
        const reqHash = crypto.createHash('sha256');
        const resHash = crypto.createHash('sha256');
        const headers = { ...req.headers, host: `${this.targetHost}:${this.targetPort}` };
        const upstreamReq = http.request({
            host: this.targetHost, port: this.targetPort, method: req.method, path: req.url, headers,
        }, upstreamRes => {
            res.writeHead(upstreamRes.statusCode, upstreamRes.headers);
            upstreamRes.on('data', chunk => { resBytes += chunk.length; resHash.update(chunk); });
            upstreamRes.pipe(res);
            upstreamRes.on('end', () => {
                this.httpLog.push({
                    ...started, status: upstreamRes.statusCode, reqBytes, resBytes,
                    reqSha256: reqHash.digest('hex'), resSha256: resHash.digest('hex'),
                });
            });
        });
        upstreamReq.on('error', err => {
            this.httpLog.push({ ...started, status: 502, reqBytes, resBytes, error: err.message });
            if (!res.headersSent) res.writeHead(502);
            res.end();
        });
        req.on('data', chunk => { reqBytes += chunk.length; reqHash.update(chunk); });
        req.pipe(upstreamReq);
    }

    // ------------------------------------------------------------ queries

    /** Parsed messages, optionally filtered by conn / dir / action. */
    messages({ conn, dir, action } = {}) {
        return this.frames.filter(f => f.msg
            && (conn === undefined || f.conn === conn)
            && (dir === undefined || f.dir === dir)
            && (action === undefined || f.msg.action === action));
    }

    /** Connection records (in connection order) of the client whose JOIN carried `user`. */
    connsOfUser(user) {
        return [...this.conns.values()].filter(c => c.user === user).sort((a, b) => a.conn - b.conn);
    }

    /** SYNC args received by the client with viewId `user`, in order. */
    syncsOf(user) {
        const conns = new Set(this.connsOfUser(user).map(c => c.conn));
        return this.messages({ dir: 's2c', action: 'SYNC' }).filter(f => conns.has(f.conn)).map(f => f.msg.args);
    }

    /** Abruptly drops a connection on both sides, like a network failure. */
    drop(conn) {
        const record = this.conns.get(conn);
        if (!record) throw new Error(`no proxy connection #${conn}`);
        this.events.push({ t: this.now(), conn, event: 'drop' });
        record.client.terminate();
        record.upstream.terminate();
    }

    /** JSON-lines dump for diagnostics. */
    dump() {
        const lines = [];
        for (const e of this.events) lines.push(JSON.stringify(e));
        for (const f of this.frames) lines.push(JSON.stringify({ t: f.t, conn: f.conn, dir: f.dir, text: f.text }));
        for (const h of this.httpLog) lines.push(JSON.stringify({ http: true, ...h }));
        return lines.join('\n') + '\n';
    }

    async close() {
        for (const record of this.conns.values()) {
            try { record.client.terminate(); } catch { /* ignore */ }
            try { record.upstream.terminate(); } catch { /* ignore */ }
        }
        for (const socket of this.sockets) socket.destroy();
        await new Promise(resolve => this.server.close(() => resolve()));
        this.wss.close();
    }
}

export async function startProxy(target) {
    return new RecordingProxy(target).listen();
}
