//! A parser for the Prometheus text exposition format (version 0.0.4, what tickgate's
//! `/metrics` serves): the one that `tickgate load` reads a server's numbers with and the
//! integration tests read counters with, so that both read the format the same way.
//!
//! It reads samples, `name{label="value",...} value [timestamp]`; comment lines (`# HELP`,
//! `# TYPE` and any other `#` line) and blank lines are skipped. Label values may hold the
//! format's escapes (`\\`, `\"`, `\n`); values may be `+Inf`, `-Inf` and `NaN`. A line that
//! is not one of these is an error naming the line, never a panic.

use std::fmt;
use std::str::FromStr;

/// A series: a metric name and its labels, in the order they were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    /// The metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
    pub name: String,
    /// The labels, unescaped, in the order they were written.
    pub labels: Vec<(String, String)>,
}

impl Series {
    /// The value of label `name`, if the series has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Whether `other` names the same series: the same name and the same set of labels,
    /// whatever their order.
    pub fn same_as(&self, other: &Series) -> bool {
        self.name == other.name
            && self.labels.len() == other.labels.len()
            && self.labels.iter().all(|(k, v)| other.label(k) == Some(v.as_str()))
    }
}

impl FromStr for Series {
    type Err = ParseError;

    /// Parses a series as the exposition writes it: `name` or `name{label="value",...}`.
    fn from_str(s: &str) -> Result<Series, ParseError> {
        let mut c = Cursor { rest: s, line: 1 };
        let series = c.series()?;
        c.skip_blanks();
        c.end()?;
        Ok(series)
    }
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Which series the value belongs to.
    pub series: Series,
    /// The value (may be infinite or NaN).
    pub value: f64,
    /// The optional timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
}

/// Every sample of one exposition, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    /// The samples, in the order they were written.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Parses a whole exposition; the first line that is neither a sample, a comment nor
    /// blank is the error.
    pub fn parse(text: &str) -> Result<Exposition, ParseError> {
        let mut samples = Vec::new();
        for (i, raw) in text.split('\n').enumerate() {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            let trimmed = line.trim_start_matches([' ', '\t']);
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let mut c = Cursor { rest: trimmed, line: i + 1 };
            samples.push(c.sample()?);
        }
        Ok(Exposition { samples })
    }

    /// The value of the sample of exactly `series` (same name, same label set), if any.
    pub fn value(&self, series: &Series) -> Option<f64> {
        self.samples.iter().find(|s| s.series.same_as(series)).map(|s| s.value)
    }

    /// The sum over every series named `name` (all label sets), or `None` when there is none.
    pub fn sum(&self, name: &str) -> Option<f64> {
        self.samples.iter().filter(|s| s.series.name == name).map(|s| s.value).reduce(|a, b| a + b)
    }
}

/// Why a line is not valid exposition text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct ParseError {
    /// The line (from 1).
    pub line: usize,
    /// What is wrong with it.
    pub kind: ParseErrorKind,
}

/// What is wrong with a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    /// No valid metric name where one must start.
    #[error("expected a metric name at {0:?}")]
    MetricName(String),
    /// No valid label name where one must start.
    #[error("expected a label name at {0:?}")]
    LabelName(String),
    /// A required character is missing.
    #[error("expected {want:?} at {at:?}")]
    Expected {
        /// The character the format requires here.
        want: char,
        /// What stands there instead.
        at: String,
    },
    /// A label value without its closing quote.
    #[error("unterminated label value")]
    UnterminatedValue,
    /// A backslash followed by something other than `\`, `"` or `n`.
    #[error("invalid escape \\{0} in a label value")]
    Escape(char),
    /// The same label twice in one series.
    #[error("label {0:?} given twice")]
    DuplicateLabel(String),
    /// The value is not a float (nor `+Inf`, `-Inf`, `NaN`).
    #[error("invalid value {0:?}")]
    Value(String),
    /// The timestamp is not an integer.
    #[error("invalid timestamp {0:?}")]
    Timestamp(String),
    /// Something after the value and timestamp.
    #[error("unexpected {0:?} after the sample")]
    Trailing(String),
}

