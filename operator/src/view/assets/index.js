// The fleet view's live updates: the server renders the tables (and escapes every name);
// this script swaps in the fragments each Server-Sent Event carries and draws the two
// charts from the samples. Without JavaScript the page is the server's rendering as loaded.
'use strict';

(function () {
    const SVG = 'http://www.w3.org/2000/svg';
    const W = 320;
    const H = 120;
    const PAD = { left: 34, right: 6, top: 8, bottom: 18 };
    const COLORS = ['#1f6feb', '#d1242f', '#1a7f37', '#9a6700', '#8250df', '#bf3989'];

    const $ = id => document.getElementById(id);

    function el(name, attrs, text) {
        const node = document.createElementNS(SVG, name);
        for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
        if (text !== undefined) node.textContent = text;
        return node;
    }

    function niceMax(v) {
        if (!(v > 0)) return 1;
        const p = Math.pow(10, Math.floor(Math.log10(v)));
        for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
        return 10 * p;
    }

    // One line per series over the samples' time span; the y axis from 0 to a round maximum.
    function draw(svg, times, series, unit) {
        svg.replaceChildren();
        const x0 = PAD.left;
        const x1 = W - PAD.right;
        const y0 = H - PAD.bottom;
        const y1 = PAD.top;
        const max = niceMax(Math.max(0, ...series.flatMap(s => s.values)));
        svg.append(el('line', { x1: x0, y1: y0, x2: x1, y2: y0, class: 'axis' }));
        svg.append(el('line', { x1: x0, y1: y1, x2: x1, y2: y1, class: 'grid' }));
        svg.append(el('text', { x: x0 - 4, y: y1 + 4, 'text-anchor': 'end', class: 'tick' }, fmt(max)));
        svg.append(el('text', { x: x0 - 4, y: y0 + 4, 'text-anchor': 'end', class: 'tick' }, '0'));
        if (times.length < 2) {
            svg.append(el('text', { x: (x0 + x1) / 2, y: (y0 + y1) / 2, 'text-anchor': 'middle', class: 'tick' }, 'collecting…'));
        }
        const t0 = times[0];
        const span = Math.max(1, times[times.length - 1] - t0);
        const minutes = Math.round(span / 6000) / 10;
        svg.append(el('text', { x: x1, y: H - 4, 'text-anchor': 'end', class: 'tick' }, times.length > 1 ? `last ${minutes} min` : ''));
        const desc = [];
        series.forEach((s, i) => {
            const color = COLORS[i % COLORS.length];
            const points = s.values.map((v, j) => {
                const x = x0 + ((times[j] - t0) / span) * (x1 - x0);
                const y = y0 - (v / max) * (y0 - y1);
                return `${x.toFixed(1)},${y.toFixed(1)}`;
            });
            if (points.length > 0) svg.append(el('polyline', { points: points.join(' '), fill: 'none', stroke: color, 'stroke-width': 2 }));
            desc.push(`${s.name}: ${fmt(s.values[s.values.length - 1] ?? 0)} ${unit}`);
        });
        svg.append(el('desc', {}, desc.join('; ')));
        return series.map((s, i) => ({ name: s.name, color: COLORS[i % COLORS.length], last: s.values[s.values.length - 1] ?? 0 }));
    }

    function fmt(v) {
        return Number.isInteger(v) ? String(v) : v.toFixed(1);
    }

    function charts(history) {
        const times = history.map(s => s.atMs);
        const regions = [...new Set(history.flatMap(s => Object.keys(s.users)))].sort();
        const users = regions.map(name => ({ name, values: history.map(s => s.users[name] ?? 0) }));
        const legend = draw($('chart-users'), times, users, 'users');
        const ul = $('legend-users');
        ul.replaceChildren(...legend.map(l => {
            const li = document.createElement('li');
            const swatch = document.createElement('span');
            swatch.className = 'swatch';
            swatch.style.background = l.color;
            li.append(swatch, `${l.name}: ${fmt(l.last)}`);
            return li;
        }));
        draw($('chart-routes'), times, [{ name: 'Route', values: history.map(s => s.routesPerSec) }], 'calls/s');
    }

    let updates = 0;
    function apply(message) {
        $('summary').textContent = message.summary;
        // Fragments rendered and escaped by the server.
        $('fleet').innerHTML = message.fleet;
        $('events').innerHTML = message.events;
        charts(message.history);
        updates += 1;
        document.body.dataset.updates = String(updates);
    }

    function start() {
        try {
            charts(JSON.parse($('history').textContent || '[]'));
        } catch (e) {
            console.warn('fleet view: bad chart data', e);
        }
        const live = $('live');
        if (typeof EventSource !== 'function') {
            live.textContent = 'Static page: this browser has no EventSource; reload to update.';
            return;
        }
        const source = new EventSource('view/events');
        source.addEventListener('open', () => {
            live.textContent = 'Live';
            live.dataset.state = 'live';
        });
        source.addEventListener('error', () => {
            live.textContent = 'Disconnected; retrying…';
            live.dataset.state = 'retrying';
        });
        source.addEventListener('fleet', e => {
            try {
                apply(JSON.parse(e.data));
            } catch (err) {
                console.warn('fleet view: bad message', err);
            }
        });
    }

    if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
    else start();
})();
