#!/usr/bin/env python3
"""Writes Refleet's Grafana dashboards (dashboards/*.json) with Grafana's Foundation SDK.

    python3 dashboards/tools/build_dashboards.py            # (re)write dashboards/*.json
    python3 dashboards/tools/build_dashboards.py --check    # exit 1 if a file differs

Needs the SDK version pinned in dashboards/tools/requirements.txt; `./scripts/test prometheus`
installs it into ${REFLEET_CACHE:-~/.cache/refleet}/dashboards-venv, so the quickest way to run
this script is ~/.cache/refleet/dashboards-venv/bin/python dashboards/tools/build_dashboards.py.

The JSON files are committed (Grafana, the Helm chart's ConfigMaps and `kubectl` read them
as they are); this script keeps the five consistent: every panel and query uses the
`${datasource}` variable (no datasource UID is hard-coded), every selector carries the label
convention of docs/observability.md (job, namespace, pod, region), and template variables
come from label_values() of series that exist from start-up.
"""

import json
import sys
from pathlib import Path

try:
    from grafana_foundation_sdk.builders import bargauge, common, prometheus, stat, table, timeseries
    from grafana_foundation_sdk.builders import dashboard as gd
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common as cm
    from grafana_foundation_sdk.models import dashboard as dm
    from grafana_foundation_sdk.models import prometheus as pm
except ImportError:
    sys.exit("build_dashboards.py needs grafana-foundation-sdk as pinned in dashboards/tools/requirements.txt:\n"
             "  python3 -m venv ~/.cache/refleet/dashboards-venv\n"
             "  ~/.cache/refleet/dashboards-venv/bin/pip install -r dashboards/tools/requirements.txt\n"
             "  ~/.cache/refleet/dashboards-venv/bin/python dashboards/tools/build_dashboards.py")

OUT = Path(__file__).resolve().parent.parent
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
OP = 'job="refleet-operator"'
RF = 'job="refleet-reflector"'
RI = "$__rate_interval"


def datasource_var():
    return gd.DatasourceVariable("datasource").label("Data source").type("prometheus").hide(dm.VariableHide.DONT_HIDE).regex("")


def query_var(name, label, query, include_all=True, multi=True):
    var = (
        gd.QueryVariable(name)
        .label(label)
        .datasource(DS)
        # The object form is what Grafana's Prometheus variable editor saves (a bare string is
        # migrated to it on load).
        .query({"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"})
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .hide(dm.VariableHide.DONT_HIDE).regex("")
        .include_all(include_all)
        .multi(multi)
        .options([])
        .regex("")
    )
    if include_all:
        # Without it "All" becomes a list of every value in the regex, which can outgrow a URL.
        var.all_value(".*")
    return var


NAMESPACE = lambda: query_var(  # noqa: E731 (a fresh builder per dashboard)
    "namespace", "Namespace", "label_values(refleet_operator_reflectors, namespace)"
)
REGION = lambda: query_var(  # noqa: E731
    "region",
    "Region",
    'label_values(refleet_operator_reflectors{namespace=~"$namespace"}, region)',
)
SESSION = lambda: query_var(  # noqa: E731
    "session",
    "Session",
    'label_values(refleet_operator_session_users{namespace=~"$namespace"}, session)',
    include_all=False,
    multi=False,
)
POD = lambda: query_var(  # noqa: E731
    "pod",
    "Reflector",
    'label_values(up{job="refleet-reflector", namespace=~"$namespace", region=~"$region"}, pod)',
)
ROUTER_REGION = lambda: query_var(  # noqa: E731
    "region", "Region", "label_values(refleet_operator_reflectors, region)"
)


def query(expr, legend, ref_id, instant, table_format=False):
    q = prometheus.Dataquery().ref_id(ref_id).datasource(DS).expr(expr).legend_format(legend)
    q = q.instant() if instant else q.range()
    if table_format:
        q.format(pm.PromQueryFormat.TABLE)
    return q


def thresholds(steps):
    """steps: (value, colour) pairs, the first with value None (the base colour)."""
    return (
        gd.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


def last_value():
    return common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)


