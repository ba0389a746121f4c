//! The operator's equivalence rules (`--equivalent`): which TCP connections may differ
//! between the VMs in which bytes, without a checkpoint. `docs/equivalence.md` says when that
//! is safe and what a rule must never cover.
//!
//! A rule is `tcp:PORT FORM` or `tcp:ADDRESS:PORT FORM` (an IPv6 address in brackets), where
//! the port and address are the guest's end of the connection (a web server in the guest:
//! its port 80), and `FORM` is one of
//!
//! - `header NAME`: an HTTP header line `NAME: ` whose value is a 29-byte IMF-fixdate
//!   (`Date: Sun, 06 Nov 1994 08:49:37 GMT`) followed by CRLF;
//! - `prefix "TEXT" len N suffix "TEXT"`: N bytes of printable ASCII between the two texts
//!   (escapes `\r`, `\n`, `\t`, `\\`, `\"`, `\xHH`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use crate::compare::{MAX_VALUE_LEN, Pattern, ValueByte};
use crate::packet::FlowKey;

/// One `--equivalent` rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EquivalenceRule {
    /// The rule as the operator wrote it (whitespace normalized): the metrics' label.
    text: String,
    /// The guest's address, if the rule names one.
    address: Option<IpAddr>,
    /// The guest's TCP port.
    port: u16,
    pattern: Arc<Pattern>,
}

impl EquivalenceRule {
    /// Whether the rule covers the connection whose VM output has this key (the guest is its
    /// source).
    pub fn matches(&self, flow: &FlowKey) -> bool {
        flow.protocol == 6
            && flow.src_port == self.port
            && self.address.is_none_or(|a| a == flow.src)
    }

    /// The rule's text, as the metrics label it.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The pattern whose value may differ.
    pub fn pattern(&self) -> &Arc<Pattern> {
        &self.pattern
    }
}

impl fmt::Display for EquivalenceRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for EquivalenceRule {
    type Err = String;

    fn from_str(rule: &str) -> Result<Self, String> {
        let mut words = Words { rest: rule.trim() };
        let flow = words
            .word()
            .ok_or("an empty rule (expected `tcp:PORT header Date` or similar)")?;
        let (address, port) = parse_flow(flow)?;
        let pattern = match words.word() {
            Some("header") => {
                let name = words.word().ok_or("`header` needs a header name")?;
                Pattern::http_date_header(name)?
            }
            Some("prefix") => {
                let prefix = words.string()?;
                words.keyword("len")?;
                let len = words.word().ok_or("`len` needs a number")?;
                let len: usize = len.parse().map_err(|_| format!("len {len:?}"))?;
                // Checked before the value is allocated: `Pattern::new` would refuse it, but
                // only after `vec![..; len]` aborted the process on a huge `len`.
                if len > MAX_VALUE_LEN {
                    return Err(format!(
                        "len {len}: the value must be 1 to {MAX_VALUE_LEN} bytes long"
                    ));
                }
                words.keyword("suffix")?;
                let suffix = words.string()?;
                Pattern::new(&prefix, vec![ValueByte::Printable; len], &suffix)?
            }
            Some(other) => return Err(format!("{other:?}: expected `header` or `prefix`")),
            None => return Err("the flow needs a pattern: `header NAME` or `prefix ...`".into()),
        };
        if let Some(extra) = words.word() {
            return Err(format!("unexpected {extra:?} at the end"));
        }
        Ok(EquivalenceRule {
            text: rule.split_whitespace().collect::<Vec<_>>().join(" "),
            address,
            port,
            pattern: Arc::new(pattern),
        })
    }
}

/// `tcp:PORT`, `tcp:ADDRESS:PORT`, `tcp:[IPV6]:PORT`.
fn parse_flow(flow: &str) -> Result<(Option<IpAddr>, u16), String> {
    let rest = flow.strip_prefix("tcp:").ok_or_else(|| {
        format!("{flow:?}: a rule names a TCP flow, `tcp:PORT` or `tcp:ADDRESS:PORT`")
    })?;
    let (address, port) = match rest.rsplit_once(':') {
        None => (None, rest),
        Some((address, port)) => {
            let address = address
                .strip_prefix('[')
                .and_then(|a| a.strip_suffix(']'))
                .unwrap_or(address);
            let address: IpAddr = address
                .parse()
                .map_err(|e| format!("address {address:?}: {e}"))?;
            (Some(address), port)
        }
    };
    let port: u16 = port.parse().map_err(|e| format!("port {port:?}: {e}"))?;
    if port == 0 {
        return Err("port 0".into());
    }
    Ok((address, port))
}

/// The words of a rule; a quoted string is one word.
struct Words<'a> {
    rest: &'a str,
}

impl<'a> Words<'a> {
    fn word(&mut self) -> Option<&'a str> {
        let rest = self.rest.trim_start();
        if rest.is_empty() {
            self.rest = rest;
            return None;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (word, tail) = rest.split_at(end);
        self.rest = tail;
        Some(word)
    }

