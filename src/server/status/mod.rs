//! The operator's status page (`GET /status` on the admin listener): one self-contained HTML
//! document — inline CSS, server-rendered inline SVG, no script, no external asset — with the
//! clock, its sources, plots of the offset, the error bound and the request rates, the signer
//! and its certificate, and the clock's recent events.
//!
//! [`gather`] reads the server; [`render`] is pure (a [`Page`] in, HTML out) and escapes every
//! value it writes.

use std::fmt::Write;
use std::time::UNIX_EPOCH;

mod chart;

use chart::{chart, Chart, Line, Quantity, W, W_WIDE};

use super::history::{Point, COARSE_EVERY, COARSE_LEN, FINE_INTERVAL};
use super::Tsa;
use crate::clock::discipline::{Selection, SourceView, SystemView};
use crate::clock::{ClockEvent, RefusalKind, SyncState};

/// Everything the page shows, read at one instant.
#[derive(Clone, Debug)]
pub struct Page {
    /// UTC now, as the TSA's clock reads it (ns since the Unix epoch).
    pub now_ns: u64,
    pub version: &'static str,
    pub clock: ClockStatus,
    pub sources: Vec<SourceView>,
    pub signer: SignerStatus,
    /// Tokens issued and requests rejected since start.
    pub tokens: u64,
    pub rejections: u64,
    /// The history rings, oldest first: one point a second (minutes), one every ten (hours).
    pub fine: Vec<Point>,
    pub coarse: Vec<Point>,
    /// The clock's recent events, oldest first.
    pub events: Vec<ClockEvent>,
}

