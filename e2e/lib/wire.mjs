// Protocol invariants checked on everything a RecordingProxy saw (REFLECTOR_PROTOCOL §2.2, §5, §6).
// Returns a list of human-readable violations (empty when all is well), each naming the frame.

const isObject = v => v !== null && typeof v === 'object' && !Array.isArray(v);

function frameTime(msg) {
    switch (msg.action) {
        case 'SYNC': return msg.args.time;
        case 'RECV': return msg.args[0];
        case 'TICK': return typeof msg.args === 'number' ? msg.args : msg.args && msg.args.time;
        default: return undefined;
    }
}

export function wireViolations(proxy) {
    const problems = [];
    const where = f => `conn #${f.conn} at ${f.t} ms: ${f.text.length > 300 ? `${f.text.slice(0, 300)}…` : f.text}`;
    // seq -> canonical JSON of the reflected message, per timeline: every client must see the same
    // message under the same seq.
    const byTimeline = new Map();
    const remember = (timeline, msg, f) => {
        if (!timeline) return;
        if (!byTimeline.has(timeline)) byTimeline.set(timeline, new Map());
        const seen = byTimeline.get(timeline);
        const key = msg[1];
        const text = JSON.stringify(msg);
        if (seen.has(key) && seen.get(key) !== text) {
            problems.push(`seq ${key} on timeline ${timeline} reflected as two different messages: ${seen.get(key)} vs ${text} (${where(f)})`);
        } else {
            seen.set(key, text);
        }
    };
    const checkMeta = (msg, f) => {
        const payload = msg[2];
        if (!isObject(payload)) return;
        const { _size, ...rest } = payload;
        if (typeof _size !== 'number') {
            problems.push(`meta message without numeric _size (${where(f)})`);
        } else if (_size !== JSON.stringify(rest).length) {
            problems.push(`meta message _size ${_size} != ${JSON.stringify(rest).length} (${where(f)})`);
        }
        if (payload.what === 'users' && (typeof payload.active !== 'number' || typeof payload.total !== 'number')) {
            problems.push(`users message without active/total (${where(f)})`);
        }
    };

    const perConn = new Map();
    for (const f of proxy.frames) {
        if (f.dir !== 's2c') continue;
        const msg = f.msg;
        if (!isObject(msg) || msg.unparsable !== undefined) {
            problems.push(`server frame is not a JSON object (${where(f)})`);
            continue;
        }
        if (msg.action === 'PONG') {
            if ('id' in msg) problems.push(`PONG must not carry an id (${where(f)})`);
            continue;
        }
        if (!msg.id) problems.push(`server message without id (${where(f)})`);
        let state = perConn.get(f.conn);
        if (!state) {
            state = { seq: null, time: -Infinity, timeline: null };
            perConn.set(f.conn, state);
        }
        const time = frameTime(msg);
        if (time !== undefined) {
            if (typeof time !== 'number' || !Number.isFinite(time)) {
                problems.push(`non-numeric teatime (${where(f)})`);
            } else {
                if (time < state.time) problems.push(`teatime went backwards from ${state.time} to ${time} (${where(f)})`);
                state.time = Math.max(state.time, time);
            }
        }
        if (msg.action === 'SYNC') {
            const a = msg.args;
            if (state.seq !== null) problems.push(`second SYNC on one connection (${where(f)})`);
            for (const field of ['url', 'messages', 'time', 'seq', 'timeline']) {
                if (!(field in a)) problems.push(`SYNC without ${field} (${where(f)})`);
            }
            state.timeline = a.timeline;
            const msgs = a.messages || [];
            for (let i = 0; i < msgs.length; i++) {
                const m = msgs[i];
                if (i > 0 && m[1] !== ((msgs[i - 1][1] + 1) >>> 0)) {
                    problems.push(`SYNC messages not consecutive: ${msgs[i - 1][1]} then ${m[1]} (${where(f)})`);
                }
                if (m[0] > a.time) problems.push(`SYNC message time ${m[0]} after SYNC time ${a.time} (${where(f)})`);
                checkMeta(m, f);
                remember(state.timeline, m, f);
            }
            if (msgs.length && msgs[msgs.length - 1][1] !== a.seq) {
                problems.push(`SYNC seq ${a.seq} is not the seq of its last message ${msgs[msgs.length - 1][1]} (${where(f)})`);
            }
            if (a.snapshotSeq !== undefined && msgs.length && msgs[0][1] !== ((a.snapshotSeq + 1) >>> 0)) {
                // The client requires no gap between the snapshot and the first message.
                problems.push(`first SYNC message ${msgs[0][1]} does not follow snapshotSeq ${a.snapshotSeq} (${where(f)})`);
            }
            state.seq = a.seq;
        } else if (msg.action === 'RECV') {
            const m = msg.args;
            if (state.seq === null) {
                problems.push(`RECV before SYNC (${where(f)})`);
            } else if (m[1] !== ((state.seq + 1) >>> 0)) {
                problems.push(`RECV seq ${m[1]} does not follow ${state.seq} (${where(f)})`);
            }
            state.seq = m[1];
            checkMeta(m, f);
            remember(state.timeline, m, f);
        } else if (msg.action === 'TICK') {
            if (state.seq === null) problems.push(`TICK before SYNC (${where(f)})`);
        }
    }
    return problems;
}
