//! `--plot DIR`: cold-start distributions as SVG, one row per series: every sample a dot, the
//! range a line, the median a bar.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::report::Series;

const COLOURS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

/// Draws `series` (all in one unit) into the SVG file `path`.
pub fn distributions(path: &Path, title: &str, series: &[&Series]) -> anyhow::Result<()> {
    if series.is_empty() {
        anyhow::bail!("nothing to plot for {title}");
    }
    let unit = series[0].unit;
    let max = series.iter().map(|s| s.max).fold(0.0, f64::max) * 1.08;
    let rows = series.len();
    let height = 90 + 60 * u32::try_from(rows).unwrap_or(8);
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(190)
            .build_cartesian_2d(0.0..max.max(1.0), -0.5..(rows as f64 - 0.5))?;
        let names: Vec<String> = series
            .iter()
            .map(|s| format!("{} (n={})", s.name, s.values.len()))
            .collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(rows)
            .y_label_formatter(&|y| {
                names
                    .iter()
                    .zip(0u32..)
                    .find(|(_, row)| (y - f64::from(*row)).abs() < 0.01)
                    .map(|(name, _)| name.clone())
                    .unwrap_or_default()
            })
            .x_desc(unit)
            .draw()?;
        for (row, s) in series.iter().enumerate() {
            let y = row as f64;
            let colour = COLOURS[row % COLOURS.len()];
            chart.draw_series(LineSeries::new(
                [(s.min, y), (s.max, y)],
                colour.stroke_width(1),
            ))?;
            chart.draw_series(s.values.iter().enumerate().map(|(i, v)| {
                // A small vertical spread keeps equal samples visible.
                let jitter = (i % 5) as f64 * 0.05 - 0.1;
                Circle::new((*v, y + jitter), 3, colour.mix(0.6).filled())
            }))?;
            chart.draw_series(LineSeries::new(
                [(s.median, y - 0.3), (s.median, y + 0.3)],
                colour.stroke_width(3),
            ))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("median {:.0} {unit}", s.median),
                (s.median, y - 0.32),
                ("sans-serif", 13).into_font().color(&BLACK),
            )))?;
        }
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("drawing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, values: Vec<f64>) -> Series {
        Series::new("s", name, "ms", values).expect("samples")
    }

    #[test]
    fn every_series_is_a_labelled_row_with_a_dot_per_sample() {
        let dir = std::env::temp_dir().join(format!("pangolin-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("cold.svg");
        let a = series("pangolin-template", vec![900.0, 950.0, 1000.0]);
        let b = series("runc", vec![150.0, 160.0]);
        distributions(&path, "cold start", &[&a, &b]).expect("plot");
        let svg = std::fs::read_to_string(&path).expect("svg");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.contains("pangolin-template (n=3)"), "no label");
        assert!(svg.contains("runc (n=2)"), "no label");
        assert!(svg.contains("median 950 ms"), "no median");
        assert_eq!(svg.matches("<circle").count(), 5, "a dot per sample");
    }
}
