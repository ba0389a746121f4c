//! Checks of the daemons' clap definitions that every daemon's tests share.

/// Asserts that every long option of every subcommand of `cli` reads its own environment
/// variable, `prefix` and the option in capitals (`COLO_BLOCKD_`, `--log-budget`:
/// `COLO_BLOCKD_LOG_BUDGET`; `--config`: `COLO_BLOCKD_CONFIG`), so an operator can guess it.
/// `--help`, `--version` and the global options (`--log-format` reads `COLO_LOG_FORMAT`, the
/// variable of every colo binary) are not the daemon's own.
pub fn assert_every_option_reads_its_env_var(cli: &clap::Command, prefix: &str) {
    let mut checked = 0;
    for sub in cli.get_subcommands() {
        for arg in sub.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") || arg.is_global_set() {
                continue;
            }
            let want = format!("{prefix}{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(want.as_str()),
                "{} --{long}",
                sub.get_name()
            );
            checked += 1;
        }
    }
    assert!(
        checked > 0,
        "{} has no subcommand with options",
        cli.get_name()
    );
}
