//! [`Role`]: which VM of the pair, or which host's daemon.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which VM of a COLO pair: the one name for "side", "survivor" and "role".
///
/// Written `primary` or `secondary` everywhere (config files, command lines, the control
/// protocol's JSON, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Role {
    /// The primary VM (PVM): its output goes to the clients.
    Primary,
    /// The secondary VM (SVM): the hot standby.
    Secondary,
}

impl Role {
    /// `primary` or `secondary`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }

    /// The other VM.
    pub fn other(self) -> Role {
        match self {
            Role::Primary => Role::Secondary,
            Role::Secondary => Role::Primary,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that is neither `primary` nor `secondary`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid role {0:?}: expected primary or secondary")]
pub struct RoleError(pub String);

impl FromStr for Role {
    type Err = RoleError;

    fn from_str(s: &str) -> Result<Role, RoleError> {
        match s {
            "primary" => Ok(Role::Primary),
            "secondary" => Ok(Role::Secondary),
            _ => Err(RoleError(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_serialize_the_same() {
        for role in [Role::Primary, Role::Secondary] {
            assert_eq!(role.name().parse::<Role>(), Ok(role));
            assert_eq!(role.other().other(), role);
            assert_ne!(role.other(), role);
            assert_eq!(serde_json::to_string(&role).unwrap(), format!("\"{role}\""));
        }
        assert!(
            "Primary"
                .parse::<Role>()
                .unwrap_err()
                .to_string()
                .contains("expected primary")
        );
    }
}
