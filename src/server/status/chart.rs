//! The status page's charts: server-rendered SVG of lines over time, with round axis steps,
//! a unit chosen from the values, the clock's state as a band along the time axis and an
//! optional limit line. Pure: a [`Chart`] in, SVG appended to the page.

use std::fmt::Write;

use super::{esc, fmt_ns, utc};
use crate::clock::SyncState;
use crate::server::history::Point;

/// A line of a chart: (UTC ns, value) points; `None` breaks the line.
pub(super) struct Line {
    pub(super) label: &'static str,
    pub(super) class: &'static str,
    pub(super) points: Vec<(u64, Option<f64>)>,
}

/// How the values of a chart are shown.
#[derive(Clone, Copy)]
pub(super) enum Quantity {
    /// Nanoseconds, shown in ns, µs, ms or s.
    Time,
    /// Per second.
    Rate,
}

pub(super) struct Chart<'a> {
    pub(super) id: &'static str,
    pub(super) title: &'static str,
    pub(super) note: String,
    pub(super) quantity: Quantity,
    pub(super) lines: Vec<Line>,
    /// A dashed horizontal limit (same unit as the lines), drawn when near the data.
    pub(super) limit: Option<(f64, &'static str)>,
    /// The clock's state along the time axis.
    pub(super) states: &'a [Point],
    /// The time axis, UTC ns.
    pub(super) t0: u64,
    pub(super) t1: u64,
    pub(super) zero_based: bool,
    /// The SVG's width ([`W`] or [`W_WIDE`]).
    pub(super) width: f64,
    /// Points further apart than this are not joined.
    pub(super) max_gap_ns: u64,
}

/// The width of a half-width chart, and of a full-width one.
pub(super) const W: f64 = 560.0;
pub(super) const W_WIDE: f64 = 1160.0;
pub(super) const H: f64 = 232.0;
pub(super) const LEFT: f64 = 66.0;
pub(super) const RIGHT: f64 = 14.0;
pub(super) const TOP: f64 = 12.0;
pub(super) const BOTTOM: f64 = 46.0;

/// The most value-axis ticks drawn: a scale cuts its range in about four.
const MAX_TICKS: usize = 20;

/// A round step (1, 2 or 5 times a power of ten) that cuts `range` in about `parts`.
pub(super) fn nice_step(range: f64, parts: f64) -> f64 {
    let raw = (range / parts).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let n = raw / magnitude;
    let nice = if n <= 1.0 {
        1.0
    } else if n <= 2.0 {
        2.0
    } else if n <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// The display unit for values up to `max_abs`: (divisor, suffix).
pub(super) fn unit(quantity: Quantity, max_abs: f64) -> (f64, &'static str) {
    match quantity {
        Quantity::Rate => (1.0, "/s"),
        Quantity::Time if max_abs < 1e3 => (1.0, "ns"),
        Quantity::Time if max_abs < 1e6 => (1e3, "µs"),
        Quantity::Time if max_abs < 1e9 => (1e6, "ms"),
        Quantity::Time => (1e9, "s"),
    }
}

/// The step of the time axis: a round number of seconds giving at most about six ticks.
pub(super) fn time_step_s(span_s: f64) -> u64 {
    const STEPS: [u64; 15] = [
        1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
    ];
    STEPS
        .into_iter()
        .find(|s| span_s / *s as f64 <= 6.0)
        .unwrap_or(21600)
}

fn state_color(state: SyncState) -> &'static str {
    match state {
        SyncState::Synchronized => "st-synchronized",
        SyncState::Holdover => "st-holdover",
        SyncState::Unsynchronized => "st-unsynchronized",
    }
}

/// The value axis of a chart, in the display unit.
struct Scale {
    div: f64,
    suffix: &'static str,
    lo: f64,
    hi: f64,
    step: f64,
    decimals: usize,
}

impl Scale {
    /// Round bounds around `values` (in the chart's base unit), with the limit when near.
    fn new(c: &Chart, values: &[f64]) -> Option<Self> {
        let mut lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let mut hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() || !hi.is_finite() {
            return None;
        }
        if let Some((limit, _)) = c.limit {
            // Only when the data come within a factor of two: else it would flatten them.
            if limit <= 2.0 * hi {
                hi = hi.max(limit);
            }
        }
        if c.zero_based {
            lo = lo.min(0.0);
            hi = hi.max(0.0);
        }
        let (div, suffix) = unit(c.quantity, lo.abs().max(hi.abs()));
        let (mut lo, mut hi) = (lo / div, hi / div);
        if hi - lo < 1e-9 {
            let pad = if hi.abs() > 0.0 { hi.abs() * 0.1 } else { 1.0 };
            if !(c.zero_based && lo >= 0.0) {
                lo -= pad;
            }
            hi += pad;
        }
        let step = nice_step(hi - lo, 4.0);
        let decimals = if step >= 1.0 {
            0
        } else {
            (-step.log10()).ceil() as usize
        };
        Some(Self {
            div,
            suffix,
            lo: (lo / step).floor() * step,
            hi: (hi / step).ceil() * step,
            step,
            decimals,
        })
    }

