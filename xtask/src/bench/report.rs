//! What one `cargo xtask bench` run measured: each figure is printed as it is taken (median,
//! min, max) and kept, so that `--json FILE` writes all of them and `--plot DIR` draws the
//! cold-start distributions.

use serde::Serialize;

/// A series of samples of one quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// The section it belongs to (e.g. "nested-ctr").
    pub section: String,
    /// What was measured (e.g. "pangolin-template").
    pub name: String,
    /// "ms", "MiB", "MiB/s".
    pub unit: &'static str,
    /// The samples, in the order they were taken.
    pub values: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Series {
    /// `values` of `name` with their median, min and max; None when there are none.
    pub fn new(section: &str, name: &str, unit: &'static str, values: Vec<f64>) -> Option<Series> {
        if values.is_empty() {
            return None;
        }
        Some(Series {
            section: section.into(),
            name: name.into(),
            unit,
            median: median(&values),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            values,
        })
    }
}

/// A ratio of two medians and the target it is held against.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub section: String,
    pub name: String,
    pub value: f64,
    /// The target as an upper bound (`value <= target` meets it).
    pub target_at_most: Option<f64>,
    pub met: Option<bool>,
}

/// A figure that is one number (e.g. the slowest of ten pods).
#[derive(Debug, Clone, Serialize)]
pub struct Single {
    pub section: String,
    pub name: String,
    pub unit: &'static str,
    pub value: f64,
    pub target_at_most: Option<f64>,
}

/// Everything a run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// What ran where (backends, host KVM), one line per section.
    pub notes: Vec<String>,
    pub series: Vec<Series>,
    pub ratios: Vec<Ratio>,
    pub singles: Vec<Single>,
}

/// The median (upper median for an even count) of `values`, which need not be sorted.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

impl Report {
    /// Prints a section heading and keeps it as a note.
    pub fn heading(&mut self, text: impl Into<String>) {
        let text = text.into();
        println!();
        println!("{text}");
        self.notes.push(text);
    }

    /// Records and prints a series (label as printed); returns its median. An empty series is
    /// printed as such and not kept.
    pub fn series(
        &mut self,
        section: &str,
        name: &str,
        unit: &'static str,
        values: Vec<f64>,
    ) -> Option<f64> {
        let Some(series) = Series::new(section, name, unit, values) else {
            println!("{name:<36} no samples");
            return None;
        };
        let (median, min, max) = (series.median, series.min, series.max);
        println!("{name:<36} median {median:>8.1} {unit:<5} min {min:>8.1} {unit:<5} max {max:>8.1} {unit}");
        self.series.push(series);
        Some(median)
    }

    /// Records and prints `value` (a ratio of medians) and whether it meets `target_at_most`.
    pub fn ratio(&mut self, section: &str, name: &str, value: f64, target_at_most: Option<f64>) {
        let met = target_at_most.map(|t| value <= t);
        let verdict = match (target_at_most, met) {
            (Some(t), Some(true)) => format!(" (target <= {t}x: met)"),
            (Some(t), _) => format!(" (target <= {t}x: not met)"),
            _ => String::new(),
        };
        println!("{name:<36} {value:>8.2}x{verdict}");
        self.ratios.push(Ratio {
            section: section.into(),
            name: name.into(),
            value,
            target_at_most,
            met,
        });
    }

    /// Records and prints a single figure.
    pub fn single(
        &mut self,
        section: &str,
        name: &str,
        unit: &'static str,
        value: f64,
        target_at_most: Option<f64>,
    ) {
        let target = match target_at_most {
            Some(t) if value <= t => format!(" (target <= {t} {unit}: met)"),
            Some(t) => format!(" (target <= {t} {unit}: not met)"),
            None => String::new(),
        };
        println!("{name:<36} {value:>8.1} {unit}{target}");
        self.singles.push(Single {
            section: section.into(),
            name: name.into(),
            unit,
            value,
            target_at_most,
        });
    }

    /// The series `name` of `section`, if one was taken.
    pub fn find(&self, section: &str, name: &str) -> Option<&Series> {
        self.series
            .iter()
            .find(|s| s.section == section && s.name == name)
    }

    /// The whole report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle_and_the_upper_one_of_an_even_count() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn every_figure_is_in_the_json_with_its_target() {
        let mut r = Report::default();
        r.heading("nested");
        assert_eq!(
            r.series("nested", "cold", "ms", vec![30.0, 10.0, 20.0]),
            Some(20.0)
        );
        assert_eq!(r.series("nested", "empty", "ms", vec![]), None);
        r.ratio("nested", "template/cold", 0.67, Some(0.15));
        r.single("par", "all ready", "ms", 17.4, None);
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["series"].as_array().map(Vec::len), Some(1));
        assert_eq!(json["series"][0]["values"][1], 10.0);
        assert_eq!(json["series"][0]["min"], 10.0);
        assert_eq!(json["ratios"][0]["met"], false);
        assert_eq!(json["ratios"][0]["target_at_most"], 0.15);
        assert_eq!(json["singles"][0]["value"], 17.4);
        assert_eq!(json["notes"][0], "nested");
        assert!(r.find("nested", "cold").is_some());
    }
}
