//! [`Text`]: writes the Prometheus text exposition format.

use std::fmt::Write as _;

/// Exposition text under construction.
#[derive(Debug, Default)]
pub struct Text(String);

impl Text {
    /// The `# HELP` and `# TYPE` lines of a family (`kind`: `counter`, `gauge`, `histogram`).
    pub fn header(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, help: &str, kind: &str, value: u64) {
        self.header(name, help, kind);
        self.sample(name, &[], value);
    }

    /// An integer sample.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.line(name, labels, &value.to_string());
    }

    /// A sample with its value already formatted (a float, `+Inf`).
    pub fn line(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// The text.
    pub fn finish(self) -> String {
        self.0
    }
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text escapes backslash and newline.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_help_are_escaped() {
        let mut t = Text::default();
        t.header("m", "a\\b\nc", "gauge");
        t.sample("m", &[("export", "x\"y\\z\nw"), ("k", "v")], 7);
        assert_eq!(
            t.finish(),
            "# HELP m a\\\\b\\nc\n# TYPE m gauge\nm{export=\"x\\\"y\\\\z\\nw\",k=\"v\"} 7\n"
        );
    }
}