    /// Whether a value in the base unit is within the axis.
    fn shows(&self, value: f64) -> bool {
        (self.lo..=self.hi).contains(&(value / self.div))
    }
}

/// Runs of one state within [t0, t1]: (from, to, state); a point's state lasts until the next.
pub(super) fn state_runs(points: &[Point], t0: u64, t1: u64) -> Vec<(u64, u64, SyncState)> {
    let mut runs: Vec<(u64, u64, SyncState)> = Vec::new();
    for (i, p) in points.iter().enumerate() {
        let end = points.get(i + 1).map_or(t1, |n| n.unix_ns.min(t1));
        if p.unix_ns < t0 || end <= p.unix_ns {
            continue;
        }
        match runs.last_mut() {
            Some(run) if run.2 == p.state && run.1 == p.unix_ns => run.1 = end,
            _ => runs.push((p.unix_ns, end, p.state)),
        }
    }
    runs
}

pub(super) fn chart(h: &mut String, c: &Chart) {
    let values: Vec<f64> = c
        .lines
        .iter()
        .flat_map(|l| l.points.iter().filter_map(|p| p.1))
        .filter(|v| v.is_finite())
        .collect();
    let scale = Scale::new(c, &values);
    let w = c.width;
    let (pw, ph) = (w - LEFT - RIGHT, H - TOP - BOTTOM);
    let (x0, y0) = (LEFT, TOP + ph);

    let _ = write!(
        h,
        "<figure class=\"card chart\"><figcaption><h2>{}</h2><span class=\"legend\">",
        esc(c.title)
    );
    for line in &c.lines {
        let _ = write!(
            h,
            "<span class=\"key\"><i class=\"sw {}\"></i>{}</span>",
            line.class,
            esc(line.label)
        );
    }
    if let Some((limit, label)) = c.limit {
        let shown = scale.as_ref().is_some_and(|s| s.shows(limit));
        let (key, text) = if shown {
            ("<i class=\"sw limit\"></i>", label.to_string())
        } else {
            (
                "",
                format!("{label} {} (above the plot)", fmt_ns(limit as u64)),
            )
        };
        let _ = write!(h, "<span class=\"key\">{key}{}</span>", esc(&text));
    }
    let _ = write!(
        h,
        "</span></figcaption><svg id=\"{}\" class=\"plot\" viewBox=\"0 0 {w} {H}\" \
         role=\"img\" aria-label=\"{}\" xmlns=\"http://www.w3.org/2000/svg\">",
        c.id,
        esc(c.title)
    );

    let Some(scale) = scale else {
        let _ = write!(
            h,
            "<rect class=\"frame\" x=\"{x0}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\"/>\
             <text class=\"empty\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data yet</text></svg>\
             <p class=\"note\">{}</p></figure>",
            x0 + pw / 2.0,
            TOP + ph / 2.0,
            esc(&c.note)
        );
        return;
    };
    let t_span = c.t1.saturating_sub(c.t0).max(1) as f64;
    let x = |t: u64| x0 + (t.saturating_sub(c.t0) as f64 / t_span).min(1.0) * pw;
    let Scale {
        div,
        suffix,
        lo,
        hi,
        step,
        decimals,
    } = scale;
    let y = |v: f64| TOP + (hi - v / div) / (hi - lo) * ph;

    // Grid and value axis: counted, since `v += step` stops moving `v` when the values are far
    // larger than their spread (a wildly wrong clock's offsets).
    let ticks = ((hi - lo) / step).round();
    let ticks = if ticks.is_finite() && ticks >= 0.0 {
        (ticks as usize).min(MAX_TICKS)
    } else {
        0
    };
    for i in 0..=ticks {
        let v = lo + step * i as f64;
        let yy = TOP + (hi - v) / (hi - lo) * ph;
        let _ = write!(
            h,
            "<line class=\"grid\" x1=\"{x0}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\"/>\
             <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.*} {}</text>",
            x0 + pw,
            x0 - 6.0,
            yy + 4.0,
            decimals,
            if v.abs() < step / 1e6 { 0.0 } else { v },
            esc(suffix)
        );
    }
    if lo < 0.0 && hi > 0.0 {
        let yy = TOP + hi / (hi - lo) * ph;
        let _ = write!(
            h,
            "<line class=\"zero\" x1=\"{x0}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\"/>",
            x0 + pw
        );
    }

    // Time axis, in UTC.
    let step_s = time_step_s(t_span / 1e9 * 560.0 / w);
    let mut step_ns = step_s * 1_000_000_000;
    // However wide the span, at most MAX_TICKS time labels.
    while c.t1.saturating_sub(c.t0) / step_ns > MAX_TICKS as u64 {
        step_ns *= 2;
    }
    let format = if step_s < 60 { "%H:%M:%S" } else { "%H:%M" };
    let mut t = c.t0.div_ceil(step_ns) * step_ns;
    while t <= c.t1 {
        let xx = x(t);
        let _ = write!(
            h,
            "<line class=\"grid\" x1=\"{xx:.1}\" y1=\"{TOP}\" x2=\"{xx:.1}\" y2=\"{y0}\"/>\
             <text class=\"tick\" x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            y0 + 24.0,
            esc(&utc(t, format))
        );
        t += step_ns;
    }
    let _ = write!(
        h,
        "<text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">UTC</text>",
        x0 + pw,
        H - 4.0
    );

    // The clock's state along the time axis: one strip per run of the same state.
    for (start, end, state) in state_runs(c.states, c.t0, c.t1) {
        let _ = write!(
            h,
            "<rect class=\"band {}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"5\"><title>{}</title></rect>",
            state_color(state),
            x(start),
            y0 + 3.0,
            (x(end) - x(start)).max(0.5),
            esc(state.name())
        );
    }

    if let Some((limit, label)) = c.limit {
        if limit / div <= hi {
            let yy = y(limit);
            let _ = write!(
                h,
                "<line class=\"limit\" x1=\"{x0}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\"><title>{}</title></line>",
                x0 + pw,
                esc(label)
            );
        }
    }

    // The lines: one polyline per unbroken run.
    for line in &c.lines {
        let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
        let mut last_t: Option<u64> = None;
        for (t, v) in &line.points {
            let Some(v) = v.filter(|v| v.is_finite()) else {
                last_t = None;
                continue;
            };
            if *t < c.t0 {
                continue;
            }
            let joined = last_t.is_some_and(|l| t.saturating_sub(l) <= c.max_gap_ns);
            if !joined {
                runs.push(Vec::new());
            }
            runs.last_mut()
                .expect("a run was just pushed")
                .push((x(*t), y(v)));
            last_t = Some(*t);
        }
        for run in &runs {
            if run.len() == 1 {
                let _ = write!(
                    h,
                    "<circle class=\"dot {}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\"/>",
                    line.class, run[0].0, run[0].1
                );
                continue;
            }
            let coords: Vec<String> = run.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = write!(
                h,
                "<polyline class=\"line {}\" points=\"{}\"/>",
                line.class,
                coords.join(" ")
            );
        }
    }
    let _ = write!(
        h,
        "<rect class=\"frame\" x=\"{x0}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\"/></svg>\
         <p class=\"note\">{}</p></figure>",
        esc(&c.note)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_far_larger_than_their_spread_draw_a_bounded_axis() {
        const S: u64 = 1_000_000_000;
        let (t0, t1) = (1_750_000_000 * S, 1_750_000_060 * S);
        // A clock some 25 years off, whose readings differ by 128 ns: the step is below the
        // spacing of f64 values there.
        let big = 7.9e17;
        let chart_of = |values: [f64; 2]| offset_chart([(t0, values[0]), (t1, values[1])]);
        let page = chart_of([big, big + 128.0]);
        let ticks = page.matches("class=\"tick\"").count();
        assert!((1..=2 * MAX_TICKS).contains(&ticks), "{ticks} ticks");
        // Ordinary values keep their axis.
        let page = chart_of([10_000.0, 30_000.0]);
        assert!(page.matches("class=\"tick\"").count() >= 3);
    }

    /// The offset chart over two points, from the first's time to the second's.
    fn offset_chart(points: [(u64, f64); 2]) -> String {
        let mut h = String::new();
        chart(
            &mut h,
            &Chart {
                id: "offset",
                title: "Offset",
                note: String::new(),
                quantity: Quantity::Time,
                lines: vec![Line {
                    label: "offset",
                    class: "l1",
                    points: points.iter().map(|&(t, v)| (t, Some(v))).collect(),
                }],
                limit: None,
                states: &[],
                t0: points[0].0,
                t1: points[1].0,
                zero_based: false,
                width: W,
                max_gap_ns: 60_000_000_000,
            },
        );
        h
    }

    #[test]
    fn a_time_span_of_decades_draws_a_bounded_time_axis() {
        const S: u64 = 1_000_000_000;
        // A point from a host that started in 1970 and was set to 2025 later.
        let h = offset_chart([(S, 1_000.0), (1_750_000_000 * S, 2_000.0)]);
        let ticks = h.matches("class=\"tick\"").count();
        assert!(
            ticks <= 2 * MAX_TICKS + 2,
            "{ticks} ticks, {} octets",
            h.len()
        );
    }
}