class Board:
    """One dashboard: the SDK's builder lays panels out left to right in rows of 24 grid units;
    this numbers them (ids stay stable as long as the order does) and holds the shapes that
    repeat: time series, stat, table, bar gauge."""

    def __init__(self, uid, title, description, variables, tags):
        self.next_id = 1
        self.board = (
            gd.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(["refleet"] + tags)
            .editable()
            .tooltip(dm.DashboardCursorSync.CROSSHAIR)
            .version(1)
            .refresh("30s")
            .time("now-1h", "now")
            .timepicker(gd.TimePicker())
            .timezone("")
            .annotations([])
            # Every Refleet dashboard in one drop-down, keeping the variables and the time range.
            .link(
                gd.DashboardLink("Refleet")
                .type(dm.DashboardLinkType.DASHBOARDS)
                .tags(["refleet"])
                .as_dropdown(True)
                .include_vars(True)
                .keep_time(True)
            )
            .variables([datasource_var()] + variables)
        )

    def _id(self):
        self.next_id += 1
        return self.next_id - 1

    def _add(self, panel, title, description, unit, w, h):
        self.board.with_panel(
            panel.id(self._id()).title(title).description(description).datasource(DS)
            .unit(unit).span(w).height(h).overrides([])
        )

    def row(self, title):
        self.board.with_row(gd.Row(title).id(self._id()).collapsed(False))

    def ts(self, title, description, targets, unit="short", w=12, h=8, stack=False):
        panel = (
            timeseries.Panel()
            .targets([query(e, legend, "ABCDEFGH"[i], instant=False) for i, (e, legend) in enumerate(targets)])
            .legend(common.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST)
                    .placement(cm.LegendPlacement.BOTTOM).show_legend(True))
            .tooltip(common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
        )
        if stack:
            panel.stacking(common.StackingConfig().mode(cm.StackingMode.NORMAL)).fill_opacity(30)
        self._add(panel, title, description, unit, w, h)

    def stat(self, title, description, expr, unit="short", w=4, h=4, steps=None):
        panel = (
            stat.Panel()
            .with_target(query(expr, "", "A", instant=True))
            .reduce_options(last_value())
            .color_mode(cm.BigValueColorMode.VALUE)
            .graph_mode(cm.BigValueGraphMode.AREA)
            # Grafana's own defaults, written out: the SDK would otherwise emit nulls for them.
            .justify_mode(cm.BigValueJustifyMode.AUTO)
            .text_mode(cm.BigValueTextMode.AUTO)
            .orientation(cm.VizOrientation.AUTO)
            .percent_change_color_mode(cm.PercentChangeColorMode.STANDARD)
        )
        if steps:
            panel.thresholds(thresholds(steps))
        self._add(panel, title, description, unit, w, h)

    def table(self, title, description, expr, w=24, h=8):
        panel = (
            table.Panel()
            .with_target(query(expr, "", "A", instant=True, table_format=True))
            .show_header(True)
            # One row per series, its labels as columns.
            .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        )
        self._add(panel, title, description, "short", w, h)

    def bargauge(self, title, description, expr, legend, unit, w=12, h=8):
        panel = (
            bargauge.Panel()
            .with_target(query(expr, legend, "A", instant=True))
            .orientation(cm.VizOrientation.HORIZONTAL)
            .display_mode(cm.BarGaugeDisplayMode.GRADIENT)
            .reduce_options(last_value())
        )
        self._add(panel, title, description, unit, w, h)

    def json(self):
        return self.board.build()


