//! PNG plots of rate, latency and programming time against N (plotters, bitmap backend; text in
//! DejaVu Sans from Debian's `fonts-dejavu-core`).

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::env::{Access, Mode};
use super::load::Workload;
use super::report::{paired_rate, rate};
use super::stats::Interval;
use super::results::{median, Point, Results, TcRound, TC_CASES};

/// The font the plots use.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = std::fs::read(FONT)
            .with_context(|| format!("reading {FONT} (Debian package fonts-dejavu-core)"))
            .and_then(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| anyhow!("{FONT} is not a usable font"))
            });
    });
    result
}

fn e<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("plotting: {err:?}")
}

fn color(mode: Mode) -> RGBColor {
    match mode {
        Mode::None => RGBColor(90, 90, 90),
        Mode::Kproxy => RGBColor(31, 119, 180),
        Mode::Iptables => RGBColor(214, 39, 40),
        Mode::Nftables => RGBColor(44, 160, 44),
    }
}

/// One line of a chart.
struct Series {
    label: String,
    color: RGBColor,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// Draws the mesh, the series and the legend on a chart context (a macro: the two coordinate
/// types of [`chart`] differ).
macro_rules! draw {
    ($c:ident, $y_desc:expr, $series:expr) => {{
        $c.configure_mesh()
            .x_desc("services (N)")
            .y_desc($y_desc)
            .draw()
            .map_err(e)?;
        for s in $series {
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|p| p.1.is_finite() && p.1 > 0.0)
                .collect();
            let style = ShapeStyle::from(s.color).stroke_width(if s.dashed { 1 } else { 2 });
            if s.dashed {
                $c.draw_series(DashedLineSeries::new(points.clone(), 6, 4, style))
                    .map_err(e)?
                    .label(s.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            } else {
                $c.draw_series(LineSeries::new(points.clone(), style))
                    .map_err(e)?
                    .label(s.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            }
            $c.draw_series(points.iter().map(|&p| Circle::new(p, 3, style.filled())))
                .map_err(e)?;
        }
        $c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::LowerLeft)
            .draw()
            .map_err(e)?;
    }};
}

/// Draws `series` on `area` with a log-scale N axis (and a log-scale y axis if `log_y`).
fn chart(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    y_desc: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let x_max = xs.clone().fold(1.0f64, f64::max) * 1.6;
    let x_min = xs.fold(f64::INFINITY, f64::min).min(1.0) * 0.7;
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let y_max = ys.iter().copied().fold(0.0f64, f64::max).max(1e-3);
    let y_min = ys.iter().copied().fold(f64::INFINITY, f64::min).min(y_max);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    let x_range = (x_min..x_max).log_scale();
    if log_y {
        let mut c = builder
            .build_cartesian_2d(x_range, (y_min * 0.5..y_max * 2.0).log_scale())
            .map_err(e)?;
        draw!(c, y_desc, series);
    } else {
        let mut c = builder
            .build_cartesian_2d(x_range, 0.0..y_max * 1.15)
            .map_err(e)?;
        draw!(c, y_desc, series);
    }
    Ok(())
}

/// The series of one data-path metric: no proxy, and each proxy at the first and last service.
fn datapath_series(r: &Results, value: impl Fn(&Point, Mode, &str) -> f64) -> Vec<Series> {
    let mut out = vec![Series {
        label: "no proxy".into(),
        color: color(Mode::None),
        dashed: false,
        points: r.points.iter().map(|p| (p.services as f64, value(p, Mode::None, "pod"))).collect(),
    }];
    for mode in [Mode::Kproxy, Mode::Iptables, Mode::Nftables] {
        for target in ["first", "last"] {
            out.push(Series {
                label: format!("{} ({target} service)", mode.label()),
                color: color(mode),
                dashed: target == "first",
                points: r
                    .points
                    .iter()
                    .map(|p| {
                        let t = if p.services == 1 { "first" } else { target };
                        (p.services as f64, value(p, mode, t))
                    })
                    .collect(),
            });
        }
    }
    out
}

fn latency(p: &Point, access: Access, mode: Mode, target: &str, workload: Workload, p99: bool) -> f64 {
    p.summary(access, mode, target, workload)
        .map_or(f64::NAN, |s| if p99 { s.seq_p99_ms } else { s.seq_p50_ms })
}

/// Writes `bench-rate[-nodeport].png`, `bench-latency[-nodeport]-{short,keepalive}.png`,
/// `bench-paired.png`, `bench-tc.png` and `bench-control-plane.png` into `dir`.
pub fn render(r: &Results, dir: &Path) -> Result<()> {
    register_font()?;
    std::fs::create_dir_all(dir)?;
    let size = (1400, 560);
    render_paired(r, dir)?;

    for access in Access::ALL {
        let (suffix, what) = match access {
            Access::ClusterIp => ("", "ClusterIP"),
            Access::NodePort => ("-nodeport", "NodePort"),
        };
        let path = dir.join(format!("bench-rate{suffix}.png"));
        let root = BitMapBackend::new(&path, size).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let halves = root.split_evenly((1, 2));
        for (area, workload) in halves.iter().zip(Workload::ALL) {
            let series = datapath_series(r, |p, m, t| rate(p, access, m, t, workload));
            chart(area, &format!("{what} rate, {}", workload.label()), "requests/s (median)", &series, false)?;
        }
        root.present().map_err(e)?;

        for workload in Workload::ALL {
            let path = dir.join(format!("bench-latency{suffix}-{}.png", workload.name()));
            let root = BitMapBackend::new(&path, size).into_drawing_area();
            root.fill(&WHITE).map_err(e)?;
            let halves = root.split_evenly((1, 2));
            for (area, p99) in halves.iter().zip([false, true]) {
                let series = datapath_series(r, |p, m, t| latency(p, access, m, t, workload, p99));
                let title = format!(
                    "{what} {} latency, {}, one at a time",
                    if p99 { "p99" } else { "p50" },
                    workload.label()
                );
                chart(area, &title, "ms (median over rounds)", &series, false)?;
            }
            root.present().map_err(e)?;
        }
    }

    if r.points.iter().any(|p| p.tc.is_some()) {
        let path = dir.join("bench-tc.png");
        let root = BitMapBackend::new(&path, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let shades = [
            RGBColor(31, 119, 180),
            RGBColor(255, 127, 14),
            RGBColor(44, 160, 44),
            RGBColor(148, 103, 189),
            RGBColor(214, 39, 40),
        ];
        let tc_line = |label: &str, color: RGBColor, dashed: bool, f: fn(&TcRound) -> f64| Series {
            label: label.into(),
            color,
            dashed,
            points: r
                .points
                .iter()
                .filter_map(|p| Some((p.services as f64, p.tc.as_ref()?.median(f))))
                .collect(),
        };
        let mut series = vec![
            tc_line("empty program", color(Mode::None), false, |r| r.empty_ns),
            tc_line("empty program (single runs)", color(Mode::None), true, |r| r.empty_single_ns),
        ];
        for ((label, f, _), shade) in TC_CASES.iter().zip(shades) {
            series.push(tc_line(label, shade, false, *f));
        }
        chart(&root, "tc programs, per packet (BPF_PROG_TEST_RUN)", "ns (median, log)", &series, true)?;
        root.present().map_err(e)?;
    }

    let path = dir.join("bench-control-plane.png");
    let root = BitMapBackend::new(&path, size).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let halves = root.split_evenly((1, 2));
    let n = |p: &Point| p.services as f64;
    let line = |label: &str, mode: Mode, dashed: bool, f: &dyn Fn(&Point) -> f64| Series {
        label: label.into(),
        color: color(mode),
        dashed,
        points: r.points.iter().map(|p| (n(p), f(p))).collect(),
    };
    let program = vec![
        line("kproxy on an apiserver: agent start → programmed", Mode::None, false, &|p| {
            p.control.kproxy_api_start_ms.unwrap_or(f64::NAN)
        }),
        line("kproxy: agent start → programmed", Mode::Kproxy, true, &|p| p.control.kproxy_start_ms),
        line("kproxy: manifest written → programmed", Mode::Kproxy, false, &|p| p.control.kproxy_write_ms),
        line("kproxy: map writes only", Mode::None, true, &|p| p.control.kproxy_write_sync_ms),
        line("iptables-legacy-restore", Mode::Iptables, false, &|p| p.control.iptables_restore_ms),
        line("iptables-nft-restore", Mode::Iptables, true, &|p| {
            p.control.iptables_nft_restore_ms.unwrap_or(f64::NAN)
        }),
        line("nft -f", Mode::Nftables, false, &|p| p.control.nft_ms),
    ];
    chart(&halves[0], "Programming N services from nothing", "ms (log)", &program, true)?;
    let change = vec![
        line("kproxy: manifest rename → synced", Mode::Kproxy, false, &|p| median(&p.control.change.kproxy_e2e_ms)),
        line("kproxy: map writes only", Mode::None, true, &|p| median(&p.control.change.kproxy_sync_ms)),
        line("iptables: partial restore", Mode::Iptables, false, &|p| median(&p.control.change.iptables_partial_ms)),
        line("iptables: full restore", Mode::Iptables, true, &|p| median(&p.control.change.iptables_full_ms)),
        line("nftables: partial transaction", Mode::Nftables, false, &|p| median(&p.control.change.nft_tx_ms)),
        line("nftables: + listings", Mode::Nftables, true, &|p| median(&p.control.change.nft_with_list_ms)),
    ];
    chart(&halves[1], "One endpoint change, N services programmed", "ms (log, median)", &change, true)?;
    root.present().map_err(e)?;
    Ok(())
}

/// The paired ratios to no proxy (short connections, last service) with their 95 % intervals,
/// one panel per access: `bench-paired.png`.
fn render_paired(r: &Results, dir: &Path) -> Result<()> {
    let path = dir.join("bench-paired.png");
    let root = BitMapBackend::new(&path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let halves = root.split_evenly((1, 2));
    for (area, access) in halves.iter().zip(Access::ALL) {
        let what = match access {
            Access::ClusterIp => "ClusterIP",
            Access::NodePort => "NodePort",
        };
        // (mode, x offset factor, [(N, interval)]).
        let lines: Vec<(Mode, f64, Vec<(f64, Interval)>)> = [(Mode::Kproxy, 0.93), (Mode::Iptables, 1.0), (Mode::Nftables, 1.07)]
            .into_iter()
            .map(|(mode, shift)| {
                let points = r
                    .points
                    .iter()
                    .map(|p| (p.services as f64 * shift, paired_rate(p, access, Workload::Short, mode, Mode::None, "last").0))
                    .filter(|(_, i)| i.is_finite())
                    .collect();
                (mode, shift, points)
            })
            .collect();
        let all = lines.iter().flat_map(|l| l.2.iter());
        let x_max = all.clone().map(|p| p.0).fold(1.0f64, f64::max) * 1.6;
        let y_max = all.clone().map(|p| p.1.hi).fold(1.05f64, f64::max) * 1.05;
        let y_min = all.map(|p| p.1.lo).fold(0.95f64, f64::min) * 0.95;
        let mut c = ChartBuilder::on(area)
            .caption(format!("{what}: rate ÷ no proxy, short connections, last service"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((0.6..x_max).log_scale(), y_min..y_max)
            .map_err(e)?;
        c.configure_mesh()
            .x_desc("services (N)")
            .y_desc("median of per-round ratios, 95 % interval")
            .draw()
            .map_err(e)?;
        let one = ShapeStyle::from(BLACK.mix(0.5)).stroke_width(1);
        c.draw_series(DashedLineSeries::new(vec![(0.6, 1.0), (x_max, 1.0)], 6, 4, one)).map_err(e)?;
        for (mode, _, points) in &lines {
            let style = ShapeStyle::from(color(*mode)).stroke_width(2);
            c.draw_series(LineSeries::new(points.iter().map(|(x, i)| (*x, i.median)), style))
                .map_err(e)?
                .label(mode.label())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            for (x, i) in points {
                let (x, cap) = (*x, 1.025);
                c.draw_series([
                    PathElement::new(vec![(x, i.lo), (x, i.hi)], style),
                    PathElement::new(vec![(x / cap, i.lo), (x * cap, i.lo)], style),
                    PathElement::new(vec![(x / cap, i.hi), (x * cap, i.hi)], style),
                ])
                .map_err(e)?;
                c.draw_series([Circle::new((x, i.median), 3, style.filled())]).map_err(e)?;
            }
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::LowerLeft)
            .draw()
            .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}
