//! The fleet view's HTML, rendered on the server: the whole page for a first load (complete
//! without JavaScript), and the same fragments pushed over Server-Sent Events, which the
//! page's script swaps in. Every text that comes from a config, a client or a reflector
//! (session, app, shard and reflector names, events) goes through [`escape`].

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use super::Snapshot;
use super::events::Event;
use super::status::{RegionView, Status};

/// `text` safe inside HTML text and double- or single-quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON safe inside a `<script>` element: `<`, `>` and `&` as `\u` escapes, so no value can
/// close the element or open a comment (a JSON string may hold them escaped just the same).
pub fn script_json(value: &impl serde::Serialize) -> String {
    let json = serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned());
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn region_users(r: &RegionView) -> u32 {
    r.reflectors
        .iter()
        .fold(0u32, |a, x| a.saturating_add(x.users))
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// One line about the whole fleet.
pub fn summary(status: &Status) -> String {
    let reflectors = status.regions.iter().map(|r| r.reflectors.len()).sum();
    let users = status
        .regions
        .iter()
        .fold(0u32, |a, r| a.saturating_add(region_users(r)));
    format!(
        "{}, {}, {}, {}",
        plural(status.regions.len(), "region", "regions"),
        plural(reflectors, "reflector", "reflectors"),
        plural(status.shards.len(), "shard", "shards"),
        plural(users as usize, "user", "users"),
    )
}

/// The tables: one per region with its reflectors, then every shard.
pub fn fleet(status: &Status) -> String {
    let mut out = String::new();
    if status.regions.is_empty() {
        out.push_str("<p class=\"empty\">No regions yet.</p>");
    }
    for region in &status.regions {
        let name = escape(&region.name);
        let users = region_users(region);
        let _ = write!(
            out,
            "<table class=\"reflectors\" data-region=\"{name}\"><caption>Region <strong>{name}</strong> \
             <span class=\"pool\">(pool {pool})</span>: {count}, \
             <span class=\"region-users\" data-users=\"{users}\">{users_text}</span></caption>\
             <thead><tr><th scope=\"col\">Reflector</th><th scope=\"col\">State</th>\
             <th scope=\"col\">Users</th><th scope=\"col\">Shards</th>\
             <th scope=\"col\">CPU</th><th scope=\"col\">Memory</th></tr></thead><tbody>",
            pool = escape(&region.pool),
            count = plural(region.reflectors.len(), "reflector", "reflectors"),
            users_text = plural(users as usize, "user", "users"),
        );
        if region.reflectors.is_empty() {
            out.push_str("<tr><td colspan=\"6\">No reflectors.</td></tr>");
        }
        for r in &region.reflectors {
            let shards = if r.shards.is_empty() {
                "—".to_owned()
            } else {
                escape(&r.shards.join(", "))
            };
            let _ = write!(
                out,
                "<tr data-reflector=\"{name}\"><th scope=\"row\">{name}</th>\
                 <td data-label=\"State\" class=\"state state-{state_class}\">{state}</td>\
                 <td data-label=\"Users\" class=\"users\" data-users=\"{users}\">{users}</td>\
                 <td data-label=\"Shards\">{shards}</td>\
                 <td data-label=\"CPU\" class=\"cpu\">{cpu}</td>\
                 <td data-label=\"Memory\" class=\"memory\">{memory}</td></tr>",
                name = escape(&r.name),
                state = escape(r.state),
                state_class = escape(&r.state.to_lowercase()),
                users = r.users,
                cpu = r
                    .cpu_percent
                    .map_or_else(|| "—".to_owned(), |c| format!("{c:.0}%")),
                memory = r.rss_bytes.map_or_else(|| "—".to_owned(), mebibytes),
            );
        }
        out.push_str("</tbody></table>");
    }
    out.push_str(
        "<table class=\"shards\"><caption>Shards</caption><thead><tr>\
         <th scope=\"col\">Shard</th><th scope=\"col\">Session</th><th scope=\"col\">App</th>\
         <th scope=\"col\">Region</th><th scope=\"col\">Reflector</th>\
         <th scope=\"col\">Users / cap</th><th scope=\"col\">Phase</th></tr></thead><tbody>",
    );
    if status.shards.is_empty() {
        out.push_str("<tr><td colspan=\"7\">No shards.</td></tr>");
    }
    for s in &status.shards {
        let meter = if s.max_users > 0 {
            format!(
                " <meter min=\"0\" max=\"{max}\" high=\"{high}\" optimum=\"0\" value=\"{v}\" \
                 aria-label=\"{u} of {max} users\">{u} of {max}</meter>",
                max = s.max_users,
                high = s.threshold_users,
                v = s.users.min(s.max_users),
                u = s.users,
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "<tr data-shard=\"{shard}\" data-session=\"{ns}/{session}\"><th scope=\"row\">{shard}</th>\
             <td data-label=\"Session\">{ns}/{session}</td><td data-label=\"App\">{app}</td>\
             <td data-label=\"Region\">{region}</td><td data-label=\"Reflector\">{reflector}</td>\
             <td data-label=\"Users / cap\" class=\"users\" data-users=\"{users}\">\
             <span class=\"count\">{users}</span> / {max}{meter} \
             <small>threshold {threshold}</small></td>\
             <td data-label=\"Phase\" class=\"phase\">{phase:?}</td></tr>",
            shard = escape(&s.name),
            ns = escape(&s.namespace),
            session = escape(&s.session),
            app = escape(&s.app_id),
            region = escape(&s.region),
            reflector = s
                .reflector
                .as_deref()
                .map_or_else(|| "(pending)".to_owned(), escape),
            users = s.users,
            max = s.max_users,
            threshold = s.threshold_users,
            phase = s.phase,
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// `HH:MM:SS` (UTC) and the full RFC 3339 time of a Unix millisecond.
fn clock(at_ms: u64) -> (String, String) {
    let full =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(at_ms)).to_string();
    let short = full.get(11..19).unwrap_or(&full).to_owned();
    (short, full)
}

/// The recent events, newest first.
pub fn events(events: &[Event]) -> String {
    let mut out = String::from(
        "<table class=\"events\"><caption>Recent events (UTC)</caption><thead><tr>\
         <th scope=\"col\">Time</th><th scope=\"col\">Event</th></tr></thead><tbody>",
    );
    if events.is_empty() {
        out.push_str("<tr><td colspan=\"2\">Nothing yet.</td></tr>");
    }
    for e in events.iter().rev() {
        let (short, full) = clock(e.at_ms);
        let _ = write!(
            out,
            "<tr><td data-label=\"Time\"><time datetime=\"{full}\">{short}</time></td>\
             <td data-label=\"Event\">{}</td></tr>",
            escape(&e.text)
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// The message pushed on every change: the fragments and the chart data, as JSON.
pub fn message(snap: &Snapshot) -> String {
    serde_json::json!({
        "summary": summary(&snap.status),
        "fleet": fleet(&snap.status),
        "events": events(&snap.events),
        "history": snap.history,
    })
    .to_string()
}

/// The whole page. `title` names the program serving it (`refleet up`, `refleet operator`).
pub fn page(snap: &Snapshot, title: &str) -> String {
    let title = escape(title);
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Refleet fleet — {title}</title>\
         <link rel=\"stylesheet\" href=\"view/style.css\"></head><body>\
         <header><h1>Refleet fleet <small>{title}, read-only</small></h1>\
         <p id=\"summary\" aria-live=\"polite\">{summary}</p>\
         <p id=\"live\" class=\"live\" role=\"status\">Static page: reload to update \
         (live updates need JavaScript).</p></header><main>\
         <section id=\"fleet\" aria-label=\"Regions, reflectors and shards\">{fleet}</section>\
         <section id=\"charts\" aria-label=\"The last minutes\">\
         <figure><figcaption id=\"users-caption\">Users per region</figcaption>\
         <svg id=\"chart-users\" class=\"chart\" viewBox=\"0 0 320 120\" role=\"img\" \
         aria-labelledby=\"users-caption\"></svg><ul id=\"legend-users\" class=\"legend\"></ul></figure>\
         <figure><figcaption id=\"routes-caption\">Route calls per second</figcaption>\
         <svg id=\"chart-routes\" class=\"chart\" viewBox=\"0 0 320 120\" role=\"img\" \
         aria-labelledby=\"routes-caption\"></svg></figure>\
         <noscript><p>The charts are drawn by JavaScript.</p></noscript></section>\
         <section id=\"events\" aria-label=\"Recent events\">{events}</section></main>\
         <script id=\"history\" type=\"application/json\">{history}</script>\
         <script src=\"view/index.js\" defer></script></body></html>\n",
        summary = escape(&summary(&snap.status)),
        fleet = fleet(&snap.status),
        events = events(&snap.events),
        history = script_json(&snap.history),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::crd::ShardPhase;
    use crate::view::status::{ReflectorView, ShardView};

    const EVIL: &str = "<script>alert('x')</script>&\"";

    fn snapshot() -> Snapshot {
        Snapshot {
            status: Status {
                regions: vec![RegionView {
                    pool: "default/local".into(),
                    name: "local-a".into(),
                    desired: 1,
                    reflectors: vec![ReflectorView {
                        name: "local-a-1".into(),
                        state: "Ready",
                        pid: None,
                        cpu_percent: Some(12.0),
                        rss_bytes: Some(48 * 1024 * 1024),
                        url: None,
                        files_url: String::new(),
                        users: 3,
                        shards: vec![EVIL.into()],
                    }],
                }],
                shards: vec![ShardView {
                    namespace: "default".into(),
                    session: EVIL.into(),
                    app_id: format!("app{EVIL}"),
                    session_name: EVIL.into(),
                    name: EVIL.into(),
                    index: 0,
                    region: "local-a".into(),
                    reflector: Some("local-a-1".into()),
                    url: None,
                    files_url: None,
                    users: 3,
                    max_users: 10,
                    threshold_users: 8,
                    phase: ShardPhase::Open,
                }],
                ..Status::default()
            },
            events: vec![Event {
                at_ms: 1_700_000_000_000,
                app: None,
                text: format!("shard {EVIL} opened"),
            }],
            history: vec![],
        }
    }

    #[test]
    fn escaping_covers_markup_and_both_quotes() {
        assert_eq!(
            escape(EVIL),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        assert_eq!(escape("lobby~1 ü"), "lobby~1 ü");
    }

    #[test]
    fn names_from_sessions_and_clients_never_become_markup() {
        let snap = snapshot();
        let html = page(&snap, "refleet up");
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("'x'"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        // The page has exactly its own two script elements.
        assert_eq!(html.matches("<script").count(), 2, "{html}");
        let msg: serde_json::Value = serde_json::from_str(&message(&snap)).unwrap();
        for part in ["fleet", "events"] {
            let fragment = msg[part].as_str().unwrap();
            assert!(!fragment.contains("<script"), "{part}: {fragment}");
            assert!(fragment.contains("&lt;script&gt;"), "{part}: {fragment}");
        }
    }

    #[test]
    fn embedded_json_cannot_close_its_script_element() {
        let json = script_json(&serde_json::json!({"name": "</script><b>&"}));
        assert!(!json.contains('<') && !json.contains('>') && !json.contains('&'));
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["name"], "</script><b>&");
    }

    #[test]
    fn tables_are_semantic_and_carry_counts() {
        let html = fleet(&snapshot().status);
        assert!(html.contains("<caption>Region <strong>local-a</strong>"));
        assert!(html.contains("<th scope=\"col\">Reflector</th>"));
        assert!(html.contains("<th scope=\"row\">local-a-1</th>"));
        assert!(html.contains("class=\"cpu\">12%</td>"), "{html}");
        assert!(html.contains("class=\"memory\">48.0 MiB</td>"), "{html}");
        assert!(html.contains("data-users=\"3\">3 users</span>"));
        assert!(html.contains("<span class=\"count\">3</span> / 10"));
        assert!(html.contains("high=\"8\""));
        assert!(html.contains(">Open</td>"));
        assert_eq!(
            summary(&snapshot().status),
            "1 region, 1 reflector, 1 shard, 3 users"
        );
        let empty = fleet(&Status::default());
        assert!(empty.contains("No regions yet.") && empty.contains("No shards."));
    }

    #[test]
    fn events_are_newest_first_with_their_time() {
        let mut evs = snapshot().events;
        evs.push(Event {
            at_ms: 1_700_000_001_000,
            app: None,
            text: "second".into(),
        });
        let html = events(&evs);
        assert!(html.find("second").unwrap() < html.find("opened").unwrap());
        assert!(html.contains("<time datetime=\"2023-11-14T22:13:21Z\">22:13:21</time>"));
    }
}