def fleet_overview():
    b = Board(
        "refleet-fleet-overview",
        "Refleet / Fleet overview",
        "Users, sessions, shards and reflectors of the whole fleet, per region and state, how busy it is, "
        "live shard moves and the regional gateways.",
        [NAMESPACE(), REGION()],
        ["overview"],
    )
    sel = f'{RF}, namespace=~"$namespace", region=~"$region"'
    b.stat("Users", "Users connected to the fleet's shards (operator's per-Session count).",
           'sum(refleet_operator_session_users{namespace=~"$namespace"})')
    b.stat("Sessions on reflectors", "Croquet sessions held in memory by the reflectors.",
           f"sum(refleet_reflector_sessions{{{sel}}})")
    b.stat("Open shards", "Shards taking users (Open) or returning users only (Full).",
           'sum(refleet_operator_shards{namespace=~"$namespace", state=~"Open|Full"})')
    b.stat("Pending shards", "Shards waiting for a reflector with room.",
           'sum(refleet_operator_shards{namespace=~"$namespace", state="Pending"})',
           steps=[(None, "green"), (1, "orange")])
    b.stat("Ready reflectors", "Reflectors accepting shards.",
           'sum(refleet_operator_reflectors{namespace=~"$namespace", region=~"$region", state="ready"})')
    b.stat("Leader", "Operator instances holding the leader Lease: exactly 1 is healthy.",
           f"sum(refleet_operator_leader{{{OP}}})", steps=[(None, "red"), (1, "green"), (2, "red")])
    b.row("Load")
    b.ts("Users by region", "Clients that are members of a session, as the reflectors count them.",
         [(f"sum by (region) (refleet_reflector_users{{{sel}}})", "{{region}}")], stack=True)
    b.ts("Connections by region", "Open WebSocket connections (joined or not).",
         [(f"sum by (region) (refleet_reflector_connections{{{sel}}})", "{{region}}")], stack=True)
    b.ts("Messages per second", "Messages reflected (stamped and ordered) and frames delivered to clients.",
         [(f"sum by (region) (rate(refleet_reflector_messages_reflected_total{{{sel}}}[{RI}]))", "reflected {{region}}"),
          (f"sum by (region) (rate(refleet_reflector_deliveries_total{{{sel}}}[{RI}]))", "delivered {{region}}")],
         unit="ops")
    b.ts("Joins and leaves per second", "Users joining (SYNC sent) and leaving sessions.",
         [(f"sum(rate(refleet_reflector_joins_total{{{sel}}}[{RI}]))", "joins"),
          (f"sum(rate(refleet_reflector_leaves_total{{{sel}}}[{RI}]))", "leaves")], unit="ops")
    b.ts("Traffic", "Bytes received from and queued for clients.",
         [(f"sum(rate(refleet_reflector_received_bytes_total{{{sel}}}[{RI}]))", "received"),
          (f"sum(rate(refleet_reflector_sent_bytes_total{{{sel}}}[{RI}]))", "sent")], unit="Bps")
    b.ts("Closes by reason", "Connections the reflectors closed, by close reason (see the README's close codes).",
         [(f"sum by (reason) (rate(refleet_reflector_closes_total{{{sel}}}[{RI}])) > 0", "{{reason}}")], unit="ops")
    b.row("Placement")
    b.ts("Reflectors by region and state", "Reflector pods per region: starting (including ones to create), ready, draining.",
         [('sum by (region, state) (refleet_operator_reflectors{namespace=~"$namespace", region=~"$region"})',
           "{{region}} {{state}}")], stack=True)
    b.ts("Shards by state", "Shards of every Session: Pending, Open, Full, Closing.",
         [('sum by (state) (refleet_operator_shards{namespace=~"$namespace"})', "{{state}}")], stack=True)
    b.ts("Operator reconciliations", "Reconciliations per second by controller; those that left their pool's "
         "sync to one already waiting (coalesced); failed ones by error kind.",
         [(f"sum by (controller) (rate(refleet_operator_reconciles_total{{{OP}}}[{RI}]))", "{{controller}}"),
          (f"sum by (controller) (rate(refleet_operator_syncs_coalesced_total{{{OP}}}[{RI}]))",
           "coalesced {{controller}}"),
          (f"sum by (controller, error) (rate(refleet_operator_reconcile_errors_total{{{OP}}}[{RI}])) > 0",
           "failed {{controller}} {{error}}")], unit="ops")
    b.ts("Reconcile duration p90", "90th percentile of the duration of a reconciliation that synced its pool "
         "(its wait for the pool's lock and pace included), by controller.",
         [(f"histogram_quantile(0.9, sum by (le, controller) (rate(refleet_operator_reconcile_duration_seconds_bucket{{{OP}}}[{RI}])))",
           "{{controller}}")], unit="s")
    b.ts("Moves", "Live shard moves finished per interval by outcome (landed, failed, timed_out, aborted), "
         "and moves in flight.",
         [(f"sum by (outcome) (increase(refleet_router_moves_total[{RI}]))", "{{outcome}}"),
          ("sum(refleet_router_moves_in_flight)", "in flight")], w=24)
    gateway_row(b)
    return b