/// Reads one line left to right.
struct Cursor<'a> {
    rest: &'a str,
    line: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, kind: ParseErrorKind) -> ParseError {
        ParseError { line: self.line, kind }
    }

    fn skip_blanks(&mut self) {
        self.rest = self.rest.trim_start_matches([' ', '\t']);
    }

    fn end(&self) -> Result<(), ParseError> {
        match self.rest.is_empty() {
            true => Ok(()),
            false => Err(self.err(ParseErrorKind::Trailing(self.rest.to_owned()))),
        }
    }

    fn eat(&mut self, want: char) -> bool {
        match self.rest.strip_prefix(want) {
            Some(r) => {
                self.rest = r;
                true
            }
            None => false,
        }
    }

    fn expect(&mut self, want: char) -> Result<(), ParseError> {
        match self.eat(want) {
            true => Ok(()),
            false => Err(self.err(ParseErrorKind::Expected { want, at: self.rest.to_owned() })),
        }
    }

    /// The longest prefix of name characters, if it starts with a valid first character.
    fn ident(&mut self, colons: bool) -> Option<&'a str> {
        let ok = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || (colons && ch == ':');
        let first = self.rest.chars().next()?;
        if first.is_ascii_digit() || !ok(first) {
            return None;
        }
        let len = self.rest.find(|ch: char| !ok(ch)).unwrap_or(self.rest.len());
        let (name, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(name)
    }

    fn series(&mut self) -> Result<Series, ParseError> {
        let name = self.ident(true).ok_or_else(|| self.err(ParseErrorKind::MetricName(self.rest.to_owned())))?;
        let mut series = Series { name: name.to_owned(), labels: Vec::new() };
        self.skip_blanks();
        if !self.eat('{') {
            return Ok(series);
        }
        loop {
            self.skip_blanks();
            // `}` may follow `{` or a trailing comma.
            if self.eat('}') {
                return Ok(series);
            }
            let key = self.ident(false).ok_or_else(|| self.err(ParseErrorKind::LabelName(self.rest.to_owned())))?;
            self.skip_blanks();
            self.expect('=')?;
            self.skip_blanks();
            self.expect('"')?;
            let value = self.label_value()?;
            if series.label(key).is_some() {
                return Err(self.err(ParseErrorKind::DuplicateLabel(key.to_owned())));
            }
            series.labels.push((key.to_owned(), value));
            self.skip_blanks();
            if !self.eat(',') {
                self.skip_blanks();
                self.expect('}')?;
                return Ok(series);
            }
        }
    }

    /// The rest of a label value after its opening quote, unescaped; consumes the closing quote.
    fn label_value(&mut self) -> Result<String, ParseError> {
        let mut out = String::new();
        let mut chars = self.rest.char_indices();
        while let Some((i, ch)) = chars.next() {
            match ch {
                '"' => {
                    self.rest = &self.rest[i + 1..];
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, '"')) => out.push('"'),
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, other)) => return Err(self.err(ParseErrorKind::Escape(other))),
                    None => break,
                },
                _ => out.push(ch),
            }
        }
        Err(self.err(ParseErrorKind::UnterminatedValue))
    }

    fn word(&mut self) -> &'a str {
        let len = self.rest.find([' ', '\t']).unwrap_or(self.rest.len());
        let (w, rest) = self.rest.split_at(len);
        self.rest = rest;
        w
    }

    fn sample(&mut self) -> Result<Sample, ParseError> {
        let series = self.series()?;
        self.skip_blanks();
        let v = self.word();
        let value = parse_value(v).ok_or_else(|| self.err(ParseErrorKind::Value(v.to_owned())))?;
        self.skip_blanks();
        let timestamp_ms = match self.word() {
            "" => None,
            t => Some(t.parse::<i64>().map_err(|_| self.err(ParseErrorKind::Timestamp(t.to_owned())))?),
        };
        self.skip_blanks();
        self.end()?;
        Ok(Sample { series, value, timestamp_ms })
    }
}

/// A sample value: a float as Go's `ParseFloat` reads it, which covers the format's
/// `+Inf`, `-Inf` and `NaN`.
fn parse_value(v: &str) -> Option<f64> {
    // Rust's parser also takes "infinity" and "inf" in any case, as Go's does; it refuses
    // the empty string, so a missing value is an error.
    v.parse::<f64>().ok()
}

