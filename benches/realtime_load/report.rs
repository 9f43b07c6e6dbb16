//! Histograms (in microseconds) as they travel between processes, and the figures'
//! tables.

use std::time::SystemTime;

use hdrhistogram::Histogram;

/// Now, in microseconds since the Unix epoch: every process reads the same clock.
pub(crate) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// 1 µs to 10 min at three significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// `hist <name> <value>:<count> ...`
pub(crate) fn histogram_line(name: &str, h: &Histogram<u64>) -> String {
    let mut line = format!("hist {name}");
    for v in h.iter_recorded() {
        line.push_str(&format!(
            " {}:{}",
            v.value_iterated_to(),
            v.count_at_value()
        ));
    }
    line
}

/// Adds what a `hist` line (without its `hist <name>` prefix) holds to `into`.
pub(crate) fn merge_line(into: &mut Histogram<u64>, pairs: &str) {
    for pair in pairs.split_whitespace() {
        if let Some((v, c)) = pair.split_once(':')
            && let (Ok(v), Ok(c)) = (v.parse::<u64>(), c.parse::<u64>())
        {
            let _ = into.record_n(v.max(1), c);
        }
    }
}

/// p50 / p99 / max in milliseconds, or a dash when empty.
pub(crate) fn ms_summary(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "-".to_owned();
    }
    format!(
        "{} / {} / {}",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    )
}

/// Microseconds as milliseconds, with precision where it matters.
pub(crate) fn ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// A whole number with thousands separators.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A plain-text table with a header row, columns padded to their widest cell.
#[derive(Debug)]
pub(crate) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn print(&self, title: &str) {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let padded: Vec<String> = (0..columns)
                .map(|i| {
                    let cell = cells.get(i).map(String::as_str).unwrap_or("");
                    format!("{cell:<width$}", width = widths[i])
                })
                .collect();
            format!("| {} |", padded.join(" | "))
        };
        println!("\n{title}");
        println!("{}", line(&self.header));
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        println!("|-{}-|", rule.join("-|-"));
        for row in &self.rows {
            println!("{}", line(row));
        }
    }
}