def gateway_row(b):
    """The regional WebSocket gateways: clients connect to one, and it proxies each connection
    to the reflector holding the client's shard. No job matcher: the gateway's scrape job is
    not settled yet, and its series carry their own region."""
    g = 'region=~"$region"'
    b.row("Gateway")
    b.ts("Gateway connections", "Client connections the gateways proxy to a reflector, by region.",
         [(f"sum by (region) (refleet_gateway_connections{{{g}}})", "{{region}}")], stack=True)
    b.ts("Gateway upgrades by outcome",
         "WebSocket upgrades per second: proxied, refused (bad_token, not_found, not_ready, moving, "
         "bad_request) or failed (upstream_error).",
         [(f"sum by (outcome) (rate(refleet_gateway_upgrades_total{{{g}}}[{RI}]))", "{{outcome}}")], unit="ops")
    b.ts("Gateway traffic", "Bytes per second the gateways forward to reflectors and to clients.",
         [(f"sum by (direction) (rate(refleet_gateway_bytes_total{{{g}}}[{RI}]))", "{{direction}}")], unit="Bps")
    b.ts("Gateway upstream connect time", "Time to open the connection to the reflector: p50 and p99 by region.",
         [(f"histogram_quantile({q}, sum by (le, region) (rate(refleet_gateway_upstream_connect_seconds_bucket{{{g}}}[{RI}])))",
           f"p{int(q * 100)} {{{{region}}}}") for q in (0.5, 0.99)], unit="s")


def region_capacity():
    b = Board(
        "refleet-region-capacity",
        "Refleet / Region capacity",
        "Committed shards and users against what the ready reflectors carry and what maxReflectors allows, headroom and scale events.",
        [NAMESPACE(), REGION()],
        ["capacity"],
    )
    sel = 'namespace=~"$namespace", region=~"$region"'
    for resource, what in (("users", "Users"), ("sessions", "Shards")):
        b.ts(f"{what}: committed vs capacity",
             f"{what} committed on each region's reflectors (each shard commits its maxUsersPerShard) "
             "against the ready reflectors' capacity and the capacity at maxReflectors.",
             [(f'sum by (region) (refleet_operator_region_used{{{sel}, resource="{resource}"}})', "committed {{region}}"),
              (f'sum by (region) (refleet_operator_region_capacity{{{sel}, resource="{resource}"}})', "ready capacity {{region}}"),
              (f'sum by (region) (refleet_operator_region_capacity_limit{{{sel}, resource="{resource}"}})', "limit {{region}}")])
    b.bargauge("Used share of the limit",
               "Committed over the capacity at maxReflectors, by region and resource; the RefleetRegionNearFull alert fires above 85 %.",
               f"max by (region, resource) (refleet_operator_region_used{{{sel}}} / refleet_operator_region_capacity_limit{{{sel}}})",
               "{{region}} {{resource}}", unit="percentunit")
    b.ts("Headroom", "What the region can still take: up to maxReflectors, and on the reflectors ready now.",
         [(f'sum by (region) (refleet_operator_region_capacity_limit{{{sel}, resource="users"}} - refleet_operator_region_used{{{sel}, resource="users"}})',
           "users to limit {{region}}"),
          (f'sum by (region) (refleet_operator_region_capacity{{{sel}, resource="users"}} - refleet_operator_region_used{{{sel}, resource="users"}})',
           "users on ready reflectors {{region}}")])
    b.ts("Reflectors by state", "Starting, ready and draining reflectors per region.",
         [(f"sum by (region, state) (refleet_operator_reflectors{{{sel}}})", "{{region}} {{state}}")], stack=True)
    b.ts("Reflectors wanted and the growth buffer",
         "Reflectors the planner wants per region (busy + pending + the larger of warmBuffer and the growth buffer), and the growth buffer: empty reflectors kept for the region's growth over growthBufferSeconds.",
         [(f"sum by (region) (refleet_operator_region_desired_reflectors{{{sel}}})", "wanted {{region}}"),
          (f"sum by (region) (refleet_operator_region_growth_buffer{{{sel}}})", "growth buffer {{region}}")])
    b.ts("Scale events", "Planner decisions that change the fleet's size, per interval.",
         [(f'sum by (kind) (increase(refleet_operator_planner_decisions_total{{{OP}, kind=~"scale_up|drain_reflector|remove_reflector|scale_held"}}[{RI}]))',
           "{{kind}}")])
    b.ts("Shard decisions", "Shards opened, closed and removed, and Sessions degraded (e.g. CapacityExhausted), per interval.",
         [(f'sum by (kind) (increase(refleet_operator_planner_decisions_total{{{OP}, kind=~"open_shard|close_shard|remove_shard|session_degraded"}}[{RI}]))',
           "{{kind}}")])
    b.ts("Pending shards and shards over cap", "Shards waiting for room, and shards with more users than maxUsersPerShard.",
         [('sum(refleet_operator_shards{namespace=~"$namespace", state="Pending"})', "pending"),
          (f"sum by (region) (refleet_operator_shards_over_cap{{{sel}}})", "over cap {{region}}")])
    b.ts("Draining reflectors (reflector side)", "Reflectors that report draining.",
         [(f"sum by (region) (refleet_reflector_draining{{{RF}, {sel}}})", "{{region}}")])
    return b


