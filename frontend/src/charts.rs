//! SVG charts: line charts with axes, units and a legend, and a layer × step heatmap. Long
//! series are reduced to the minimum and maximum of each pixel column, so hundreds of
//! thousands of points draw as fast as a few hundred and no spike disappears.

use leptos::prelude::*;

use crate::series::{Heatmap, Series};

const W: f64 = 560.0;
const H: f64 = 180.0;
const LEFT: f64 = 56.0;
const BOTTOM: f64 = 28.0;

/// At most two points (min and max, in x order) per pixel column.
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

fn fmt(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else {
        // Three significant digits, so nearby ticks (0.00095, 0.00100, 0.00105) stay distinct.
        let decimals = (2 - a.log10().floor() as i32).max(0) as usize;
        format!("{v:.decimals$}")
    }
}

pub fn line_chart(
    title: String,
    x_label: &'static str,
    unit: &'static str,
    series: Vec<Series>,
) -> impl IntoView {
    let series: Vec<Series> = series
        .into_iter()
        .filter(|s| !s.points.is_empty())
        .map(|s| Series {
            points: reduce(&s.points, W as usize),
            ..s
        })
        .collect();
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        if y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    let empty = x0 > x1;
    if empty {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if y1 - y0 < 1e-12 {
        // A flat series (a constant learning rate): a band around its value.
        let pad = (y0.abs() * 0.1).max(1e-9);
        y1 += pad;
        y0 -= pad;
    }
    let x1 = if x1 - x0 < 1e-12 { x0 + 1.0 } else { x1 };
    let px = move |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - 8.0);
    let py = move |y: f64| 8.0 + (1.0 - (y - y0) / (y1 - y0)) * (H - BOTTOM - 8.0);
    let ticks: Vec<f64> = (0..=4).map(|i| y0 + (y1 - y0) * i as f64 / 4.0).collect();
    let lines = series
        .iter()
        .map(|s| {
            let points: String = s
                .points
                .iter()
                .filter(|p| p.1.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1} ", px(x), py(y)))
                .collect();
            view! { <polyline points=points fill="none" stroke=s.color stroke-width="1.5"/> }
        })
        .collect_view();
    let legend = series
        .iter()
        .map(|s| view! { <span style=format!("color:{};margin-right:12px", s.color)>"■ " {s.name.clone()}</span> })
        .collect_view();
    let key = title.clone();
    view! {
        <div class="card chart" data-title=key>
            <div><b>{title}</b> <span class="help">{format!(" ({unit})")}</span></div>
            <svg viewBox=format!("0 0 {W} {H}") width="100%">
                <line x1=LEFT y1=H - BOTTOM x2=W - 8.0 y2=H - BOTTOM stroke="#98a2b3"/>
                <line x1=LEFT y1="8" x2=LEFT y2=H - BOTTOM stroke="#98a2b3"/>
                {ticks.into_iter().map(|t| view! {
                    <text x=LEFT - 4.0 y=py(t) + 4.0 text-anchor="end">{fmt(t)}</text>
                    <line x1=LEFT y1=py(t) x2=W - 8.0 y2=py(t) stroke="#eaecf0"/>
                }).collect_view()}
                <text x=LEFT y=H - 8.0>{fmt(x0)}</text>
                <text x=W - 8.0 y=H - 8.0 text-anchor="end">{fmt(x1)}</text>
                <text x=(W + LEFT) / 2.0 y=H - 8.0 text-anchor="middle">{x_label}</text>
                {lines}
                {empty.then(|| view! { <text x=W / 2.0 y=H / 2.0 text-anchor="middle">"no data yet"</text> })}
            </svg>
            <div>{legend}</div>
        </div>
    }
}

/// Rows = layers, columns = steps (averaged into at most `max_columns`); values in [-1, 1]
/// drawn blue (−1) to white (0) to red (+1).
pub fn heatmap(title: String, map: Heatmap, max_columns: usize) -> impl IntoView {
    let Heatmap { steps, rows } = map;
    let n = steps.len();
    let columns = n.clamp(1, max_columns);
    let per = (n as f64 / columns as f64).max(1.0);
    let cell_w = (W - LEFT - 8.0) / columns as f64;
    let layers = rows.len().max(1);
    let cell_h = (H - BOTTOM - 8.0) / layers as f64;
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
            cells.push(view! {
                <rect x=LEFT + c as f64 * cell_w y=8.0 + layer as f64 * cell_h width=cell_w + 0.5 height=cell_h + 0.5 fill=color(mean)>
                    <title>{format!("layer {layer}, steps {}–{}: cos {mean:.3}", steps.get(a).copied().unwrap_or(0.0), steps.get(b - 1).copied().unwrap_or(0.0))}</title>
                </rect>
            });
        }
    }
    let key = title.clone();
    view! {
        <div class="card chart" data-title=key>
            <div><b>{title}</b> <span class="help">" (rows: probed layers; blue −1 … white 0 … red +1)"</span></div>
            <svg viewBox=format!("0 0 {W} {H}") width="100%">
                {cells}
                {(0..rows.len()).map(|l| view! { <text x=LEFT - 4.0 y=8.0 + (l as f64 + 0.6) * cell_h text-anchor="end">{format!("L{l}")}</text> }).collect_view()}
                <text x=LEFT y=H - 8.0>{steps.first().map(|s| fmt(*s)).unwrap_or_default()}</text>
                <text x=W - 8.0 y=H - 8.0 text-anchor="end">{steps.last().map(|s| fmt(*s)).unwrap_or_default()}</text>
                <text x=(W + LEFT) / 2.0 y=H - 8.0 text-anchor="middle">"step"</text>
            </svg>
        </div>
    }
}
