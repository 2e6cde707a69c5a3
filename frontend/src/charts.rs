//! Charts: line charts (a line per series, the band of a mean over several runs, a dot for a
//! series of one point) and a layer × step heatmap.
//!
//! The plot is SVG stretched to its box, its strokes kept at their width; the axes' text is
//! HTML beside it, so labels read at one size on a narrow card and on a page-wide chart. Ticks
//! fall on round numbers, whole ones on the step axis. A legend entry hides or shows its series
//! on every chart of the page; hovering over the plot shows each series' value at that step.
//! Long series are reduced to the minimum and maximum of each of a few hundred columns, so
//! hundreds of thousands of points draw as fast as a few hundred and no spike disappears.

use std::collections::BTreeSet;

use leptos::prelude::*;

use crate::series::{Heatmap, Series};

/// The plot's own coordinates, both ways (the box stretches them).
const VIEW: f64 = 1000.0;
/// Columns a long series is reduced to.
const COLUMNS: usize = 400;
/// Hover columns at most: each says the values at one step.
const HOVER_COLUMNS: usize = 150;

/// The series hidden on a page's charts, by name: a legend click hides or shows a series on
/// every chart at once.
pub type Hidden = RwSignal<BTreeSet<String>>;

/// At most two points (min and max, in x order) per column.
pub fn reduce(points: &[(f64, f64)], columns: usize) -> Vec<(f64, f64)> {
    if points.len() <= columns * 2 {
        return points.to_vec();
    }
    let (x0, x1) = (points[0].0, points[points.len() - 1].0);
    let span = (x1 - x0).max(f64::MIN_POSITIVE);
    let mut out = Vec::with_capacity(columns * 2);
    let mut bucket: Option<(usize, (f64, f64), (f64, f64))> = None;
    for &p in points {
        let b = (((p.0 - x0) / span) * (columns - 1) as f64) as usize;
        match &mut bucket {
            Some((current, lo, hi)) if *current == b => {
                if p.1 < lo.1 {
                    *lo = p;
                }
                if p.1 > hi.1 {
                    *hi = p;
                }
            }
            _ => {
                if let Some((_, lo, hi)) = bucket.take() {
                    push_pair(&mut out, lo, hi);
                }
                bucket = Some((b, p, p));
            }
        }
    }
    if let Some((_, lo, hi)) = bucket {
        push_pair(&mut out, lo, hi);
    }
    out
}

fn push_pair(out: &mut Vec<(f64, f64)>, a: (f64, f64), b: (f64, f64)) {
    if a == b {
        out.push(a);
    } else if a.0 <= b.0 {
        out.extend([a, b]);
    } else {
        out.extend([b, a]);
    }
}

/// Ticks on round numbers (1, 2 or 5 times a power of ten apart), about `count` of them
/// within [lo, hi]; `whole`: never closer than 1 (steps). Each with its label, written with as
/// many decimals as the spacing needs (60, not 60.0; 0.05, not 0.050).
pub fn ticks(lo: f64, hi: f64, count: usize, whole: bool) -> Vec<(f64, String)> {
    let raw = (hi - lo).abs() / count.max(1) as f64;
    if !raw.is_finite() || raw <= 0.0 {
        return vec![(lo, label(lo, 0, whole))];
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let mut spacing = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    if whole {
        spacing = spacing.max(1.0).round();
    }
    let decimals = (-spacing.log10().floor()).max(0.0) as usize;
    // (A bound that is a tick may divide to just past a whole number.)
    let first = (lo / spacing - 1e-9).ceil() as i64;
    let last = (hi / spacing + 1e-9).floor() as i64;
    (first..=last)
        .map(|i| {
            let value = i as f64 * spacing;
            (value, label(value, decimals, whole))
        })
        .collect()
}

fn label(value: f64, decimals: usize, whole: bool) -> String {
    let scientific = !whole && (decimals > 4 || value.abs() >= 1e5);
    match (value == 0.0, scientific) {
        (true, true) => "0".into(),
        // −0 reads as 0.
        (true, false) => format!("{:.decimals$}", 0.0),
        (false, true) => format!("{value:.1e}"),
        (false, false) => format!("{value:.decimals$}"),
    }
}

/// The range a chart shows: the series' finite values, a flat one widened around its value.
fn bounds(series: &[Series]) -> Option<[f64; 4]> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    let values = series.iter().flat_map(|s| {
        let band = s.band.iter().flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)]);
        s.points.iter().copied().chain(band)
    });
    for (x, y) in values.filter(|(_, y)| y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return None;
    }
    if y1 - y0 < 1e-12 {
        let pad = (y0.abs() * 0.1).max(1e-9);
        (y0, y1) = (y0 - pad, y1 + pad);
    }
    if x1 - x0 < 1e-12 {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    // A little room above and below, so a line at the edge is not cut by the frame.
    let pad = 0.04 * (y1 - y0);
    Some([x0, x1, y0 - pad, y1 + pad])
}