#[derive(Clone, Debug)]
pub struct ClockStatus {
    /// The kind of source: `disciplined`, `kernel`, `development`.
    pub source: &'static str,
    pub state: SyncState,
    pub reason: String,
    pub bound_ns: Option<u64>,
    /// The accuracy the TSA declares; it refuses to stamp beyond it.
    pub declared_ns: u64,
    /// The discipline's system view (disciplined clock only).
    pub system: Option<SystemView>,
    /// Requests refused with timeNotAvailable, by reason.
    pub refusals: Vec<(&'static str, u64)>,
}

#[derive(Clone, Debug)]
pub struct SignerStatus {
    pub algorithm: &'static str,
    pub subject: String,
    /// The certificate's notAfter (ns since the Unix epoch).
    pub not_after_ns: u64,
    /// Whether the key can sign now.
    pub health: Result<(), String>,
    /// Whether the TSA issues now (clock, signer, last signature).
    pub readiness: Result<(), String>,
    /// A planned rollover still to come: its instant (ns), the next key's algorithm and
    /// certificate subject.
    pub next: Option<(u64, &'static str, String)>,
    /// Requests admitted and not yet answered, the limit, and the requests waiting for a
    /// place.
    pub queue: (usize, usize, usize),
}

/// Reads the page's data from the running server.
pub fn gather(tsa: &Tsa) -> Page {
    let clock = tsa.clock();
    let reading = clock.reading();
    let views = clock.views().unwrap_or_default();
    let (tokens, rejections) = tsa.metrics.totals();
    let (fine, coarse) = tsa.metrics.history.points();
    let not_after_ns = tsa
        .certificate()
        .not_after()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Page {
        now_ns: reading.unix_ns,
        version: env!("CARGO_PKG_VERSION"),
        clock: ClockStatus {
            source: clock.source_name(),
            state: reading.state,
            reason: reading.reason.to_string(),
            bound_ns: (reading.bound_ns != u64::MAX).then_some(reading.bound_ns),
            declared_ns: clock.max_bound().as_nanos() as u64,
            system: views.system,
            refusals: RefusalKind::ALL
                .iter()
                .map(|k| (k.name(), clock.refusals(*k)))
                .collect(),
        },
        sources: views.sources,
        signer: SignerStatus {
            algorithm: tsa.signer().algorithm().name(),
            subject: tsa.certificate().subject(),
            not_after_ns,
            health: tsa.signer().health(),
            readiness: tsa.readiness(),
            next: tsa
                .rollover()
                .filter(|r| r.at_unix_ns() > crate::clock::system_unix_ns())
                .map(|r| {
                    (
                        r.at_unix_ns(),
                        r.signer.algorithm().name(),
                        r.issuing.load().certificate().subject(),
                    )
                }),
            queue: (
                tsa.admission.depth(),
                tsa.admission.max_queue(),
                tsa.admission.waiting(),
            ),
        },
        tokens,
        rejections,
        fine,
        coarse,
        events: clock.recent_events(),
    }
}

/// Events listed on the page, newest first.
const EVENTS_SHOWN: usize = 60;
/// The page reloads itself (a meta refresh: no script).
const REFRESH_S: u32 = 10;
/// The hours plot takes the coarse ring once it holds this many points (5 minutes).
const COARSE_MIN_POINTS: usize = 30;
/// The shortest time axis (just after start).
const MIN_WINDOW_NS: u64 = 10_000_000_000;

/// Escapes text for HTML content and attribute values.
pub fn esc(text: &str) -> String {
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

/// UTC as `2025-01-31 23:59:59 UTC` (the format given by `fmt`).
fn utc(unix_ns: u64, fmt: &str) -> String {
    chrono::DateTime::from_timestamp_nanos(unix_ns.min(i64::MAX as u64) as i64)
        .format(fmt)
        .to_string()
}

fn utc_full(unix_ns: u64) -> String {
    utc(unix_ns, "%Y-%m-%d %H:%M:%S UTC")
}

/// A duration with three significant digits in ns, µs, ms or s.
fn fmt_ns(ns: u64) -> String {
    let (value, unit) = match ns {
        0..=999 => return format!("{ns} ns"),
        1_000..=999_999 => (ns as f64 / 1e3, "µs"),
        1_000_000..=999_999_999 => (ns as f64 / 1e6, "ms"),
        _ => (ns as f64 / 1e9, "s"),
    };
    let decimals = if value < 10.0 {
        2
    } else if value < 100.0 {
        1
    } else {
        0
    };
    format!("{value:.decimals$} {unit}")
}

/// A span of time in whole units: `42 s`, `9 min 59 s`, `5 h 50 min`.
fn fmt_span(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

fn signed_ns(ns: i64) -> String {
    let sign = if ns < 0 { "-" } else { "+" };
    format!("{sign}{}", fmt_ns(ns.unsigned_abs()))
}

fn or_dash<T>(value: Option<T>, f: impl FnOnce(T) -> String) -> String {
    value.map(f).unwrap_or_else(|| "–".into())
}

/// The page.
pub fn render(page: &Page) -> String {
    let mut h = String::with_capacity(64 * 1024);
    let state = page.clock.state.name();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <title>TSA status: {}</title><style>{STYLE}</style></head><body>",
        esc(state)
    );
    header(&mut h, page);
    h.push_str("<main>");
    h.push_str("<div class=\"cards\">");
    clock_card(&mut h, page);
    signer_card(&mut h, page);
    requests_card(&mut h, page);
    h.push_str("</div>");
    sources(&mut h, page);
    plots(&mut h, page);
    events(&mut h, page);
    let _ = writeln!(
        h,
        "</main><footer>tsa {} · rendered {} · this page reloads every {REFRESH_S} s · \
         <a href=\"/metrics\">metrics</a> · <a href=\"/clock\">clock</a> · \
         <a href=\"/health/ready\">readiness</a></footer></body></html>",
        esc(page.version),
        esc(&utc_full(page.now_ns))
    );
    h
}

fn header(h: &mut String, page: &Page) {
    let c = &page.clock;
    let state = c.state.name();
    let (issuing_class, issuing) = match &page.signer.readiness {
        Ok(()) => ("ok", "issuing time-stamps".to_string()),
        Err(reason) => ("bad", format!("not issuing: {reason}")),
    };
    let bound = or_dash(c.bound_ns, fmt_ns);
    let _ = write!(
        h,
        "<header class=\"top\"><div class=\"title\"><h1>Time-Stamp Authority</h1>\
         <div class=\"sub\">{} · {} clock</div></div>\
         <div class=\"state\"><span id=\"clock-state\" class=\"badge big st-{}\">{}</span>\
         <div class=\"reason\" id=\"clock-reason\">{}</div>\
         <div class=\"bound\">error bound <b id=\"clock-bound\">{}</b> · declared accuracy {}</div></div>\
         <div id=\"issuing\" class=\"issuing {issuing_class}\">{}</div></header>",
        esc(&utc_full(page.now_ns)),
        esc(c.source),
        esc(state),
        esc(state),
        esc(&c.reason),
        esc(&bound),
        esc(&fmt_ns(c.declared_ns)),
        esc(&issuing),
    );
}

fn row(h: &mut String, label: &str, value: &str) {
    let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(label), value);
}

fn clock_card(h: &mut String, page: &Page) {
    let c = &page.clock;
    h.push_str("<section class=\"card\" id=\"clock\"><h2>Clock</h2><table class=\"kv\">");
    row(h, "Source", &esc(c.source));
    row(
        h,
        "State",
        &format!(
            "<span class=\"badge st-{0}\">{0}</span>",
            esc(c.state.name())
        ),
    );
    row(h, "Reason", &esc(&c.reason));
    row(h, "Error bound", &esc(&or_dash(c.bound_ns, fmt_ns)));
    row(h, "Declared accuracy", &esc(&fmt_ns(c.declared_ns)));
    if let Some(s) = &c.system {
        row(
            h,
            "Offset (UTC − local)",
            &esc(&or_dash(s.offset_ns, signed_ns)),
        );
        row(
            h,
            "Frequency",
            &esc(&or_dash(s.frequency_ppm, |f| format!("{f:+.3} ppm"))),
        );
        row(
            h,
            "Last update",
            &esc(&s
                .since_update_ns
                .map_or_else(|| "never".into(), |n| format!("{} ago", fmt_ns(n)))),
        );
        row(
            h,
            "Pending step",
            &esc(&s.pending_step_ns.map_or_else(|| "none".into(), signed_ns)),
        );
        row(
            h,
            "Leap second",
            &esc(&s.leap.map_or_else(
                || "none".into(),
                |(kind, at)| format!("{kind:?} at {}", utc_full(at)),
            )),
        );
    }
    h.push_str("</table></section>");
}

fn signer_card(h: &mut String, page: &Page) {
    let s = &page.signer;
    h.push_str(
        "<section class=\"card\" id=\"signer\"><h2>Signer &amp; certificate</h2><table class=\"kv\">",
    );
    row(h, "Algorithm", &esc(s.algorithm));
    row(
        h,
        "Subject",
        &format!(
            "<span id=\"certificate-subject\">{}</span>",
            esc(&s.subject)
        ),
    );
    let left_ns = s.not_after_ns.saturating_sub(page.now_ns);
    let days = left_ns / (86_400 * 1_000_000_000);
    let (class, left) = if left_ns == 0 {
        ("bad", "expired".to_string())
    } else if days < 7 {
        ("bad", format!("{days} days left"))
    } else if days < 30 {
        ("warn", format!("{days} days left"))
    } else {
        ("ok", format!("{days} days left"))
    };
    row(
        h,
        "Not after",
        &format!(
            "{} <span id=\"certificate-days\" class=\"pill {class}\">{}</span>",
            esc(&utc_full(s.not_after_ns)),
            esc(&left)
        ),
    );
    let status = |r: &Result<(), String>, good: &str| match r {
        Ok(()) => format!("<span class=\"pill ok\">{}</span>", esc(good)),
        Err(e) => format!("<span class=\"pill bad\">{}</span>", esc(e)),
    };
    row(h, "Key", &status(&s.health, "healthy"));
    row(h, "Readiness", &status(&s.readiness, "ready"));
    if let Some((at_ns, algorithm, subject)) = &s.next {
        row(
            h,
            "Planned rollover",
            &format!(
                "<span id=\"rollover\">{} to {} ({})</span>",
                esc(&utc_full(*at_ns)),
                esc(subject),
                esc(algorithm)
            ),
        );
    }
    let (depth, limit, waiting) = s.queue;
    row(
        h,
        "Admission queue",
        &format!("<span id=\"queue\">{depth} of {limit}</span>, {waiting} waiting"),
    );
    h.push_str("</table></section>");
}

/// Rate (per second) of a cumulative counter between the newest point and the one about
/// `span_ns` before it.
fn recent_rate(points: &[Point], span_ns: u64, counter: impl Fn(&Point) -> u64) -> Option<f64> {
    let last = points.last()?;
    let first = points
        .iter()
        .find(|p| last.unix_ns.saturating_sub(p.unix_ns) <= span_ns)?;
    let dt = last
        .unix_ns
        .checked_sub(first.unix_ns)
        .filter(|dt| *dt > 0)? as f64
        / 1e9;
    Some(counter(last).saturating_sub(counter(first)) as f64 / dt)
}

fn requests_card(h: &mut String, page: &Page) {
    let minute = 60 * 1_000_000_000;
    let rate = |f: fn(&Point) -> u64| {
        or_dash(recent_rate(&page.fine, minute, f), |r| format!("{r:.2} /s"))
    };
    h.push_str("<section class=\"card\" id=\"requests\"><h2>Requests</h2><table class=\"kv\">");
    row(
        h,
        "Tokens issued",
        &format!("<span id=\"tokens-total\">{}</span>", page.tokens),
    );
    row(
        h,
        "Rejected",
        &format!("<span id=\"rejections-total\">{}</span>", page.rejections),
    );
    row(h, "Tokens, last minute", &esc(&rate(|p| p.tokens)));
    row(h, "Rejections, last minute", &esc(&rate(|p| p.rejections)));
    h.push_str("</table><h3>Refused by the clock (timeNotAvailable)</h3><table class=\"kv\">");
    for (reason, n) in &page.clock.refusals {
        let _ = write!(
            h,
            "<tr><th>{}</th><td data-refusal=\"{}\">{n}</td></tr>",
            esc(&reason.replace('_', " ")),
            esc(reason)
        );
    }
    h.push_str("</table></section>");
}

fn selection_class(s: Selection) -> &'static str {
    match s {
        Selection::Selected => "ok",
        Selection::Falseticker => "bad",
        Selection::Unselected => "warn",
        Selection::Unusable | Selection::TooFar => "off",
    }
}

/// The reach register as eight dots, oldest poll on the left.
fn reach_dots(reach: u8) -> String {
    (0..8)
        .rev()
        .map(|bit| if reach >> bit & 1 == 1 { '●' } else { '○' })
        .collect()
}

fn sources(h: &mut String, page: &Page) {
    h.push_str("<section class=\"card wide\"><h2>Sources</h2>");
    if page.sources.is_empty() {
        let _ = write!(
            h,
            "<p class=\"muted\">The {} clock has no reference sources of its own.</p></section>",
            esc(page.clock.source)
        );
        return;
    }
    h.push_str(
        "<table id=\"sources\" class=\"grid\"><thead><tr><th>Source</th><th>Reach</th>\
         <th>Selection</th><th class=\"num\">Offset</th><th class=\"num\">Delay</th>\
         <th class=\"num\">Distance</th><th class=\"num\">Age</th></tr></thead><tbody>",
    );
    for v in &page.sources {
        let kind = if v.independent {
            " <span class=\"pill off\">independent</span>"
        } else {
            ""
        };
        let _ = write!(
            h,
            "<tr data-source=\"{name}\" data-selection=\"{sel}\"><td class=\"name\">{name}{kind}</td>\
             <td class=\"mono\" title=\"reach register (octal), newest poll on the right\">{reach:03o} \
             <span class=\"dots\">{dots}</span></td>\
             <td><span class=\"badge sel-{class}\">{sel}</span></td>\
             <td class=\"num\">{offset}</td><td class=\"num\">{delay}</td>\
             <td class=\"num\">{distance}</td><td class=\"num\">{age}</td></tr>",
            name = esc(&v.name),
            sel = esc(v.selection.name()),
            class = selection_class(v.selection),
            reach = v.reach,
            dots = reach_dots(v.reach),
            offset = esc(&or_dash(v.offset_ns, signed_ns)),
            delay = esc(&or_dash(v.delay_ns, fmt_ns)),
            distance = esc(&or_dash(v.distance_ns, fmt_ns)),
            age = esc(&or_dash(v.last_sample_age_ns, |a| format!(
                "{} s",
                a / 1_000_000_000
            ))),
        );
    }
    h.push_str("</tbody></table></section>");
}

/// Rates of the cumulative counters between points about `every` apart.
fn rates(points: &[Point], every: usize, counter: fn(&Point) -> u64) -> Vec<(u64, Option<f64>)> {
    let every = every.max(1);
    let mut out = Vec::new();
    let mut i = every;
    while i < points.len() {
        let (a, b) = (&points[i - every], &points[i]);
        let dt = b.unix_ns.saturating_sub(a.unix_ns) as f64 / 1e9;
        let value = (dt > 0.0).then(|| counter(b).saturating_sub(counter(a)) as f64 / dt);
        out.push((b.unix_ns, value));
        i += every;
    }
    out
}

fn plots(h: &mut String, page: &Page) {
    let fine_ns = FINE_INTERVAL.as_nanos() as u64;
    let (points, interval_ns) = if page.coarse.len() >= COARSE_MIN_POINTS {
        (&page.coarse, fine_ns * COARSE_EVERY)
    } else {
        (&page.fine, fine_ns)
    };
    let t1 = page.now_ns;
    // No wider than the coarse ring spans: points the clock dated years away (a host that
    // started in 1970 and was set later) would otherwise stretch the time axis over them.
    let max_window_ns = fine_ns * COARSE_EVERY * COARSE_LEN as u64;
    let t0 = points
        .first()
        .map_or(t1, |p| p.unix_ns)
        .min(t1.saturating_sub(MIN_WINDOW_NS))
        .max(t1.saturating_sub(max_window_ns));
    let span = |points: &[Point]| match (points.first(), points.last()) {
        (Some(a), Some(b)) => fmt_span(b.unix_ns.saturating_sub(a.unix_ns)),
        _ => "nothing yet".into(),
    };
    let note = format!(
        "{} points, one every {} s, over {}; the strip under the plot is the clock's state",
        points.len(),
        interval_ns / 1_000_000_000,
        span(points)
    );
    h.push_str("<div class=\"charts\">");
    chart(
        h,
        &Chart {
            id: "plot-offset",
            title: "System offset (UTC − local clock)",
            note: note.clone(),
            quantity: Quantity::Time,
            lines: vec![Line {
                label: "offset",
                class: "c-offset",
                points: points
                    .iter()
                    .map(|p| (p.unix_ns, p.offset_ns.map(|o| o as f64)))
                    .collect(),
            }],
            limit: None,
            states: points,
            t0,
            t1,
            zero_based: false,
            width: W,
            max_gap_ns: 3 * interval_ns,
        },
    );
    chart(
        h,
        &Chart {
            id: "plot-bound",
            title: "Error bound",
            note,
            quantity: Quantity::Time,
            lines: vec![Line {
                label: "bound",
                class: "c-bound",
                points: points
                    .iter()
                    .map(|p| (p.unix_ns, p.bound_ns.map(|b| b as f64)))
                    .collect(),
            }],
            limit: Some((page.clock.declared_ns as f64, "declared accuracy")),
            states: points,
            t0,
            t1,
            zero_based: true,
            width: W,
            max_gap_ns: 3 * interval_ns,
        },
    );
    // Request rates over the last minutes, from the fine ring: about 120 rates at most.
    let fine = &page.fine;
    let every = fine.len().div_ceil(120).max(1);
    let rt0 = fine
        .first()
        .map_or(t1, |p| p.unix_ns)
        .min(t1.saturating_sub(MIN_WINDOW_NS));
    chart(
        h,
        &Chart {
            id: "plot-rates",
            title: "Requests",
            note: format!("per second, averaged over {every} s, over {}", span(fine)),
            quantity: Quantity::Rate,
            lines: vec![
                Line {
                    label: "tokens/s",
                    class: "c-tokens",
                    points: rates(fine, every, |p| p.tokens),
                },
                Line {
                    label: "rejections/s",
                    class: "c-rejections",
                    points: rates(fine, every, |p| p.rejections),
                },
            ],
            limit: None,
            states: fine,
            t0: rt0,
            t1,
            zero_based: true,
            width: W_WIDE,
            max_gap_ns: 3 * every as u64 * fine_ns,
        },
    );
    h.push_str("</div>");
}

fn events(h: &mut String, page: &Page) {
    let _ = write!(
        h,
        "<section class=\"card wide\"><h2>Recent clock events <span class=\"muted\">({} shown of {} kept, newest first)</span></h2>",
        page.events.len().min(EVENTS_SHOWN),
        page.events.len()
    );
    if page.events.is_empty() {
        h.push_str("<p class=\"muted\" id=\"events-none\">No events yet.</p></section>");
        return;
    }
    h.push_str(
        "<table id=\"events\" class=\"grid\"><thead><tr><th>Time (UTC)</th><th>Level</th>\
         <th>Event</th><th>What happened</th></tr></thead><tbody>",
    );
    for e in page.events.iter().rev().take(EVENTS_SHOWN) {
        let _ = write!(
            h,
            "<tr data-event=\"{kind}\"><td class=\"mono\">{time}</td>\
             <td><span class=\"badge lvl-{level}\">{level}</span></td>\
             <td class=\"mono\">{kind}</td><td>{text}</td></tr>",
            time = esc(&utc(e.utc_ns, "%Y-%m-%d %H:%M:%S%.3f")),
            level = esc(e.level.name()),
            kind = esc(e.kind),
            text = esc(&e.text),
        );
    }
    h.push_str("</tbody></table></section>");
}

const STYLE: &str = r#"
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","DejaVu Sans",sans-serif;color:#1f2933;background:#eef1f5}
a{color:#2457c5}
header.top{display:flex;align-items:center;gap:24px;padding:18px 28px;background:#17212f;color:#e8edf3}
header .title{flex:1}
h1{margin:0;font-size:22px;font-weight:600;letter-spacing:.2px}
.sub{color:#a9b4c2;font-size:13px;margin-top:2px}
.state{text-align:right}
.state .reason{color:#d5dce5;margin-top:6px;max-width:520px}
.state .bound{color:#a9b4c2;font-size:13px}
.state .bound b{color:#fff}
.issuing{padding:10px 16px;border-radius:8px;font-weight:600;max-width:300px}
.issuing.ok{background:#1c6b3a;color:#eafff0}
.issuing.bad{background:#9b1c1c;color:#fff0f0}
main{max-width:1240px;margin:0 auto;padding:18px 20px 8px}
.cards{display:grid;grid-template-columns:repeat(3,1fr);gap:16px;margin-bottom:16px}
.card{background:#fff;border:1px solid #dbe1e8;border-radius:10px;padding:14px 16px;box-shadow:0 1px 2px rgba(16,24,40,.05)}
.card.wide{margin-bottom:16px}
h2{font-size:15px;margin:0 0 10px;font-weight:600;color:#17212f}
h3{font-size:13px;margin:12px 0 4px;font-weight:600;color:#5b6877}
table{border-collapse:collapse;width:100%}
table.kv th{text-align:left;font-weight:500;color:#5b6877;padding:3px 10px 3px 0;white-space:nowrap;vertical-align:top;width:1%}
table.kv td{padding:3px 0;word-break:break-word}
table.grid th{text-align:left;font-weight:600;color:#5b6877;font-size:12px;text-transform:uppercase;letter-spacing:.4px;border-bottom:1px solid #dbe1e8;padding:6px 10px}
table.grid td{padding:6px 10px;border-bottom:1px solid #eef1f5;vertical-align:top}
table.grid tbody tr:hover{background:#f7f9fb}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.mono{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px;white-space:nowrap}
.name{font-weight:500}
.dots{color:#2f7d4f;letter-spacing:1px;font-size:11px}
.muted{color:#7a8796;font-weight:400;font-size:13px}
.badge{display:inline-block;padding:1px 8px;border-radius:999px;font-size:12px;font-weight:600;text-transform:uppercase;letter-spacing:.4px}
.badge.big{font-size:18px;padding:6px 16px}
.st-synchronized{background:#1f8a4c;color:#fff}
.st-holdover{background:#c07a12;color:#fff}
.st-unsynchronized{background:#c62828;color:#fff}
.sel-ok{background:#dff3e6;color:#15603a}
.sel-bad{background:#fde2e1;color:#a11d1d}
.sel-warn{background:#fdf0d5;color:#8a5a00}
.sel-off{background:#e9edf1;color:#5b6877}
.lvl-info{background:#e4ecfb;color:#244d9c}
.lvl-warning{background:#fdf0d5;color:#8a5a00}
.lvl-error{background:#fde2e1;color:#a11d1d}
.pill{display:inline-block;padding:0 8px;border-radius:999px;font-size:12.5px}
.pill.ok{background:#dff3e6;color:#15603a}
.pill.warn{background:#fdf0d5;color:#8a5a00}
.pill.bad{background:#fde2e1;color:#a11d1d}
.pill.off{background:#e9edf1;color:#5b6877}
.charts{display:grid;grid-template-columns:1fr 1fr;gap:16px;margin-bottom:16px}
.charts figure{margin:0}
.charts figure:last-child{grid-column:1 / -1}
figcaption{display:flex;align-items:baseline;justify-content:space-between;gap:12px}
.legend{font-size:12.5px;color:#5b6877}
.key{margin-left:12px;white-space:nowrap}
.sw{display:inline-block;width:14px;height:3px;border-radius:2px;margin-right:5px;vertical-align:middle}
svg.plot{width:100%;height:auto;display:block}
.frame{fill:none;stroke:#c5cdd6}
.grid{stroke:#edf0f3}
.zero{stroke:#9aa5b1;stroke-dasharray:3 3}
.tick{font-size:11px;fill:#6b7785}
.axis{font-size:11px;fill:#6b7785;font-weight:600}
.empty{font-size:14px;fill:#9aa5b1}
.plot .line{fill:none;stroke-width:1.8;stroke-linejoin:round;stroke-linecap:round}
.limit{stroke:#c62828;stroke-width:1.2;stroke-dasharray:6 4}
.band.st-synchronized{fill:#1f8a4c}.band.st-holdover{fill:#c07a12}.band.st-unsynchronized{fill:#c62828}
.c-offset{stroke:#2563eb}.dot.c-offset{fill:#2563eb}.sw.c-offset{background:#2563eb}
.c-bound{stroke:#7c3aed}.dot.c-bound{fill:#7c3aed}.sw.c-bound{background:#7c3aed}
.c-tokens{stroke:#1f8a4c}.dot.c-tokens{fill:#1f8a4c}.sw.c-tokens{background:#1f8a4c}
.c-rejections{stroke:#d64545}.dot.c-rejections{fill:#d64545}.sw.c-rejections{background:#d64545}
.sw.limit{background:#c62828}
.note{margin:6px 0 0;font-size:12px;color:#7a8796}
footer{max-width:1240px;margin:0 auto;padding:4px 20px 24px;color:#7a8796;font-size:12px}
@media (max-width:900px){.cards,.charts{grid-template-columns:1fr}header.top{flex-wrap:wrap}}
"#;

#[cfg(test)]
mod tests {
    use super::chart::{nice_step, state_runs, time_step_s, unit, BOTTOM, H, LEFT, RIGHT, TOP};
    use super::*;
    use crate::clock::discipline::Leap;
    use crate::clock::EventLevel;

    const S: u64 = 1_000_000_000;
    const NOW: u64 = 1_750_000_000 * S;

    fn page() -> Page {
        let fine: Vec<Point> = (0..30u64)
            .map(|i| Point {
                unix_ns: NOW - (30 - i) * S,
                state: if i < 3 {
                    SyncState::Unsynchronized
                } else {
                    SyncState::Synchronized
                },
                offset_ns: (i >= 2).then_some(20_000 + i as i64 * 100),
                bound_ns: (i >= 3).then_some(2_000_000 + i * 1_000),
                tokens: i * 5,
                rejections: i / 3,
            })
            .collect();
        Page {
            now_ns: NOW,
            version: "0.1.0",
            clock: ClockStatus {
                source: "disciplined",
                state: SyncState::Synchronized,
                reason: "3 of 4 sources agree <majority>".into(),
                bound_ns: Some(2_500_000),
                declared_ns: 1_000_000_000,
                system: Some(SystemView {
                    state: SyncState::Synchronized,
                    reason: "ok".into(),
                    offset_ns: Some(-12_345),
                    frequency_ppm: Some(1.25),
                    bound_ns: Some(2_500_000),
                    since_update_ns: Some(300_000_000),
                    pending_step_ns: None,
                    leap: Some((Leap::Insert, NOW + 86_400 * S)),
                }),
                refusals: vec![("unsynchronized", 2), ("bound_exceeded", 0)],
            },
            sources: vec![
                SourceView {
                    name: "ntp 127.0.0.1:123".into(),
                    independent: false,
                    reach: 0o377,
                    selection: Selection::Selected,
                    offset_ns: Some(10_000),
                    delay_ns: Some(120_000),
                    distance_ns: Some(300_000),
                    last_sample_age_ns: Some(2 * S),
                },
                SourceView {
                    name: "ntp <evil>&\"x\"".into(),
                    independent: false,
                    reach: 0o17,
                    selection: Selection::Falseticker,
                    offset_ns: Some(500_000_000),
                    delay_ns: None,
                    distance_ns: None,
                    last_sample_age_ns: None,
                },
            ],
            signer: SignerStatus {
                algorithm: "ecdsa-p256-sha256",
                subject: "CN=TSU <1>,O=Example & Co".into(),
                not_after_ns: NOW + 400 * 86_400 * S + 5,
                health: Ok(()),
                readiness: Err("signer <down>".into()),
                next: Some((
                    NOW + 30 * 86_400 * S,
                    "ecdsa-p384-sha384",
                    "CN=Next <2>".into(),
                )),
                queue: (3, 256, 0),
            },
            tokens: 145,
            rejections: 9,
            fine,
            coarse: vec![],
            events: vec![
                ClockEvent {
                    utc_ns: NOW - 28 * S,
                    kind: "sync_acquired",
                    level: EventLevel::Info,
                    text: "clock synchronized".into(),
                },
                ClockEvent {
                    utc_ns: NOW - 20 * S,
                    kind: "source_rejected",
                    level: EventLevel::Warning,
                    text: "ntp <script>alert(1)</script> rejected: falseticker".into(),
                },
            ],
        }
    }

    #[test]
    fn escapes_everything_it_writes() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        let html = render(&page());
        assert!(!html.contains("<script"), "no script, not even from data");
        assert!(html.contains("ntp &lt;script&gt;alert(1)&lt;/script&gt; rejected"));
        assert!(html.contains("ntp &lt;evil&gt;&amp;&quot;x&quot;"));
        assert!(html.contains("CN=TSU &lt;1&gt;,O=Example &amp; Co"));
        assert!(html.contains("3 of 4 sources agree &lt;majority&gt;"));
        assert!(html.contains("not issuing: signer &lt;down&gt;"));
        // No external asset: nothing loaded from elsewhere.
        assert!(!html.contains("src="));
        assert!(!html.contains("<link"));
        assert!(!html.contains("href=\"http"));
        assert!(!html.contains("url("));
    }

    #[test]
    fn shows_clock_sources_signer_requests_and_events() {
        let html = render(&page());
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(
            html.contains("id=\"clock-state\" class=\"badge big st-synchronized\">synchronized<")
        );
        assert!(html.contains("<b id=\"clock-bound\">2.50 ms</b>"));
        assert!(html.contains("-12.3 µs"), "system offset");
        assert_eq!(fmt_ns(999), "999 ns");
        assert_eq!(fmt_ns(1_000), "1.00 µs");
        assert_eq!(fmt_ns(123_456), "123 µs");
        assert_eq!(fmt_ns(1_000_000_000), "1.00 s");
        assert_eq!(fmt_span(42 * S), "42 s");
        assert_eq!(fmt_span(599 * S), "9 min 59 s");
        assert_eq!(fmt_span(21_000 * S), "5 h 50 min");
        assert!(html.contains("<td data-refusal=\"unsynchronized\">2</td>"));
        assert!(html.contains("+1.250 ppm"));
        assert!(html.contains("Insert at 2025-06-16 15:06:40 UTC"), "leap");
        assert!(html.contains("data-selection=\"selected\""));
        assert!(html.contains("data-selection=\"falseticker\""));
        assert!(html.contains("377 <span class=\"dots\">●●●●●●●●</span>"));
        assert!(html.contains("017 <span class=\"dots\">○○○○●●●●</span>"));
        assert!(html.contains("ecdsa-p256-sha256"));
        assert!(html.contains("400 days left"));
        assert!(html.contains("to CN=Next &lt;2&gt; (ecdsa-p384-sha384)</span>"));
        assert!(html.contains("<span id=\"queue\">3 of 256</span>"));
        assert!(html.contains("<span id=\"tokens-total\">145</span>"));
        assert!(html.contains("5.00 /s"), "tokens in the last minute");
        // Events newest first, with their UTC time.
        let rejected = html.find("data-event=\"source_rejected\"").unwrap();
        let acquired = html.find("data-event=\"sync_acquired\"").unwrap();
        assert!(rejected < acquired);
        assert!(html.contains("2025-06-15 15:06:12.000"));
        assert!(html.contains("(2 shown of 2 kept, newest first)"));
        // A declared accuracy far above the bounds is named, not drawn.
        assert!(html.contains("declared accuracy 1.00 s (above the plot)"));
        assert!(!html.contains("class=\"limit\""));
    }

    #[test]
    fn plots_are_polylines_with_axes_in_utc() {
        let html = render(&page());
        for (id, w) in [
            ("plot-offset", W),
            ("plot-bound", W),
            ("plot-rates", W_WIDE),
        ] {
            let start = html.find(&format!("<svg id=\"{id}\"")).unwrap();
            let svg = &html[start..start + html[start..].find("</svg>").unwrap()];
            let polyline = svg
                .find("<polyline")
                .unwrap_or_else(|| panic!("{id}: {svg}"));
            let points = &svg[polyline..];
            let points = &points[points.find("points=\"").unwrap() + 8..];
            let points = &points[..points.find('"').unwrap()];
            assert!(points.split(' ').count() >= 5, "{id}: {points}");
            for xy in points.split(' ') {
                let (x, y) = xy.split_once(',').unwrap();
                let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
                assert!((LEFT..=w - RIGHT).contains(&x), "{id}: x {x}");
                assert!((TOP..=H - BOTTOM).contains(&y), "{id}: y {y}");
            }
            assert!(svg.contains(">UTC</text>"), "{id}");
            assert!(svg.contains("class=\"tick\""), "{id}");
        }
        // Offsets in µs, time ticks as HH:MM:SS.
        assert!(html.contains(" µs</text>"));
        assert!(html.contains(">15:06:20</text>"));
        // The state strip shows the unsynchronized start, one strip per run.
        let p = page();
        assert_eq!(
            state_runs(&p.fine, 0, NOW),
            vec![
                (NOW - 30 * S, NOW - 27 * S, SyncState::Unsynchronized),
                (NOW - 27 * S, NOW, SyncState::Synchronized)
            ]
        );
        assert_eq!(html.matches("class=\"band st-unsynchronized\"").count(), 3);
        assert_eq!(html.matches("class=\"band st-synchronized\"").count(), 3);
    }

    #[test]
    fn empty_history_and_no_sources() {
        let mut p = page();
        p.fine.clear();
        p.events.clear();
        p.sources.clear();
        p.clock.system = None;
        p.clock.source = "kernel";
        let html = render(&p);
        assert_eq!(html.matches("no data yet").count(), 3);
        assert!(html.contains("No events yet."));
        assert!(html.contains("The kernel clock has no reference sources"));
        assert!(!html.contains("<polyline"));
    }

    #[test]
    fn round_steps_and_units() {
        assert_eq!(nice_step(10.0, 4.0), 5.0);
        assert_eq!(nice_step(0.3, 4.0), 0.1);
        assert_eq!(nice_step(7.0, 4.0), 2.0);
        assert_eq!(unit(Quantity::Time, 999.0).1, "ns");
        assert_eq!(unit(Quantity::Time, 12_345.0).1, "µs");
        assert_eq!(unit(Quantity::Time, 2.5e6).1, "ms");
        assert_eq!(unit(Quantity::Time, 2e9).1, "s");
        assert_eq!(time_step_s(30.0), 5);
        assert_eq!(time_step_s(600.0), 120);
        assert_eq!(time_step_s(6.0 * 3600.0), 3600);
        let pts: Vec<Point> = (0..5u64)
            .map(|i| Point {
                unix_ns: i * S,
                state: SyncState::Synchronized,
                offset_ns: None,
                bound_ns: None,
                tokens: i * 10,
                rejections: 0,
            })
            .collect();
        assert_eq!(
            rates(&pts, 2, |p| p.tokens),
            vec![(2 * S, Some(10.0)), (4 * S, Some(10.0))]
        );
        assert_eq!(recent_rate(&pts, 60 * S, |p| p.tokens), Some(10.0));
    }
}
