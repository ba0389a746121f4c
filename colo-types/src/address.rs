//! [`Address`]: where a socket is, for every socket colo opens or listens on.
//!
//! One type for the relay's migration listener and target, the QMP monitors, the relay's control
//! protocol, the daemons' peers. It is written like QEMU's migration URIs (`unix:PATH`,
//! `tcp:HOST:PORT`), so the same string configures QEMU and colo.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A Unix-socket or TCP address.
///
/// Written `unix:PATH`, `tcp:HOST:PORT` (an IPv6 host in brackets:
/// `tcp:[fd00::2]:7010`) or a bare absolute path (a Unix socket, as the
/// `--control PATH` options took before TCP). QEMU's socket options
/// (`,nodelay=on`) are not part of an address.
/// [`fmt::Display`] writes the `unix:`/`tcp:` form, which parses back to the
/// same address.
///
/// ```
/// use colo_types::Address;
///
/// let tcp: Address = "tcp:192.168.77.2:7010".parse().unwrap();
/// assert_eq!(tcp, Address::tcp("192.168.77.2", 7010));
/// let unix: Address = "/run/colo/relay.sock".parse().unwrap();
/// assert_eq!(unix.to_string(), "unix:/run/colo/relay.sock");
/// assert!("192.168.77.2:7010".parse::<Address>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Address {
    /// A Unix stream socket (a daemon or QEMU on this host).
    Unix(PathBuf),
    /// A TCP address (usually the other host, over the replication link).
    Tcp {
        /// Host name or IP address, without brackets.
        host: String,
        /// TCP port.
        port: u16,
    },
}

/// A string that is not a [`Address`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address {input:?}: {reason}")]
pub struct AddressError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The accepted forms, for error messages and help texts.
pub const ADDRESS_FORMS: &str = "unix:PATH, tcp:HOST:PORT or an absolute path";

impl Address {
    /// A Unix socket address.
    pub fn unix(path: impl Into<PathBuf>) -> Address {
        Address::Unix(path.into())
    }

    /// A TCP address.
    pub fn tcp(host: impl Into<String>, port: u16) -> Address {
        Address::Tcp {
            host: host.into(),
            port,
        }
    }

    /// Parses `HOST:PORT` (without the `tcp:` prefix, which is accepted too),
    /// as a TCP listen or connect address is often written.
    pub fn parse_host_port(s: &str) -> Result<Address, AddressError> {
        let fail = |reason: &str| AddressError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let hp = s.strip_prefix("tcp:").unwrap_or(s);
        let (host, port) = hp
            .rsplit_once(':')
            .ok_or_else(|| fail("expected HOST:PORT"))?;
        let host = match host.strip_prefix('[') {
            Some(rest) => rest
                .strip_suffix(']')
                .ok_or_else(|| fail("an IPv6 host must be written [ADDR]"))?,
            None if host.contains(':') => {
                return Err(fail(
                    "an IPv6 host must be written in brackets: [ADDR]:PORT",
                ));
            }
            None => host,
        };
        if host.is_empty() {
            return Err(fail("the host is empty (HOST:PORT)"));
        }
        if host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(fail("the host contains a space or '/'"));
        }
        if port.contains(',') {
            return Err(fail(
                "QEMU socket options (,opt=...) are not part of an address",
            ));
        }
        let port = port.parse::<u16>().map_err(|_| {
            fail(&format!(
                "the port {port:?} is not a number from 0 to 65535"
            ))
        })?;
        Ok(Address::tcp(host, port))
    }

    /// The socket path of a Unix address.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            Address::Unix(p) => Some(p),
            Address::Tcp { .. } => None,
        }
    }

    /// `HOST:PORT` as `TcpStream::connect` takes a string and logs show a peer (an IPv6 host
    /// in brackets): what follows `tcp:` in the address's written form.
    pub fn host_port(host: &str, port: u16) -> String {
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }

    /// True for a TCP address.
    pub fn is_tcp(&self) -> bool {
        matches!(self, Address::Tcp { .. })
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Address, AddressError> {
        let fail = |reason: String| AddressError {
            input: s.to_string(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(fail("the path after unix: is empty".into()));
            }
            return Ok(Address::Unix(path.into()));
        }
        if s.starts_with("tcp:") {
            return Address::parse_host_port(s);
        }
        if s.starts_with('/') {
            return Ok(Address::Unix(s.into()));
        }
        if s.is_empty() {
            return Err(fail(format!("empty; expected {ADDRESS_FORMS}")));
        }
        let hint = if Address::parse_host_port(s).is_ok() {
            format!("expected {ADDRESS_FORMS}; for TCP write tcp:{s}")
        } else {
            format!("expected {ADDRESS_FORMS} (a relative path needs the unix: prefix)")
        };
        Err(fail(hint))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp { host, port } => write!(f, "tcp:{}", Address::host_port(host, *port)),
        }
    }
}

impl TryFrom<String> for Address {
    type Error = AddressError;

    fn try_from(s: String) -> Result<Address, AddressError> {
        s.parse()
    }
}