/// Where a value lies on the plot (0–1000 both ways, y downwards).
#[derive(Clone, Copy)]
struct Scale([f64; 4]);

impl Scale {
    fn x(self, x: f64) -> f64 {
        let [x0, x1, ..] = self.0;
        (x - x0) / (x1 - x0) * VIEW
    }
    fn y(self, y: f64) -> f64 {
        let [.., y0, y1] = self.0;
        (1.0 - (y - y0) / (y1 - y0)) * VIEW
    }
    fn point(self, (x, y): (f64, f64)) -> String {
        format!("{:.1},{:.1} ", self.x(x), self.y(y))
    }
}

/// A line chart of `series` against `x_label`'s quantity; series named in `hidden` are left out.
pub fn line_chart(
    title: String,
    x_label: &'static str,
    unit: &'static str,
    series: Vec<Series>,
    hidden: Hidden,
) -> impl IntoView {
    let series: Vec<Series> = series
        .into_iter()
        .filter(|s| !s.points.is_empty())
        .collect();
    let bounds = bounds(&series);
    let names: Vec<(String, &'static str)> =
        series.iter().map(|s| (s.name.clone(), s.color)).collect();
    let plot = move || {
        let Some(bounds) = bounds else {
            return view! { <div class="no-data">"no data yet"</div> }.into_any();
        };
        let scale = Scale(bounds);
        let shown: Vec<&Series> =
            hidden.with(|h| series.iter().filter(|s| !h.contains(&s.name)).collect());
        let [x0, x1, y0, y1] = bounds;
        let x_ticks = ticks(x0, x1, 5, x_label == "step");
        let y_ticks = ticks(y0, y1, 4, false);
        view! {
            <div class="y-axis">
                {y_ticks.iter().map(|(y, text)| view! {
                    <span style=format!("top:{:.2}%", scale.y(*y) / 10.0)>{text.clone()}</span>
                }).collect_view()}
            </div>
            <svg class="area" viewBox=format!("0 0 {VIEW} {VIEW}") preserveAspectRatio="none">
                {y_ticks.iter().map(|(y, _)| view! {
                    <line class="grid" x1="0" x2=VIEW y1=scale.y(*y) y2=scale.y(*y) vector-effect="non-scaling-stroke"/>
                }).collect_view()}
                {shown.iter().map(|s| band(s, scale)).collect_view()}
                {shown.iter().map(|s| line(s, scale)).collect_view()}
                {hover_columns(&shown, scale)}
            </svg>
            <div></div>
            <div class="x-axis">
                {x_ticks.into_iter().map(|(x, text)| view! {
                    <span style=format!("left:{:.2}%", scale.x(x) / 10.0)>{text}</span>
                }).collect_view()}
            </div>
        }
        .into_any()
    };
    let legend = names
        .into_iter()
        .map(|(name, color)| {
            let off = {
                let name = name.clone();
                move || hidden.with(|h| h.contains(&name))
            };
            let toggle = {
                let name = name.clone();
                move |_| {
                    hidden.update(|h| {
                        if !h.remove(&name) {
                            h.insert(name.clone());
                        }
                    })
                }
            };
            let key = name.clone();
            view! {
                <button class="legend-entry" class:off=off data-series=key style=format!("color:{color}")
                    title="hide or show this series on every chart" on:click=toggle>
                    "■ " <span>{name}</span>
                </button>
            }
        })
        .collect_view();
    let key = title.clone();
    view! {
        <div class="card chart" data-title=key>
            <div><b>{title}</b> <span class="help">{format!(" ({unit})")}</span></div>
            <div class="plot">{plot}</div>
            <div class="x-label">{x_label}</div>
            <div class="legend">{legend}</div>
        </div>
    }
}

/// The least-to-greatest band of a mean over several runs, shaded.
fn band(series: &Series, scale: Scale) -> Option<impl IntoView> {
    if series.band.len() < 2 {
        return None;
    }
    let upper = series.band.iter().map(|&(x, _, hi)| scale.point((x, hi)));
    let lower = series
        .band
        .iter()
        .rev()
        .map(|&(x, lo, _)| scale.point((x, lo)));
    let points: String = upper.chain(lower).collect();
    Some(
        view! { <polygon class="band" points=points fill=series.color fill-opacity="0.15" stroke="none"/> },
    )
}

/// The series' line (reduced), and a dot for each point of a series too short to draw a line.
fn line(series: &Series, scale: Scale) -> impl IntoView {
    let finite: Vec<(f64, f64)> = series
        .points
        .iter()
        .copied()
        .filter(|p| p.1.is_finite())
        .collect();
    let points: String = reduce(&finite, COLUMNS)
        .into_iter()
        .map(|p| scale.point(p))
        .collect();
    let dots = (finite.len() == 1).then(|| {
        let (x, y) = (scale.x(finite[0].0), scale.y(finite[0].1));
        view! {
            <line class="dot" x1=x y1=y x2=x y2=y stroke=series.color stroke-width="7"
                stroke-linecap="round" vector-effect="non-scaling-stroke"/>
        }
    });
    view! {
        <polyline points=points fill="none" stroke=series.color stroke-width="1.5"
            vector-effect="non-scaling-stroke" stroke-linejoin="round"/>
        {dots}
    }
}

/// Invisible columns across the plot, each titled with every shown series' value at its step
/// (the browser shows a title on hover).
fn hover_columns(shown: &[&Series], scale: Scale) -> impl IntoView {
    let mut steps: Vec<f64> = shown
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    steps.sort_by(f64::total_cmp);
    steps.dedup();
    let every = steps.len().div_ceil(HOVER_COLUMNS).max(1);
    let steps: Vec<f64> = steps.into_iter().step_by(every).collect();
    let edges: Vec<f64> = steps.iter().map(|x| scale.x(*x)).collect();
    steps
        .iter()
        .enumerate()
        .map(|(i, &step)| {
            let left = if i == 0 { 0.0 } else { (edges[i - 1] + edges[i]) / 2.0 };
            let right = edges
                .get(i + 1)
                .map_or(VIEW, |next| (edges[i] + next) / 2.0);
            let values: String = shown
                .iter()
                .filter_map(|s| {
                    let (_, y) = s.points.iter().find(|p| p.0 == step)?;
                    Some(format!("\n{}: {}", s.name, significant(*y)))
                })
                .collect();
            let text = format!("{}{values}", label(step, 0, true));
            view! {
                <rect class="hover" x=left y="0" width=(right - left).max(0.5) height=VIEW fill="transparent">
                    <title>{text}</title>
                </rect>
            }
        })
        .collect_view()
}

/// A value with four significant digits.
fn significant(value: f64) -> String {
    let a = value.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        return format!("{value:.3e}");
    }
    let decimals = if a == 0.0 {
        0
    } else {
        (3 - a.log10().floor() as i32).max(0) as usize
    };
    format!("{value:.decimals$}")
}

