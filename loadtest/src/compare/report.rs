//! The `compare` report: a markdown table of medians per test and target, Rampart's
//! ratios to every peer, and an SVG of latency percentile curves (plotters).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::peers::Kind;
use super::{Results, Test};

/// Medians of one (test, target) over the rounds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Medians {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, ms.
    pub p50: f64,
    /// 99th percentile latency, ms.
    pub p99: f64,
    /// Target CPU seconds per 100k requests.
    pub cpu_per_100k: f64,
    /// The backend's CPU seconds per 100k requests.
    pub backend_cpu_per_100k: f64,
    /// TCP connections opened during a measurement.
    pub tcp_opens: f64,
    /// Failed requests summed over rounds.
    pub errors: u64,
    /// Response bytes (head and body) per request.
    pub bytes_per_response: f64,
}

/// The median of `values` (NaN for none).
#[must_use]
pub fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| !v.is_nan());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Medians by test and target.
#[must_use]
pub fn medians(results: &Results) -> BTreeMap<(Test, Kind), Medians> {
    let mut groups: BTreeMap<(Test, Kind), Vec<&super::Sample>> = BTreeMap::new();
    for s in &results.samples {
        groups.entry((s.test, s.target)).or_default().push(s);
    }
    groups
        .into_iter()
        .map(|(k, v)| {
            let m = Medians {
                rps: median(v.iter().map(|s| s.report.rps).collect()),
                p50: median(v.iter().map(|s| s.report.latency_ms.p50).collect()),
                p99: median(v.iter().map(|s| s.report.latency_ms.p99).collect()),
                cpu_per_100k: median(v.iter().map(|s| s.cpu_per_100k).collect()),
                backend_cpu_per_100k: median(v.iter().map(|s| s.backend_cpu_per_100k).collect()),
                #[allow(clippy::cast_precision_loss)]
                tcp_opens: median(v.iter().map(|s| s.tcp_opens as f64).collect()),
                errors: v.iter().map(|s| s.report.errors.total()).sum(),
                #[allow(clippy::cast_precision_loss)]
                bytes_per_response: median(
                    v.iter()
                        .filter(|s| s.report.requests > 0)
                        .map(|s| s.report.bytes as f64 / s.report.requests as f64)
                        .collect(),
                ),
            };
            (k, m)
        })
        .collect()
}

