//! The evaluation report: report.json (everything, including per-search outcomes),
//! report.md (tables), and plots as SVG and PNG: the DET curve (FNIR against FPIR, both
//! log scale, one line per storage dtype) and the mated / non-mated score histograms.

use crate::error::{Error, IoContext, Result};
use crate::eval::{EvalReport, det_curve};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// The summary table (markdown), as printed and as written into report.md.
pub fn summary_table(reports: &[EvalReport]) -> String {
    let Some(first) = reports.first() else {
        return String::new();
    };
    let mut s = format!("| dtype | rank-1 | rank-{k} (recall@{k}) |", k = first.k);
    for p in &first.operating_points {
        s += &format!(" FNIR @ FPIR={} (threshold) |", p.target_fpir);
    }
    s += "\n|---|---|---|";
    s += &"---|".repeat(first.operating_points.len());
    s += "\n";
    for r in reports {
        s += &format!("| {} | {:.4} | {:.4} |", r.dtype, r.rank1, r.rank_k);
        for p in &r.operating_points {
            s += &format!(" {:.4} ({:.4}, FPIR {:.4}) |", p.fnir, p.threshold, p.fpir);
        }
        s += "\n";
    }
    if reports.len() > 1 {
        s += &format!(
            "\nCost of each storage dtype against {} (positive = worse):\n\n",
            first.dtype
        );
        s += "| dtype | d rank-1 | d recall@k |";
        for p in &first.operating_points {
            s += &format!(" d FNIR @ {} |", p.target_fpir);
        }
        s += "\n|---|---|---|";
        s += &"---|".repeat(first.operating_points.len());
        s += "\n";
        for r in &reports[1..] {
            s += &format!(
                "| {} | {:+.4} | {:+.4} |",
                r.dtype,
                first.rank1 - r.rank1,
                first.rank_k - r.rank_k
            );
            for (p, q) in r.operating_points.iter().zip(&first.operating_points) {
                s += &format!(" {:+.4} |", p.fnir - q.fnir);
            }
            s += "\n";
        }
    }
    s
}

/// Write report.json, report.md, det.{svg,png} and scores.{svg,png} into `dir`.
pub fn write_report(dir: &Path, reports: &[EvalReport]) -> Result<()> {
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(reports).expect("report serialises");
    std::fs::write(dir.join("report.json"), json).ctx(|| format!("writing {}/report.json", dir.display()))?;
    let first = &reports[0];
    let md = format!(
        "# biogate identification report\n\n\
         {} mated and {} non-mated searches, candidate lists of k = {}, rank criterion R = {} \
         (FNIR counts a mated search as found only if its mate is at rank <= R with a score >= the threshold; \
         FPIR counts non-mated searches whose top score is >= the threshold; NIST FRTE 1:N definitions).\n\n\
         {}\n\n![DET](det.svg)\n\n![scores](scores.svg)\n",
        first.mated_searches,
        first.nonmated_searches,
        first.k,
        first.rank_criterion,
        summary_table(reports)
    );
    std::fs::write(dir.join("report.md"), md).ctx(|| format!("writing {}/report.md", dir.display()))?;
    register_font();
    let plot_err = |what: &str, e: String| Error::invalid(format!("drawing {what}: {e}"));
    let size = (900, 640);
    draw_det(SVGBackend::new(&dir.join("det.svg"), size).into_drawing_area(), reports)
        .map_err(|e| plot_err("det.svg", e))?;
    draw_det(
        BitMapBackend::new(&dir.join("det.png"), size).into_drawing_area(),
        reports,
    )
    .map_err(|e| plot_err("det.png", e))?;
    draw_scores(
        SVGBackend::new(&dir.join("scores.svg"), size).into_drawing_area(),
        first,
    )
    .map_err(|e| plot_err("scores.svg", e))?;
    draw_scores(
        BitMapBackend::new(&dir.join("scores.png"), size).into_drawing_area(),
        first,
    )
    .map_err(|e| plot_err("scores.png", e))?;
    Ok(())
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Bundled, so PNGs render the same on any machine without system fonts.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT);
    });
}

const COLORS: [RGBColor; 3] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44)];

fn draw_det<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    reports: &[EvalReport],
) -> std::result::Result<(), String> {
    let e = |x: &dyn std::fmt::Debug| format!("{x:?}");
    area.fill(&WHITE).map_err(|x| e(&x))?;
    let floor_x = 1.0 / reports[0].nonmated_searches.max(1) as f64 / 2.0;
    let floor_y = 1.0 / reports[0].mated_searches.max(1) as f64 / 2.0;
    let mut chart = ChartBuilder::on(&area)
        .caption("DET: FNIR against FPIR", ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (floor_x.min(1e-4)..1.0).log_scale(),
            (floor_y.min(1e-3)..1.0).log_scale(),
        )
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("FPIR (non-mated searches with a candidate >= threshold)")
        .y_desc(format!(
            "FNIR (mate not at rank <= {} above threshold)",
            reports[0].rank_criterion
        ))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, r) in reports.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = det_curve(r)
            .into_iter()
            .map(|(x, y)| (x.max(floor_x), y.max(floor_y)))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(r.dtype.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        for p in &r.operating_points {
            chart
                .draw_series(std::iter::once(Circle::new(
                    (p.fpir.max(floor_x), p.fnir.max(floor_y)),
                    4,
                    color.filled(),
                )))
                .map_err(|x| e(&x))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|x| e(&x))?;
    area.present().map_err(|x| e(&x))
}

fn draw_scores<DB: DrawingBackend>(area: DrawingArea<DB, Shift>, r: &EvalReport) -> std::result::Result<(), String> {
    let e = |x: &dyn std::fmt::Debug| format!("{x:?}");
    area.fill(&WHITE).map_err(|x| e(&x))?;
    let (lo, hi, bins) = (-0.25f64, 1.0f64, 100usize);
    let width = (hi - lo) / bins as f64;
    let histogram = |scores: &[f32]| -> Vec<(f64, f64)> {
        let mut counts = vec![0usize; bins];
        for &s in scores {
            let b = ((f64::from(s) - lo) / width).floor();
            if b >= 0.0 && (b as usize) < bins {
                counts[b as usize] += 1;
            }
        }
        let n = scores.len().max(1) as f64;
        counts
            .iter()
            .enumerate()
            .flat_map(|(i, &c)| {
                let x = lo + i as f64 * width;
                let y = c as f64 / n;
                [(x, y), (x + width, y)]
            })
            .collect()
    };
    let mated: Vec<f32> = r.mated.iter().filter_map(|m| m.score).collect();
    let nonmated: Vec<f32> = r.nonmated_top.iter().copied().filter(|s| s.is_finite()).collect();
    let (hm, hn) = (histogram(&mated), histogram(&nonmated));
    let top = hm.iter().chain(&hn).map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.1;
    let mut chart = ChartBuilder::on(&area)
        .caption(format!("Scores ({} storage)", r.dtype), ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(lo..hi, 0.0..top)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("cosine similarity")
        .y_desc("fraction of searches")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|x| e(&x))?;
    for (points, label, color) in [
        (hm, "mated: the mate's score", COLORS[2]),
        (hn, "non-mated: top score", COLORS[1]),
    ] {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    for p in &r.operating_points {
        let t = f64::from(p.threshold);
        if t.is_finite() && t > lo && t < hi {
            chart
                .draw_series(LineSeries::new(vec![(t, 0.0), (t, top)], BLACK.mix(0.4)))
                .map_err(|x| e(&x))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|x| e(&x))?;
    area.present().map_err(|x| e(&x))
}