/// Rows = layers, columns = steps (averaged into at most `max_columns`); values in [-1, 1]
/// drawn blue (−1) to white (0) to red (+1).
pub fn heatmap(title: String, map: Heatmap, max_columns: usize) -> impl IntoView {
    let Heatmap { steps, rows } = map;
    let n = steps.len();
    let columns = n.clamp(1, max_columns);
    let per = (n as f64 / columns as f64).max(1.0);
    let cell_w = VIEW / columns as f64;
    let layers = rows.len().max(1);
    let cell_h = VIEW / layers as f64;
    let color = |v: f64| {
        let v = v.clamp(-1.0, 1.0);
        let (r, g, b) = if v >= 0.0 {
            (255.0, 255.0 * (1.0 - v), 255.0 * (1.0 - v))
        } else {
            (255.0 * (1.0 + v), 255.0 * (1.0 + v), 255.0)
        };
        format!("rgb({r:.0},{g:.0},{b:.0})")
    };
    let mut cells = Vec::new();
    for (layer, row) in rows.iter().enumerate() {
        for c in 0..columns {
            let (a, b) = (
                (c as f64 * per) as usize,
                (((c + 1) as f64 * per) as usize).min(row.len()),
            );
            if a >= b {
                continue;
            }
            let mean = row[a..b].iter().sum::<f64>() / (b - a) as f64;
            let first = steps.get(a).copied().unwrap_or(0.0);
            let last = steps.get(b - 1).copied().unwrap_or(0.0);
            cells.push(view! {
                <rect x=c as f64 * cell_w y=layer as f64 * cell_h width=cell_w + 0.5 height=cell_h + 0.5 fill=color(mean)>
                    <title>{format!("layer {layer}, steps {first}–{last}: cos {mean:.3}")}</title>
                </rect>
            });
        }
    }
    let row_labels = (0..rows.len())
        .map(|l| {
            let top = (l as f64 + 0.5) * cell_h / 10.0;
            view! { <span style=format!("top:{top:.2}%")>{format!("L{l}")}</span> }
        })
        .collect_view();
    let ends = [(steps.first(), 0.0), (steps.last(), 100.0)]
        .into_iter()
        .filter_map(|(step, at)| Some((label(*step?, 0, true), at)))
        .map(|(text, at)| view! { <span style=format!("left:{at}%")>{text}</span> })
        .collect_view();
    let key = title.clone();
    view! {
        <div class="card chart" data-title=key>
            <div><b>{title}</b> <span class="help">" (rows: probed layers; blue −1 … white 0 … red +1)"</span></div>
            <div class="plot">
                <div class="y-axis">{row_labels}</div>
                <svg class="area" viewBox=format!("0 0 {VIEW} {VIEW}") preserveAspectRatio="none">{cells}</svg>
                <div></div>
                <div class="x-axis">{ends}</div>
            </div>
            <div class="x-label">"step"</div>
        </div>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(ticks: Vec<(f64, String)>) -> Vec<String> {
        ticks.into_iter().map(|(_, t)| t).collect()
    }

    #[test]
    fn ticks_fall_on_round_numbers_with_the_decimals_their_spacing_needs() {
        assert_eq!(texts(ticks(0.0, 120.0, 5, true)), ["0", "50", "100"]);
        assert_eq!(texts(ticks(1.0, 3.0, 5, true)), ["1", "2", "3"]);
        // A step axis of one step still ticks whole steps only.
        assert_eq!(texts(ticks(0.5, 1.5, 5, true)), ["1"]);
        assert_eq!(texts(ticks(0.92, 1.08, 4, false)), ["0.95", "1.00", "1.05"]);
        assert_eq!(texts(ticks(40.0, 61.0, 4, false)), ["40", "50", "60"]);
        assert_eq!(texts(ticks(0.0, 2e-5, 2, false)), ["0", "1.0e-5", "2.0e-5"]);
        assert_eq!(
            texts(ticks(-0.4, 0.4, 4, false)),
            ["-0.4", "-0.2", "0.0", "0.2", "0.4"]
        );
    }

    #[test]
    fn a_flat_series_and_a_single_point_get_a_range_around_them() {
        let one = Series {
            points: vec![(40.0, 3.0)],
            ..Series::default()
        };
        let [x0, x1, y0, y1] = bounds(&[one]).unwrap();
        assert!(x0 < 40.0 && 40.0 < x1 && y0 < 3.0 && 3.0 < y1);
        assert!(bounds(&[Series::default()]).is_none());
    }

    #[test]
    fn a_band_widens_the_range() {
        let mean = Series {
            points: vec![(1.0, 1.0), (2.0, 1.0)],
            band: vec![(1.0, 0.0, 2.0), (2.0, 0.5, 1.5)],
            ..Series::default()
        };
        let [_, _, y0, y1] = bounds(&[mean]).unwrap();
        assert!(y0 < 0.0 && y1 > 2.0);
    }
}