/// The markdown report.
#[must_use]
pub fn markdown(results: &Results, svg_name: &str) -> String {
    let med = medians(results);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Measured {} on {} CPUs with `{}`.\n",
        results.date, results.cpus, results.command
    );
    let _ = writeln!(
        out,
        "Versions: {}.\n",
        results
            .versions
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        out,
        "| test | target | req/s | vs direct | p50 ms | p99 ms | CPU s / 100k req | backend CPU s / 100k | TCP connects | errors |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let tests: Vec<Test> = {
        let mut t: Vec<Test> = med.keys().map(|(t, _)| *t).collect();
        t.dedup();
        t
    };
    for test in &tests {
        let direct = med.get(&(*test, Kind::Direct)).map(|m| m.rps);
        for ((t, kind), m) in med.iter().filter(|((t, _), _)| t == test) {
            let vs = direct.map_or_else(|| "–".to_string(), |d| format!("{:.2}×", m.rps / d));
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {vs} | {:.3} | {:.3} | {:.2} | {:.2} | {:.0} | {} |",
                t.name(),
                kind.name(),
                m.rps,
                m.p50,
                m.p99,
                m.cpu_per_100k,
                m.backend_cpu_per_100k,
                m.tcp_opens,
                m.errors
            );
        }
    }
    if let Some(direct) = med.get(&(Test::Gzip100k, Kind::Direct)) {
        let _ = writeln!(
            out,
            "\nCompression of the 100 KiB page (gzip, level 1 everywhere): bytes per response, saved against the uncompressed page, and CPU per MiB of page compressed (the target's whole CPU, proxying included):\n"
        );
        let _ = writeln!(out, "| target | bytes / response | saved | CPU ms / MiB |");
        let _ = writeln!(out, "|---|---:|---:|---:|");
        for ((_, kind), m) in med.iter().filter(|((t, _), _)| *t == Test::Gzip100k) {
            if *kind == Kind::Direct {
                continue;
            }
            // 100k responses of 100 KiB are 9765.625 MiB.
            let per_mib = m.cpu_per_100k / 9765.625 * 1000.0;
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.1}% | {:.2} |",
                kind.name(),
                m.bytes_per_response,
                (1.0 - m.bytes_per_response / direct.bytes_per_response) * 100.0,
                per_mib
            );
        }
    }
    let peers: Vec<Kind> = {
        let mut p: Vec<Kind> = med
            .keys()
            .map(|(_, k)| *k)
            .filter(|k| !matches!(k, Kind::Direct | Kind::Rampart))
            .collect();
        p.sort();
        p.dedup();
        p
    };
    if !peers.is_empty() {
        let _ = writeln!(out, "\nRampart relative to each peer (req/s ratio, higher is better / CPU per request ratio, lower is better / p99 ratio, lower is better):\n");
        let _ = writeln!(
            out,
            "| test | {} |",
            peers
                .iter()
                .map(|p| format!("vs {}", p.name()))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(out, "|---|{}", "---|".repeat(peers.len()));
        for test in &tests {
            let Some(r) = med.get(&(*test, Kind::Rampart)) else {
                continue;
            };
            let cells: Vec<String> = peers
                .iter()
                .map(|p| {
                    med.get(&(*test, *p)).map_or_else(
                        || "–".into(),
                        |m| {
                            format!(
                                "{:.2}× / {:.2}× / {:.2}×",
                                r.rps / m.rps,
                                r.cpu_per_100k / m.cpu_per_100k,
                                r.p99 / m.p99
                            )
                        },
                    )
                })
                .collect();
            let _ = writeln!(out, "| {} | {} |", test.name(), cells.join(" | "));
        }
    }
    // Under --access-log: each log's cost against the same server without it.
    let pairs = [
        (Kind::Rampart, Kind::RampartUnlogged),
        (Kind::Nginx, Kind::NginxUnlogged),
    ];
    let logged: Vec<_> = pairs
        .iter()
        .filter(|(_, off)| med.keys().any(|(_, k)| k == off))
        .collect();
    if !logged.is_empty() {
        let _ = writeln!(
            out,
            "\nWhat each access log costs its server (logged / unlogged, same run: CPU per request, req/s):\n"
        );
        let _ = writeln!(
            out,
            "| test | {} |",
            logged
                .iter()
                .map(|(on, _)| on.name())
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(out, "|---|{}", "---|".repeat(logged.len()));
        for test in &tests {
            let cells: Vec<String> = logged
                .iter()
                .map(
                    |(on, off)| match (med.get(&(*test, *on)), med.get(&(*test, *off))) {
                        (Some(a), Some(b)) => format!(
                            "{:.2}× / {:.2}×",
                            a.cpu_per_100k / b.cpu_per_100k,
                            a.rps / b.rps
                        ),
                        _ => "–".into(),
                    },
                )
                .collect();
            let _ = writeln!(out, "| {} | {} |", test.name(), cells.join(" | "));
        }
    }
    let _ = writeln!(
        out,
        "\nPeak RSS over the run (MB): {}.",
        results
            .peak_rss_kb
            .iter()
            .map(|(k, v)| format!("{k} {:.1}", *v as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !results.idle_rss_kb.is_empty() {
        let _ = writeln!(
            out,
            "\nRSS while holding idle keep-alive TLS connections ({}) (MB): {}.",
            if results.idle_h2 {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
            results
                .idle_rss_kb
                .iter()
                .map(|(k, (rss, n))| format!("{k} {:.1} with {n} open", *rss as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        out,
        "\n![latency percentiles of the open-loop test]({svg_name})"
    );
    out
}

/// Draws the latency-by-percentile curves of the last round's open-loop test.
///
/// # Errors
/// When the SVG cannot be written.
pub fn latency_svg(results: &Results, path: &Path) -> anyhow::Result<()> {
    let last_round = results.samples.iter().map(|s| s.round).max().unwrap_or(0);
    let series: Vec<(Kind, Vec<(f64, f64)>)> = results
        .samples
        .iter()
        .filter(|s| s.round == last_round && s.test == Test::OpenLoop)
        .map(|s| {
            (
                s.target,
                s.report
                    .curve
                    .iter()
                    .filter(|(p, _)| *p < 100.0)
                    .map(|(p, ms)| (nines(*p), *ms))
                    .collect(),
            )
        })
        .collect();
    let max_ms = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .fold(0.1, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency by percentile, open loop (coordinated-omission corrected)",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..4.0, 0.0..max_ms)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .x_label_formatter(&|x| {
            format!("{:.4}", 100.0 * (1.0 - 10f64.powf(-x)))
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_string()
        })
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (kind, pts)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(kind.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Maps a percentile to "nines" (90 → 1, 99 → 2, 99.9 → 3) so the tail gets room.
fn nines(p: f64) -> f64 {
    -(1.0 - p / 100.0).max(1e-4).log10()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert!((median(vec![3.0, 1.0, 2.0]) - 2.0).abs() < 1e-9);
        assert!((median(vec![4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-9);
        assert!(median(vec![]).is_nan());
        assert!((median(vec![f64::NAN, 5.0]) - 5.0).abs() < 1e-9);
    }

    #[test]
    fn nines_spread_the_tail() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert!(nines(100.0) <= 4.0);
    }
}
