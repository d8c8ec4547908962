//! `--plot FILE.svg`: 64 KiB bulk throughput against URBs in flight, for
//! usbwire and the usbip crate, with raw TCP's 64 KiB stream as the
//! ceiling, all from the run that just finished.

use std::path::Path;

use plotters::prelude::*;

use crate::Row;

/// The URBs-in-flight depths the bulk workloads run at.
const DEPTHS: [u32; 3] = [1, 8, 32];

/// Where depth `k` sits on the x axis: log2, so that 1, 2, 4 … 32 are
/// evenly spaced and each gets a tick labelled with its depth.
fn x_of(k: u32) -> f64 {
    f64::from(k).log2()
}

/// One line of the chart.
struct Series {
    label: String,
    color: RGBColor,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

fn series(rows: &[Row]) -> Vec<Series> {
    let mb_s = |server: &str, workload: &str| {
        rows.iter()
            .find(|r| r.server == server && r.workload == workload && r.error.is_none())
            .map(Row::mb_s)
    };
    let mut out = Vec::new();
    for (server, name, color) in [
        ("usbwire", "usbwire", RGBColor(0x1f, 0x77, 0xb4)),
        ("usbip-crate", "usbip crate", RGBColor(0xd6, 0x27, 0x28)),
    ] {
        for (dir, dashed) in [("in", false), ("out", true)] {
            let points: Vec<(f64, f64)> = DEPTHS
                .iter()
                .filter_map(|&k| {
                    mb_s(server, &format!("bulk-{dir}-64k-k{k}")).map(|v| (x_of(k), v))
                })
                .collect();
            if !points.is_empty() {
                out.push(Series {
                    label: format!("{name}, bulk {} 64 KiB", dir.to_uppercase()),
                    color,
                    dashed,
                    points,
                });
            }
        }
    }
    // A byte stream has no URBs: its rate is the ceiling at every depth.
    if let Some(v) = mb_s("raw-tcp", "stream-64k") {
        out.push(Series {
            label: "raw TCP, 64 KiB writes".into(),
            color: RGBColor(0x55, 0x55, 0x55),
            dashed: true,
            points: vec![(x_of(DEPTHS[0]), v), (x_of(DEPTHS[DEPTHS.len() - 1]), v)],
        });
    }
    out
}

/// Draws the chart into `path`; an error says what was missing or failed.
pub fn write(path: &Path, rows: &[Row], subtitle: &str) -> Result<(), String> {
    let lines = series(rows);
    if !lines.iter().any(|s| s.label.starts_with("usbwire")) {
        return Err(
            "nothing to plot: --plot needs the usbwire bulk 64 KiB workloads \
             (leave them in --filter, e.g. --filter 64k)"
                .into(),
        );
    }
    let top = lines
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        * 1.1;
    let failed = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("USB/IP throughput vs URBs in flight ({subtitle})"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            x_of(DEPTHS[0])..x_of(DEPTHS[DEPTHS.len() - 1]),
            0.0..top.max(1.0),
        )
        .map_err(|e| failed(&e))?;
    chart
        .configure_mesh()
        .x_desc("URBs in flight")
        .y_desc("MB/s")
        // One tick per power of two, labelled with the depth itself.
        .x_labels(x_of(DEPTHS[DEPTHS.len() - 1]) as usize + 1)
        .x_label_formatter(&|x| format!("{:.0}", x.exp2()))
        .draw()
        .map_err(|e| failed(&e))?;
    for s in &lines {
        let style = s.color.stroke_width(2);
        let drawn = if s.dashed {
            chart.draw_series(DashedLineSeries::new(s.points.iter().copied(), 8, 5, style))
        } else {
            chart.draw_series(LineSeries::new(s.points.iter().copied(), style))
        };
        let color = s.color;
        drawn
            .map_err(|e| failed(&e))?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                s.points
                    .iter()
                    .map(|&p| Circle::new(p, 3, s.color.filled())),
            )
            .map_err(|e| failed(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| failed(&e))?;
    root.present().map_err(|e| failed(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(server: &'static str, workload: &str, mb: u64) -> Row {
        Row {
            bytes: mb * 1_000_000,
            secs: 1.0,
            ops: 1,
            error: None,
            ..Row::failed(server, workload, String::new())
        }
    }

    #[test]
    fn usbwire_rows_are_needed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        let only_raw = [row("raw-tcp", "stream-64k", 500)];
        let e = write(&path, &only_raw, "t").unwrap_err();
        assert!(e.contains("--filter"), "{e}");
        assert!(!path.exists());
    }

    /// Failed rows are left out; a missing server's lines are too.
    #[test]
    fn draws_what_the_run_measured() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        let mut rows = vec![row("raw-tcp", "stream-64k", 900)];
        for (k, mb) in [(1, 100), (8, 400), (32, 600)] {
            rows.push(row("usbwire", &format!("bulk-in-64k-k{k}"), mb));
        }
        rows.push(Row::failed("usbwire", "bulk-out-64k-k1", "broken".into()));
        write(&path, &rows, "test").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("usbwire, bulk IN 64 KiB"));
        assert!(svg.contains("raw TCP, 64 KiB writes"));
        assert!(!svg.contains("bulk OUT"), "a failed row was drawn");
        assert!(!svg.contains("usbip crate"));
        assert_eq!(svg.matches("<circle").count(), 3 + 2);
    }
}
