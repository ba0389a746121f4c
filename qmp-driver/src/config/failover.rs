//! `[failover]`: the hooks run on the survivor's host at failover.

use super::field::{At, FieldError, hook};
use colo_types::Role;
use serde::Deserialize;

/// Hooks run at failover, on the survivor's host, through `sh -c`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FailoverConfig {
    /// After the secondary took over, before `announce-self` (e.g. put its
    /// tap on the bridge).
    pub secondary_takeover_hook: Option<String>,
    /// After the primary left COLO.
    pub primary_continue_hook: Option<String>,
}

impl FailoverConfig {
    /// The hook for the side that survives.
    pub fn hook_for(&self, survivor: Role) -> Option<&str> {
        match survivor {
            Role::Primary => self.primary_continue_hook.as_deref(),
            Role::Secondary => self.secondary_takeover_hook.as_deref(),
        }
    }
}

/// `[failover]` as written (both hooks optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFailover {
    secondary_takeover_hook: Option<String>,
    primary_continue_hook: Option<String>,
}

impl TryFrom<RawFailover> for FailoverConfig {
    type Error = FieldError;

    fn try_from(raw: RawFailover) -> Result<FailoverConfig, FieldError> {
        Ok(FailoverConfig {
            secondary_takeover_hook: hook(raw.secondary_takeover_hook)
                .at("failover.secondary_takeover_hook")?,
            primary_continue_hook: hook(raw.primary_continue_hook)
                .at("failover.primary_continue_hook")?,
        })
    }
}
