//! The top level: `name`, the pair's name.

use super::field::{At, FieldError, Problem, required};

/// Validates `name`: it names files (`/etc/colo/<name>.toml`, sockets, logs), so letters,
/// digits, `-`, `.` and `_` only.
pub(super) fn validate(raw: Option<String>) -> Result<String, FieldError> {
    let name = required(raw, "the pair's name, e.g. \"vm1\"").at("name")?;
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-._".contains(ch));
    if !ok {
        return Err(Problem::NotPairName(name)).at("name");
    }
    Ok(name)
}
