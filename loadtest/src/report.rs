//! Results: one JSON file and one Markdown file per scenario, plus SVG
//! line charts, all under the run's output directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// A Markdown table.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, header: &[&str]) -> Self {
        Self {
            title: title.to_owned(),
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n| {} |\n|", self.title, self.header.join(" | "));
        for _ in &self.header {
            out.push_str(" --- |");
        }
        out.push('\n');
        for row in &self.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out
    }
}

/// One series of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart as standalone SVG.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    const W: f64 = 720.0;
    const H: f64 = 400.0;
    const L: f64 = 70.0;
    const R: f64 = 170.0;
    const T: f64 = 40.0;
    const B: f64 = 50.0;
    const COLOURS: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    ];
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x_max, mut y_max) = (0.0f64, 0.0f64);
    let mut x_min = f64::INFINITY;
    for &(x, y) in all {
        x_max = x_max.max(x);
        x_min = x_min.min(x);
        y_max = y_max.max(y);
    }
    if !x_min.is_finite() {
        x_min = 0.0;
    }
    let x_min = x_min.min(0.0);
    let x_max = if x_max > x_min { x_max } else { x_min + 1.0 };
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let sx = |x: f64| L + (x - x_min) / (x_max - x_min) * (W - L - R);
    let sy = |y: f64| H - B - y / y_max * (H - T - B);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">{}</text>\n",
        W / 2.0,
        escape(title)
    );
    for i in 0..=5 {
        let f = f64::from(i) / 5.0;
        let (x, y) = (x_min + f * (x_max - x_min), f * y_max);
        let _ = writeln!(
            svg,
            "<line x1=\"{L}\" x2=\"{}\" y1=\"{y0}\" y2=\"{y0}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            W - R,
            L - 6.0,
            sy(y) + 4.0,
            tick(y),
            sx(x),
            H - B + 18.0,
            tick(x),
            y0 = sy(y),
        );
    }
    let _ = writeln!(
        svg,
        "<line x1=\"{L}\" x2=\"{L}\" y1=\"{T}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{L}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"black\"/>",
        H - B,
        W - R,
        y = H - B
    );
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text><text transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        L + (W - L - R) / 2.0,
        H - 10.0,
        escape(x_label),
        T + (H - T - B) / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        for p in &points {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                svg,
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"2.5\" fill=\"{colour}\"/>"
            );
        }
        let ly = T + 10.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{}</text>",
            W - R + 10.0,
            W - R + 30.0,
            W - R + 36.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn tick(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// What a scenario produced.
#[derive(Debug, Default)]
pub struct Output {
    pub json: serde_json::Map<String, Value>,
    pub tables: Vec<Table>,
    pub charts: Vec<(String, String)>,
    pub notes: Vec<String>,
    /// A promise the scenario checks was broken: the run fails after
    /// writing its results.
    pub broken: Option<String>,
}

impl Output {
    /// Writes `<name>.json`, `<name>.md` and the charts into `dir`; returns
    /// the Markdown.
    pub fn write(&self, dir: &Path, name: &str) -> std::io::Result<String> {
        std::fs::create_dir_all(dir)?;
        let json = Value::Object(self.json.clone());
        std::fs::write(
            dir.join(format!("{name}.json")),
            serde_json::to_string_pretty(&json)?,
        )?;
        let mut md = format!("## {name}\n\n");
        for table in &self.tables {
            md.push_str(&table.markdown());
            md.push('\n');
        }
        for note in &self.notes {
            let _ = writeln!(md, "- {note}");
        }
        for (file, svg) in &self.charts {
            let path: PathBuf = dir.join(file);
            std::fs::write(&path, svg)?;
            let _ = writeln!(md, "\n![{file}]({file})");
        }
        std::fs::write(dir.join(format!("{name}.md")), &md)?;
        Ok(md)
    }
}

/// `x.xxx` milliseconds.
pub fn ms(v: f64) -> String {
    format!("{v:.3}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_every_series_and_escapes_labels() {
        let svg = line_chart(
            "p99 <ms>",
            "s",
            "ms",
            &[
                Series {
                    name: "a&b".into(),
                    points: vec![(0.0, 1.0), (1.0, 2.0)],
                },
                Series {
                    name: "c".into(),
                    points: vec![(0.5, 3.0)],
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("p99 &lt;ms&gt;") && svg.contains("a&amp;b"));
    }

    #[test]
    fn tables_render_as_markdown() {
        let mut t = Table::new("T", &["a", "b"]);
        t.row(vec!["1".into(), "2".into()]);
        assert_eq!(
            t.markdown(),
            "### T\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n"
        );
    }
}