    fn keyword(&mut self, keyword: &str) -> Result<(), String> {
        match self.word() {
            Some(w) if w == keyword => Ok(()),
            Some(w) => Err(format!("expected `{keyword}`, found {w:?}")),
            None => Err(format!("expected `{keyword}`")),
        }
    }

    /// A double-quoted string with escapes, as bytes.
    fn string(&mut self) -> Result<Vec<u8>, String> {
        let rest = self.rest.trim_start();
        let mut chars = rest
            .strip_prefix('"')
            .ok_or("expected a double-quoted string")?
            .char_indices();
        let mut out = Vec::new();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.rest = &rest[1 + i + 1..];
                    return Ok(out);
                }
                '\\' => {
                    let escape = match chars.next().map(|(_, c)| c) {
                        Some('r') => b'\r',
                        Some('n') => b'\n',
                        Some('t') => b'\t',
                        Some('\\') => b'\\',
                        Some('"') => b'"',
                        Some('x') => {
                            let hex: String = (0..2)
                                .filter_map(|_| chars.next())
                                .map(|(_, c)| c)
                                .collect();
                            u8::from_str_radix(&hex, 16)
                                .map_err(|_| format!("\\x{hex}: expected two hex digits"))?
                        }
                        Some(other) => return Err(format!("unknown escape \\{other}")),
                        None => return Err("a string ends in a backslash".into()),
                    };
                    out.push(escape);
                }
                c => {
                    let mut buf = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        Err("a string is not closed".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::IMF_FIXDATE_LEN;

    fn flow(src: &str, src_port: u16) -> FlowKey {
        FlowKey {
            protocol: 6,
            src: src.parse().unwrap(),
            src_port,
            dst: "10.0.0.9".parse().unwrap(),
            dst_port: 40000,
        }
    }

    #[test]
    fn the_header_shortcut_is_a_date_line() {
        let rule: EquivalenceRule = "  tcp:80   header Date ".parse().unwrap();
        assert_eq!(rule.text(), "tcp:80 header Date");
        assert_eq!(rule.pattern().prefix(), b"\r\nDate: ");
        assert_eq!(rule.pattern().value_len(), IMF_FIXDATE_LEN);
        assert_eq!(rule.pattern().suffix(), b"\r\n");
        assert!(rule.matches(&flow("10.0.0.2", 80)));
        assert!(!rule.matches(&flow("10.0.0.2", 8080)));
        // The guest's end only: the guest as a client of someone's port 80 is not covered.
        assert!(!rule.matches(&flow("10.0.0.2", 80).reversed()));
    }

    #[test]
    fn the_general_form_takes_escapes_and_an_address() {
        let rule: EquivalenceRule =
            r#"tcp:[fe80::2]:8080 prefix "\r\nX-Time: " len 10 suffix "\r\n""#
                .parse()
                .unwrap();
        assert_eq!(rule.pattern().prefix(), b"\r\nX-Time: ");
        assert_eq!(rule.pattern().value_len(), 10);
        assert!(rule.matches(&flow("fe80::2", 8080)));
        assert!(!rule.matches(&flow("fe80::3", 8080)));
        let v4: EquivalenceRule = r#"tcp:10.0.0.2:81 prefix "t=\x01\x02" len 4 suffix ";""#
            .parse()
            .unwrap();
        assert_eq!(v4.pattern().prefix(), b"t=\x01\x02");
        assert!(v4.matches(&flow("10.0.0.2", 81)));
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        for bad in [
            "",
            "udp:53 header Date",
            "tcp:http header Date",
            "tcp:0 header Date",
            "tcp:80",
            "tcp:80 header",
            "tcp:80 header Da:te",
            "tcp:80 header Date extra",
            "tcp:80 cookie x",
            r#"tcp:80 prefix "ab" len 4 suffix ";""#,
            r#"tcp:80 prefix "abcd" len 0 suffix ";""#,
            r#"tcp:80 prefix "abcd" len 65 suffix ";""#,
            r#"tcp:80 prefix "abcd" len 4 suffix """#,
            r#"tcp:80 prefix "abcd len 4 suffix ";""#,
            r#"tcp:80 prefix "abcd" size 4 suffix ";""#,
            r#"tcp:80 prefix "ab\qd" len 4 suffix ";""#,
            // Found by the equivalence_scan fuzz target: these aborted (allocation failure) or
            // panicked (capacity overflow) before being refused.
            r#"tcp:80 prefix "abcd" len 619999999999999 suffix ";""#,
            r#"tcp:80 prefix "abcd" len 18446744073709551615 suffix ";""#,
        ] {
            assert!(
                bad.parse::<EquivalenceRule>().is_err(),
                "{bad:?} was accepted"
            );
        }
    }
}
