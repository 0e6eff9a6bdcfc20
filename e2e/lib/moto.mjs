// A local S3-compatible server (moto) for the S3 storage scenario.
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import { LogTail, freePort, sleep } from './util.mjs';

export const MOTO_ENV = 'REFLEET_MOTO_SERVER';
// Set by scripts/test: the S3 test must run there, so a missing moto server is a failure.
export const REQUIRE_ENV = 'REFLEET_REQUIRE_S3';

/** Why the S3 tests cannot run here, or null if they can (or must). */
export function motoSkipReason() {
    if (!process.env[MOTO_ENV] && !process.env[REQUIRE_ENV]) {
        return `${MOTO_ENV} is not set (point it at a moto_server executable, e.g. from \`pip install 'moto[server]'\`)`;
    }
    return null;
}

export class MotoServer {
    constructor(proc, port, stderr) {
        this.proc = proc;
        this.port = port;
        this.stderr = stderr;
        this.endpoint = `http://127.0.0.1:${port}`;
    }

    /** Environment for a client of this server (object_store's AWS_* variables). */
    clientEnv() {
        return {
            AWS_ENDPOINT: this.endpoint,
            AWS_ALLOW_HTTP: 'true',
            AWS_ACCESS_KEY_ID: 'x',
            AWS_SECRET_ACCESS_KEY: 'x',
            AWS_REGION: 'us-east-1',
        };
    }

    /** AWS SigV4 headers for an unparameterised GET (moto accepts any key, but wants a signature). */
    signedGetHeaders(path) {
        const amzDate = new Date().toISOString().replace(/[-:]/g, '').replace(/\.\d{3}/, '');
        const day = amzDate.slice(0, 8);
        const host = `127.0.0.1:${this.port}`;
        const payloadHash = crypto.createHash('sha256').update('').digest('hex');
        const signedHeaders = 'host;x-amz-content-sha256;x-amz-date';
        const canonical = ['GET', path, '', `host:${host}`, `x-amz-content-sha256:${payloadHash}`,
            `x-amz-date:${amzDate}`, '', signedHeaders, payloadHash].join('\n');
        const scope = `${day}/us-east-1/s3/aws4_request`;
        const toSign = ['AWS4-HMAC-SHA256', amzDate, scope, crypto.createHash('sha256').update(canonical).digest('hex')].join('\n');
        const hmac = (key, data) => crypto.createHmac('sha256', key).update(data).digest();
        let key = hmac('AWS4x', day);
        for (const part of ['us-east-1', 's3', 'aws4_request']) key = hmac(key, part);
        const signature = crypto.createHmac('sha256', key).update(toSign).digest('hex');
        return {
            'x-amz-date': amzDate,
            'x-amz-content-sha256': payloadHash,
            authorization: `AWS4-HMAC-SHA256 Credential=x/${scope}, SignedHeaders=${signedHeaders}, Signature=${signature}`,
        };
    }

    async createBucket(bucket) {
        const res = await fetch(`${this.endpoint}/${bucket}`, { method: 'PUT' });
        if (!res.ok) throw new Error(`creating bucket ${bucket} failed: HTTP ${res.status} ${await res.text()}`);
    }

    /** [{key, size}] of the objects under `prefix` (ListObjectsV2, unsigned: moto accepts it). */
    async list(bucket, prefix) {
        const objects = [];
        let token = null;
        do {
            const url = new URL(`${this.endpoint}/${bucket}`);
            url.searchParams.set('list-type', '2');
            url.searchParams.set('prefix', prefix);
            if (token) url.searchParams.set('continuation-token', token);
            const res = await fetch(url);
            const xml = await res.text();
            if (!res.ok) throw new Error(`listing ${bucket}/${prefix} failed: HTTP ${res.status} ${xml}`);
            for (const m of xml.matchAll(/<Contents>([\s\S]*?)<\/Contents>/g)) {
                const key = /<Key>([\s\S]*?)<\/Key>/.exec(m[1])[1]
                    .replace(/&amp;/g, '&').replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&quot;/g, '"').replace(/&apos;/g, "'");
                const size = Number(/<Size>(\d+)<\/Size>/.exec(m[1])[1]);
                objects.push({ key, size });
            }
            const next = /<NextContinuationToken>([\s\S]*?)<\/NextContinuationToken>/.exec(xml);
            token = /<IsTruncated>true<\/IsTruncated>/.test(xml) && next ? next[1] : null;
        } while (token);
        return objects;
    }

    /** SHA-256 (hex) of one object's bytes. */
    async objectSha256(bucket, key) {
        const path = `/${bucket}/${key.split('/').map(encodeURIComponent).join('/')}`;
        const res = await fetch(`${this.endpoint}${path}`, { headers: this.signedGetHeaders(path) });
        if (!res.ok) throw new Error(`GET ${bucket}/${key}: HTTP ${res.status}`);
        return crypto.createHash('sha256').update(Buffer.from(await res.arrayBuffer())).digest('hex');
    }
}

/** Starts moto_server on a free loopback port and waits until it answers. */
export async function startMoto(harness) {
    const bin = process.env[MOTO_ENV];
    if (!bin) throw new Error(`${REQUIRE_ENV} is set but ${MOTO_ENV} (path of a moto_server executable) is not`);
    const port = await freePort();
    const stderr = new LogTail();
    const proc = spawn(bin, ['-H', '127.0.0.1', '-p', String(port)], { stdio: ['ignore', 'pipe', 'pipe'] });
    proc.stdout.on('data', d => stderr.push(d));
    proc.stderr.on('data', d => stderr.push(d));
    harness.trackProcess('moto', proc, stderr);
    let exited = null;
    proc.on('exit', (code, signal) => { exited = { code, signal }; });
    proc.on('error', err => { exited = { error: err.message }; });
    const moto = new MotoServer(proc, port, stderr);
    const deadline = Date.now() + 30000;
    for (;;) {
        if (exited) throw new Error(`moto_server exited early (${JSON.stringify(exited)}):\n${stderr.tail()}`);
        try {
            const res = await fetch(`${moto.endpoint}/`);
            await res.arrayBuffer();
            return moto;
        } catch {
            if (Date.now() > deadline) throw new Error(`moto_server did not answer on port ${port}:\n${stderr.tail()}`);
            await sleep(200);
        }
    }
}
