//! Latency plots as SVG: percentile distributions (HdrHistogram style: the
//! x axis spreads the tail, 90% / 99% / 99.9% / ... one decade apart; the y
//! axis is latency on a log scale), one panel per peer, side by side with a
//! shared y axis so panels compare at a glance.
//!
//! Written directly as SVG text: a few lines and labels do not justify a
//! plotting library and its font stack.

use std::fmt::Write as _;

/// One line: a label and `(quantile, microseconds)` points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// The distribution, quantiles ascending.
    pub points: Vec<(f64, u64)>,
}

/// One panel (one peer).
#[derive(Debug, Clone)]
pub struct Panel {
    /// Panel heading.
    pub title: String,
    /// Its lines.
    pub series: Vec<Series>,
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];
/// The tail shown: up to the 99.999th percentile (x = 5 decades).
const X_DECADES: f64 = 5.0;

fn x_of(q: f64) -> f64 {
    let tail = (1.0 - q).max(10f64.powf(-X_DECADES));
    (-tail.log10()).clamp(0.0, X_DECADES)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders `panels` side by side under `title`.
pub fn percentile_svg(title: &str, panels: &[Panel]) -> String {
    let (pw, ph) = (460.0, 320.0);
    let (left, right, top, bottom) = (80.0, 40.0, 50.0, 110.0);
    let width = panels.len().max(1) as f64 * (pw + left + right);
    let height = top + ph + bottom;
    // Shared y range in decades of milliseconds.
    let all = panels
        .iter()
        .flat_map(|p| &p.series)
        .flat_map(|s| &s.points)
        .map(|&(_, us)| (us.max(1) as f64) / 1000.0);
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo > hi { (0.01, 1.0) } else { (lo, hi) };
    let y_min = lo.log10().floor();
    let y_max = hi.log10().ceil().max(y_min + 1.0);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{:.0}" y="24" text-anchor="middle" font-size="16">{}</text>
"#,
        width / 2.0,
        escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        let x0 = i as f64 * (pw + left + right) + left;
        let y0 = top;
        let px = |q: f64| x0 + x_of(q) / X_DECADES * pw;
        let py = |us: u64| {
            let ms = (us.max(1) as f64 / 1000.0).log10();
            y0 + ph - (ms - y_min) / (y_max - y_min) * ph
        };
        let _ = writeln!(
            svg,
            r##"<text x="{:.0}" y="{:.0}" text-anchor="middle" font-size="14">{}</text>
<rect x="{x0:.0}" y="{y0:.0}" width="{pw:.0}" height="{ph:.0}" fill="none" stroke="#333"/>"##,
            x0 + pw / 2.0,
            y0 - 8.0,
            escape(&panel.title)
        );
        for d in 0..=X_DECADES as usize {
            let x = x0 + d as f64 / X_DECADES * pw;
            let label = match d {
                0 => "0%".to_string(),
                _ => format!("{}%", 100.0 - 100.0 * 10f64.powi(-(d as i32))),
            };
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{y0:.0}" x2="{x:.1}" y2="{:.0}" stroke="#ddd"/><text x="{x:.1}" y="{:.0}" text-anchor="middle">{label}</text>"##,
                y0 + ph,
                y0 + ph + 16.0
            );
        }
        let mut d = y_min;
        while d <= y_max {
            let y = y0 + ph - (d - y_min) / (y_max - y_min) * ph;
            let ms = 10f64.powf(d);
            let label = if ms < 1.0 {
                format!("{ms} ms")
            } else {
                format!("{ms:.0} ms")
            };
            let _ = writeln!(
                svg,
                r##"<line x1="{x0:.0}" y1="{y:.1}" x2="{:.0}" y2="{y:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{label}</text>"##,
                x0 + pw,
                x0 - 4.0,
                y + 4.0
            );
            d += 1.0;
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.0}" y="{:.0}" text-anchor="middle">percentile</text>"#,
            x0 + pw / 2.0,
            y0 + ph + 34.0
        );
        for (j, s) in panel.series.iter().enumerate() {
            let color = COLORS[j % COLORS.len()];
            let points: Vec<String> = s
                .points
                .iter()
                .map(|&(q, us)| format!("{:.1},{:.1}", px(q), py(us)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
            let ly = y0 + ph + 52.0 + j as f64 * 16.0;
            let _ = writeln!(
                svg,
                r#"<line x1="{x0:.0}" y1="{:.0}" x2="{:.0}" y2="{:.0}" stroke="{color}" stroke-width="2"/><text x="{:.0}" y="{ly:.0}">{}</text>"#,
                ly - 4.0,
                x0 + 20.0,
                ly - 4.0,
                x0 + 26.0,
                escape(&s.label)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_every_series_with_its_label() {
        let svg = percentile_svg(
            "L latency <alone & with H>",
            &[Panel {
                title: "ignis".into(),
                series: vec![
                    Series {
                        label: "alone".into(),
                        points: vec![(0.0, 100), (0.99, 800), (1.0, 2000)],
                    },
                    Series {
                        label: "with H".into(),
                        points: vec![(0.0, 150), (0.99, 1500), (1.0, 9000)],
                    },
                ],
            }],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("&lt;alone &amp; with H&gt;"));
        assert!(svg.contains(">with H</text>"));
        // Latency from 0.1 ms to 9 ms: decades 0.1, 1 and 10 ms are labelled.
        assert!(svg.contains(">0.1 ms<") && svg.contains(">10 ms<"), "{svg}");
    }
}