def session_drilldown():
    b = Board(
        "refleet-session",
        "Refleet / Session",
        "One Session: its shards, users per shard and join rate, from the operator's per-Session metrics.",
        [NAMESPACE(), SESSION()],
        ["session"],
    )
    s = 'namespace=~"$namespace", session="$session"'
    b.stat("Users", "Users over the Session's shards.", f"sum(refleet_operator_session_users{{{s}}})", w=6)
    b.stat("Open shards", "Shards of the Session that are not closing.",
           f"sum(refleet_operator_session_shards{{{s}}})", w=6)
    b.stat("Users per shard", "Users over open shards (average).",
           f"sum(refleet_operator_session_users{{{s}}}) / clamp_min(sum(refleet_operator_session_shards{{{s}}}), 1)", w=6)
    b.stat("Share of the namespace's users", "This Session's users over all users of its namespace.",
           f'sum(refleet_operator_session_users{{{s}}}) / clamp_min(sum(refleet_operator_session_users{{namespace=~"$namespace"}}), 1)',
           unit="percentunit", w=6)
    b.ts("Users and shards", "Users of the Session and its open shards over time.",
         [(f"sum(refleet_operator_session_users{{{s}}})", "users"),
          (f"sum(refleet_operator_session_shards{{{s}}})", "shards")])
    b.ts("Users per shard", "Average users per open shard; a new shard opens when every shard reaches the Session's scaleUpThreshold.",
         [(f"sum(refleet_operator_session_users{{{s}}}) / clamp_min(sum(refleet_operator_session_shards{{{s}}}), 1)", "users per shard")])
    b.ts("Join rate", "Net users joining per minute (joins minus leaves), from the change of the Session's user count.",
         [(f"sum(deriv(refleet_operator_session_users{{{s}}}[5m])) * 60", "net joins per minute")], unit="short")
    b.ts("Shard changes (all Sessions)", "Shards the planner opened and closed, fleet-wide, per interval.",
         [(f'sum by (kind) (increase(refleet_operator_planner_decisions_total{{{OP}, kind=~"open_shard|close_shard"}}[{RI}]))', "{{kind}}")])
    b.table("Busiest Sessions of the namespace", "The 20 Sessions with the most users.",
            'topk(20, sum by (namespace, session) (refleet_operator_session_users{namespace=~"$namespace"}))')
    return b


