//! What the sections' tests share: a minimal valid config and the key an invalid one is
//! refused for.

use super::{ConfigError, PairConfig};

/// The smallest valid config: every other key has a default.
pub(crate) const MINIMAL: &str = r#"
        name = "vm1"
        [primary]
        qmp = "unix:/run/colo/vm1/primary.qmp"
        host = "192.168.77.1"
        [secondary]
        qmp = "unix:/run/colo/vm1/secondary.qmp"
        host = "192.168.77.2"
        [migration]
        secondary_incoming = "tcp:192.168.77.2:9998"
    "#;

pub(crate) fn parse(text: &str) -> Result<PairConfig, ConfigError> {
    PairConfig::from_toml(text, "test.toml")
}

/// The key a refused config is refused for (the whole message when the
/// error has no key, e.g. a TOML syntax error).
pub(super) fn error_key(text: &str) -> String {
    let err = parse(text).expect_err("config should be refused");
    let msg = err.to_string();
    assert!(msg.starts_with("test.toml: "), "{msg}");
    err.key().map(str::to_string).unwrap_or(msg)
}
