//! `[migration]`: where the migration stream goes, and the checkpoint period.

use super::field::{At, FieldError, endpoint, nonzero, required};
use colo_types::Address;
use serde::Deserialize;

/// Default `migration.checkpoint_delay_ms` (QEMU's own default is 20000).
pub const DEFAULT_CHECKPOINT_DELAY_MS: u32 = 2000;

/// Where the migration stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationConfig {
    /// Where the secondary QEMU listens (`migrate-incoming`).
    pub secondary_incoming: Address,
    /// Where the primary migrates to (`migrate`): the relay's address, or
    /// `secondary_incoming` without a relay.
    pub primary_target: Address,
    /// `x-checkpoint-delay`: the periodic checkpoint interval in ms.
    pub checkpoint_delay_ms: u32,
}

/// `[migration]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMigration {
    secondary_incoming: Option<String>,
    primary_target: Option<String>,
    checkpoint_delay_ms: Option<u32>,
}

/// `[migration]`, validated on its own: `primary_target`'s default depends on `[relay]`,
/// which [`super::PairConfig`] settles.
#[derive(Debug)]
pub(super) struct MigrationSection {
    pub(super) secondary_incoming: Address,
    pub(super) primary_target: Option<Address>,
    pub(super) checkpoint_delay_ms: u32,
}

impl TryFrom<RawMigration> for MigrationSection {
    type Error = FieldError;

    fn try_from(raw: RawMigration) -> Result<MigrationSection, FieldError> {
        Ok(MigrationSection {
            secondary_incoming: required(
                raw.secondary_incoming,
                "where the secondary QEMU listens for the migration, e.g. \
                 \"unix:/run/colo/vm1/incoming.sock\"",
            )
            .and_then(endpoint)
            .at("migration.secondary_incoming")?,
            primary_target: raw
                .primary_target
                .map(endpoint)
                .transpose()
                .at("migration.primary_target")?,
            checkpoint_delay_ms: nonzero(
                raw.checkpoint_delay_ms
                    .unwrap_or(DEFAULT_CHECKPOINT_DELAY_MS),
                "give the periodic checkpoint interval in ms (at least 1; QEMU's default is \
                 20000, colo's 2000)",
            )
            .at("migration.checkpoint_delay_ms")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{MINIMAL, error_key, parse};

    #[test]
    fn endpoints_parse_and_print_in_qemu_syntax() {
        for ok in [
            "unix:/a/b.sock",
            "tcp:10.0.0.2:9998",
            "tcp:[fd00::2]:1",
            "tcp:host.example:65535",
        ] {
            let text = MINIMAL.replace("tcp:192.168.77.2:9998", ok);
            let cfg = parse(&text).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(cfg.migration.secondary_incoming.to_string(), ok);
        }
        for bad in [
            "",
            "unix:",
            "tcp:",
            "tcp:host",
            "tcp:h:0",
            "tcp:h:70000",
            "tcp:fd00::2:1",
            "udp:h:1",
            "relative/path",
            "tcp:h:1,nodelay=on",
        ] {
            let text = MINIMAL.replace("tcp:192.168.77.2:9998", bad);
            assert_eq!(
                error_key(&text),
                "migration.secondary_incoming",
                "{bad} accepted"
            );
        }
    }
}