def routing():
    b = Board(
        "refleet-routing",
        "Refleet / Routing",
        "The router on the leading operator: Route requests, latency, errors by code, reservations, shard opens and report streams.",
        [ROUTER_REGION()],
        ["routing"],
    )
    req = f"refleet_router_requests_total{{{OP}}}"
    b.stat("Route requests/s", "Route requests over every transport.", f"sum(rate({req}[{RI}]))", unit="reqps", w=6)
    b.stat("Errors", "Share of Route requests not answered OK.",
           f'sum(rate(refleet_router_requests_total{{{OP}, code!="OK"}}[{RI}])) / clamp_min(sum(rate({req}[{RI}])), 1e-9)',
           unit="percentunit", w=6, steps=[(None, "green"), (0.05, "red")])
    b.stat("p99 latency", "99th percentile of Route request duration.",
           f"histogram_quantile(0.99, sum by (le) (rate(refleet_router_request_duration_seconds_bucket{{{OP}}}[{RI}])))",
           unit="s", w=6)
    b.stat("Reservations", "Routes handed out, not yet joined or expired.",
           'sum(refleet_router_reservations{region=~"$region"})', w=6)
    b.ts("Requests by transport", "Route requests per second: gRPC, gRPC-Web, JSON.",
         [(f"sum by (transport) (rate({req}[{RI}]))", "{{transport}}")], unit="reqps")
    b.ts("Errors by code", "Route requests per second that were not OK, by gRPC code.",
         [(f'sum by (code) (rate(refleet_router_requests_total{{{OP}, code!="OK"}}[{RI}]))', "{{code}}")], unit="reqps")
    b.ts("Latency percentiles", "Route request duration: p50, p90, p99.",
         [(f"histogram_quantile({q}, sum by (le) (rate(refleet_router_request_duration_seconds_bucket{{{OP}}}[{RI}])))", f"p{int(q * 100)}")
          for q in (0.5, 0.9, 0.99)], unit="s")
    b.ts("p99 latency by transport", "99th percentile of Route request duration per transport.",
         [(f"histogram_quantile(0.99, sum by (le, transport) (rate(refleet_router_request_duration_seconds_bucket{{{OP}}}[{RI}])))",
           "{{transport}}")], unit="s")
    b.ts("Reservations by region", "Routes handed out and not yet joined or expired.",
         [('sum by (region) (refleet_router_reservations{region=~"$region"})', "{{region}}")])
    b.ts("Shard opens by region", "Shards the router asked to open, per interval.",
         [(f'sum by (region) (increase(refleet_router_shard_opens_total{{region=~"$region"}}[{RI}]))', "{{region}}")])
    b.ts("Waiting Routes", "Route calls waiting for a shard that is opening, and their attempts per second after the first by what woke them: a change on their session's reflectors (session), a plan or a new leader's catch-up (fleet), or the 1 s retry (tick).",
         [(f"sum(refleet_router_waiting_routes{{{OP}}})", "waiting"),
          (f"sum by (cause) (rate(refleet_router_route_retries_total{{{OP}}}[{RI}]))", "retries/s {{cause}}")])
    b.ts("Report streams", "Reflectors with a live report stream to the leader, against reflectors up.",
         [('sum by (region) (refleet_report_streams{region=~"$region"})', "streams {{region}}"),
          (f'count by (region) (up{{{RF}, region=~"$region"}} == 1)', "reflectors up {{region}}")])
    b.ts("Report stream disconnects", "Report streams that ended, per interval.",
         [(f"sum(increase(refleet_report_stream_disconnects_total{{{OP}}}[{RI}]))", "disconnects")])
    b.ts("Join refusals by reason", "JOINs the reflectors refused: missing/invalid/expired token, wrong shard, shard full.",
         [(f'sum by (reason) (rate(refleet_reflector_join_refusals_total{{{RF}, region=~"$region"}}[{RI}]))', "{{reason}}")],
         unit="ops")
    b.ts("Reflectors without a report stream", "Reflectors whose report stream is down (reflector side).",
         [(f'count by (region) (refleet_reflector_report_stream_connected{{{RF}, region=~"$region"}} == 0)', "{{region}}")])
    return b