impl From<Address> for String {
    fn from(a: Address) -> String {
        a.to_string()
    }
}

// A path is a Unix socket, as every control address was before TCP: the
// client functions keep taking `&Path`/`PathBuf` unchanged. There is no
// `From<&str>`: a string is parsed (`"tcp:...".parse()`), never guessed.
impl From<PathBuf> for Address {
    fn from(p: PathBuf) -> Address {
        Address::Unix(p)
    }
}

impl From<&PathBuf> for Address {
    fn from(p: &PathBuf) -> Address {
        Address::Unix(p.clone())
    }
}

impl From<&Path> for Address {
    fn from(p: &Path) -> Address {
        Address::Unix(p.to_path_buf())
    }
}

impl From<std::net::SocketAddr> for Address {
    fn from(a: std::net::SocketAddr) -> Address {
        Address::tcp(a.ip().to_string(), a.port())
    }
}

impl From<&Address> for Address {
    fn from(a: &Address) -> Address {
        a.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_and_displays_back() {
        for (input, want, shown) in [
            (
                "unix:/run/colo/relay.sock",
                Address::unix("/run/colo/relay.sock"),
                "unix:/run/colo/relay.sock",
            ),
            (
                "unix:relay.sock",
                Address::unix("relay.sock"),
                "unix:relay.sock",
            ),
            (
                "/run/colo/relay.sock",
                Address::unix("/run/colo/relay.sock"),
                "unix:/run/colo/relay.sock",
            ),
            (
                "tcp:192.168.77.2:7010",
                Address::tcp("192.168.77.2", 7010),
                "tcp:192.168.77.2:7010",
            ),
            (
                "tcp:relay.example:7010",
                Address::tcp("relay.example", 7010),
                "tcp:relay.example:7010",
            ),
            (
                "tcp:[fd00::2]:7010",
                Address::tcp("fd00::2", 7010),
                "tcp:[fd00::2]:7010",
            ),
        ] {
            let a: Address = input.parse().unwrap();
            assert_eq!(a, want, "{input}");
            assert_eq!(a.to_string(), shown, "{input}");
            assert_eq!(shown.parse::<Address>().unwrap(), want, "{shown}");
        }
        assert_eq!(
            Address::parse_host_port("0.0.0.0:0").unwrap(),
            Address::tcp("0.0.0.0", 0)
        );
        assert_eq!(
            Address::parse_host_port("tcp:[::1]:9").unwrap(),
            Address::tcp("::1", 9)
        );
    }

    #[test]
    fn bad_strings_say_what_is_expected() {
        for (input, needle) in [
            ("", "empty"),
            ("unix:", "path after unix: is empty"),
            ("tcp:", "expected HOST:PORT"),
            ("tcp:7010", "expected HOST:PORT"),
            ("tcp::7010", "host is empty"),
            ("tcp:host:", "is not a number"),
            (
                "tcp:host:70000",
                "\"70000\" is not a number from 0 to 65535",
            ),
            ("tcp:fd00::2:7010", "brackets"),
            ("tcp:[fd00::2:7010", "[ADDR]"),
            ("192.168.77.2:7010", "write tcp:192.168.77.2:7010"),
            ("relay.sock", "a relative path needs the unix: prefix"),
            ("tcp:h:1,nodelay=on", "QEMU socket options"),
            (
                "udp:1.2.3.4:5",
                "unix:PATH, tcp:HOST:PORT or an absolute path",
            ),
        ] {
            let e = input.parse::<Address>().unwrap_err().to_string();
            assert!(e.contains(needle), "{input:?}: {e}");
            assert!(e.contains(&format!("{input:?}")), "{input:?}: {e}");
        }
    }

    #[test]
    fn paths_convert_to_unix_addresses() {
        let p = PathBuf::from("/run/r.sock");
        let want = Address::unix("/run/r.sock");
        assert_eq!(Address::from(p.as_path()), want);
        assert_eq!(Address::from(&p), want);
        assert_eq!(Address::from(p), want);
        assert_eq!(want.unix_path(), Some(Path::new("/run/r.sock")));
        assert!(!want.is_tcp() && Address::tcp("h", 1).is_tcp());
        assert_eq!(Address::host_port("::1", 9), "[::1]:9");
        assert_eq!(Address::host_port("h", 9), "h:9");
        let sock: std::net::SocketAddr = "[::1]:9".parse().unwrap();
        assert_eq!(Address::from(sock).to_string(), "tcp:[::1]:9");
    }

    #[test]
    fn serde_uses_the_string_form() {
        #[derive(Deserialize, Serialize, Debug, PartialEq)]
        struct File {
            control: Address,
        }
        let f: File = serde_json::from_str(r#"{"control":"tcp:10.0.0.2:7010"}"#).unwrap();
        assert_eq!(f.control, Address::tcp("10.0.0.2", 7010));
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"control":"tcp:10.0.0.2:7010"}"#
        );
        let e = serde_json::from_str::<File>(r#"{"control":"10.0.0.2:7010"}"#).unwrap_err();
        assert!(e.to_string().contains("tcp:10.0.0.2:7010"), "{e}");
    }
}
