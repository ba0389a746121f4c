//! The pair with mutual TLS between the hosts (issue 13; `docs/security.md`): the keys made by
//! `qmp-driver pki create`, `[tls]` in `pair.toml`, and from it colo-proxyd's link over TLS on
//! both hosts, the primary QEMU's migration stream over TLS (`tls-creds`, `tls-hostname`)
//! terminated by the relay (`--migration-tls`), on colo's own daemons.
//!
//! Real QEMU (TCG) in network namespaces; needs root, `integration/setup.sh`'s artifacts and
//! this build's `qmp-driver`, `colo-proxyd` and `colo-blockd` binaries.

#[allow(dead_code)]
mod common;

use std::time::Duration;

use colo_testbed::scenario::{self, FailoverPlan};
use colo_testbed::stock::{PairConfig, Role};

fn tls_pair() -> PairConfig {
    PairConfig {
        tls: true,
        ..common::daemons_pair()
    }
}

/// Reads a log of the run and says whether it has `needle`.
fn log_has(report: &scenario::Report, log: &str, needle: &str) -> bool {
    std::fs::read_to_string(report.run_dir.join(log)).is_ok_and(|text| text.contains(needle))
}

/// At least 30 checkpoints over TLS while the guest dirties memory: every request answered,
/// the blob intact, the SVM's output compared; the link really is TLS (each colo-proxyd names
/// its authenticated peer, neither warns "unauthenticated") and so is the migration stream
/// (the relay authenticated the primary's certificate, then parsed the decrypted stream: the
/// checkpoints above are its barriers). colo-blockd's NBD child is still plaintext here.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn the_pair_over_tls_survives_30_checkpoints_under_load() {
    let report = scenario::soak("t-tls", tls_pair(), 30, Duration::from_millis(300))
        .await
        .expect("soak scenario ran");
    common::assert_soak(&report, 30, scenario::BLOB_BYTES as u64 / 2);
    for log in ["proxyd-primary.log", "proxyd-secondary.log"] {
        assert!(
            !log_has(&report, log, "unauthenticated"),
            "{log}: the link ran without TLS"
        );
        assert!(
            log_has(&report, log, "tls_peer="),
            "{log}: no link authenticated by TLS"
        );
    }
    assert!(
        log_has(
            &report,
            "relay.log",
            "migration connection authenticated (TLS)"
        ),
        "the relay did not authenticate the migration stream"
    );
}

/// The primary dies mid-download with TLS on every link; the secondary takes over and nothing
/// is lost.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn the_pair_over_tls_fails_over_to_the_secondary() {
    let plan = FailoverPlan {
        kill: Role::Primary,
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-tlp", tls_pair(), plan)
        .await
        .expect("failover scenario ran");
    common::assert_failover(&report);
}

/// The secondary dies mid-download with TLS on every link; the primary carries on alone and
/// nothing is lost.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn the_pair_over_tls_fails_over_to_the_primary() {
    let plan = FailoverPlan {
        kill: Role::Secondary,
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-tls2", tls_pair(), plan)
        .await
        .expect("failover scenario ran");
    common::assert_failover(&report);
}