def reflector_internals():
    b = Board(
        "refleet-reflector",
        "Refleet / Reflector internals",
        "Per-reflector send queues, slow clients, snapshots, persistence and stored session state.",
        [NAMESPACE(), REGION(), POD()],
        ["reflector"],
    )
    sel = f'{RF}, namespace=~"$namespace", region=~"$region", pod=~"$pod"'

    def per_pod(title, description, metric, unit="ops", by="pod", legend="{{pod}}", rate=True, extra=""):
        expr = f"rate({metric}{{{sel}{extra}}}[{RI}])" if rate else f"{metric}{{{sel}{extra}}}"
        b.ts(title, description, [(f"sum by ({by}) ({expr})", legend)], unit=unit)

    per_pod("Send-queue drops", "Frames that did not fit a client's full send queue (the client is then disconnected).",
            "refleet_reflector_send_queue_drops_total")
    per_pod("Slow-client disconnects", "Clients disconnected (4001) because they did not read fast enough.",
            "refleet_reflector_slow_client_disconnects_total")
    per_pod("Snapshots", "SNAP announcements by result.", "refleet_reflector_snapshots_total",
            by="result", legend="{{result}}")
    per_pod("Persistence operations", "SAVE records stored and persisted-data look-ups at session start.",
            "refleet_reflector_persistence_operations_total", by="op", legend="{{op}}")
    per_pod("Stored session state", "Sessions stored for a later resume, and resumed, by result.",
            "refleet_reflector_session_state_operations_total", by="op, result", legend="{{op}} {{result}}")
    per_pod("Session ends", "Sessions leaving memory: empty, or drained.", "refleet_reflector_session_ends_total",
            by="cause", legend="{{cause}}")
    per_pod("Files requests", "Files endpoint requests by method and status class.",
            "refleet_reflector_files_requests_total", unit="reqps", by="method, status", legend="{{method}} {{status}}")
    per_pod("Files bytes", "Bytes uploaded (in) and downloaded (out) through the files endpoint.",
            "refleet_reflector_files_bytes_total", unit="Bps", by="direction", legend="{{direction}}")
    per_pod("Messages received by action", "Frames received from clients by protocol action.",
            "refleet_reflector_messages_received_total", by="action", legend="{{action}}")
    per_pod("Ticks sent", "TICK messages sent to clients.", "refleet_reflector_ticks_total")
    per_pod("Connections", "Open WebSocket connections per reflector.", "refleet_reflector_connections",
            unit="short", rate=False)
    per_pod("Sessions in memory", "Sessions held by each reflector.", "refleet_reflector_sessions",
            unit="short", rate=False)
    per_pod("Draining", "1 while a reflector drains.", "refleet_reflector_draining", unit="short", rate=False)
    b.ts("Scrape health", "Whether Prometheus reaches each reflector (the RefleetReflectorDown alert).",
         [(f"up{{{sel}}}", "{{pod}}")])
    per_pod("Report stream", "1 while the reflector's report stream to the operator is connected.",
            "refleet_reflector_report_stream_connected", unit="short", rate=False)
    per_pod("Join refusals", "JOINs refused by reason.", "refleet_reflector_join_refusals_total",
            by="reason", legend="{{reason}}")
    b.table("Versions", "Reflector builds by pod.",
            f'max by (pod, region, version) (refleet_build_info{{{sel}, component="reflector"}})', h=6)
    return b


BOARDS = {
    "fleet-overview.json": fleet_overview,
    "region-capacity.json": region_capacity,
    "session.json": session_drilldown,
    "routing.json": routing,
    "reflector-internals.json": reflector_internals,
}


def render(board):
    return json.dumps(board.json(), cls=JSONEncoder, indent=2) + "\n"


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for name, build in BOARDS.items():
        text = render(build())
        path = OUT / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("dashboards out of date (run dashboards/tools/build_dashboards.py with the SDK of "
              "dashboards/tools/requirements.txt): " + ", ".join(stale), file=sys.stderr)
        sys.exit(1)
    if not check:
        print(f"wrote {len(BOARDS)} dashboards to {OUT}")


if __name__ == "__main__":
    main()