impl fmt::Display for Series {
    /// Writes the series as the exposition does: `name{label="value",...}`, escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if self.labels.is_empty() {
            return Ok(());
        }
        f.write_str("{")?;
        for (i, (k, v)) in self.labels.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(s: &str) -> Series {
        s.parse().expect("a series")
    }

    #[test]
    fn samples_comments_and_blank_lines() {
        let text = "# HELP tickgate_frames_sent_total Frames.\n# TYPE tickgate_frames_sent_total counter\n\
                    tickgate_frames_sent_total 12\n\n# a comment of no kind\n  up 1 1700000000000\n";
        let e = Exposition::parse(text).expect("valid");
        assert_eq!(e.samples.len(), 2);
        assert_eq!(
            e.samples[0],
            Sample { series: series("tickgate_frames_sent_total"), value: 12.0, timestamp_ms: None }
        );
        assert_eq!(e.samples[1].timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(e.value(&series("up")), Some(1.0));
        assert_eq!(e.value(&series("down")), None);
    }

    #[test]
    fn labels_with_escaped_quotes_backslashes_and_newlines() {
        let text = "m{path=\"a \\\"quoted\\\" {x} ,y\",dir=\"C:\\\\tmp\",msg=\"two\\nlines\"} 3\n";
        let e = Exposition::parse(text).expect("valid");
        let s = &e.samples[0].series;
        assert_eq!(s.label("path"), Some("a \"quoted\" {x} ,y"));
        assert_eq!(s.label("dir"), Some("C:\\tmp"));
        assert_eq!(s.label("msg"), Some("two\nlines"));
        // Written back, it reads the same.
        assert_eq!(series(&s.to_string()), *s);
        assert!(text.starts_with(&s.to_string()));
    }

    #[test]
    fn infinities_and_nan() {
        let text = "h_bucket{le=\"+Inf\"} +Inf\nneg -Inf\nq{quantile=\"0.5\"} NaN\nsci 1.5e3\n";
        let e = Exposition::parse(text).expect("valid");
        assert_eq!(e.value(&series("h_bucket{le=\"+Inf\"}")), Some(f64::INFINITY));
        assert_eq!(e.value(&series("neg")), Some(f64::NEG_INFINITY));
        assert!(e.value(&series("q{quantile=\"0.5\"}")).is_some_and(f64::is_nan));
        assert_eq!(e.value(&series("sci")), Some(1500.0));
    }

    #[test]
    fn lookups_by_label_set_and_sums_over_labels() {
        let text = "c{feed=\"T\",kind=\"a\"} 2\nc{feed=\"OTHER\",kind=\"a\"} 3\nc_other 100\n";
        let e = Exposition::parse(text).expect("valid");
        // Label order does not matter; a subset is not the series.
        assert_eq!(e.value(&series("c{kind=\"a\",feed=\"T\"}")), Some(2.0));
        assert_eq!(e.value(&series("c{feed=\"T\"}")), None);
        assert_eq!(e.sum("c"), Some(5.0));
        assert_eq!(e.sum("missing"), None);
    }

    #[test]
    fn blanks_inside_series_and_a_trailing_comma() {
        let e = Exposition::parse("m { a = \"1\" , b=\"2\", } \t 7\nn{} 1\n").expect("valid");
        assert_eq!(e.value(&series("m{a=\"1\",b=\"2\"}")), Some(7.0));
        assert_eq!(e.value(&series("n")), Some(1.0));
    }

    #[test]
    fn bad_lines_are_errors_naming_the_line() {
        let cases: [(&str, ParseErrorKind); 10] = [
            ("9m 1", ParseErrorKind::MetricName("9m 1".into())),
            ("m{9=\"x\"} 1", ParseErrorKind::LabelName("9=\"x\"} 1".into())),
            ("m{a\"x\"} 1", ParseErrorKind::Expected { want: '=', at: "\"x\"} 1".into() }),
            ("m{a=x} 1", ParseErrorKind::Expected { want: '"', at: "x} 1".into() }),
            ("m{a=\"x} 1", ParseErrorKind::UnterminatedValue),
            ("m{a=\"\\t\"} 1", ParseErrorKind::Escape('t')),
            ("m{a=\"1\",a=\"2\"} 1", ParseErrorKind::DuplicateLabel("a".into())),
            ("m", ParseErrorKind::Value(String::new())),
            ("m one", ParseErrorKind::Value("one".into())),
            ("m 1 2.5", ParseErrorKind::Timestamp("2.5".into())),
        ];
        for (line, kind) in cases {
            let text = format!("# TYPE m gauge\n{line}\n");
            assert_eq!(Exposition::parse(&text), Err(ParseError { line: 2, kind }), "{line}");
        }
        assert_eq!(Exposition::parse("m 1 2 3").map_err(|e| e.kind), Err(ParseErrorKind::Trailing("3".into())));
        assert!("m{a=\"1\"} x".parse::<Series>().is_err(), "a selector has no value");
        assert!("m{a=\"1\"".parse::<Series>().is_err());
    }

    #[test]
    fn real_exposition_of_the_prometheus_crate_shapes() {
        let text = "# HELP tickgate_http_timeouts_total Requests cut.\n# TYPE tickgate_http_timeouts_total counter\n\
            tickgate_http_timeouts_total{listener=\"admin\",stage=\"body\"} 1\n\
            tickgate_http_timeouts_total{listener=\"public\",stage=\"body\"} 0\n\
            # TYPE lat histogram\nlat_bucket{le=\"0.005\"} 0\nlat_bucket{le=\"+Inf\"} 4\nlat_sum 0.25\nlat_count 4\n";
        let e = Exposition::parse(text).expect("valid");
        assert_eq!(e.value(&series("tickgate_http_timeouts_total{listener=\"admin\",stage=\"body\"}")), Some(1.0));
        assert_eq!(e.sum("tickgate_http_timeouts_total"), Some(1.0));
        assert_eq!(e.value(&series("lat_bucket{le=\"+Inf\"}")), Some(4.0));
        assert_eq!(e.sum("lat_count"), Some(4.0));
    }
}
