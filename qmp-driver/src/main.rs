//! `qmp-driver`: operator CLI of a QEMU COLO pair (and the relay daemon).
//! Everything but argument parsing and the runtime lives in `cli/` and the
//! library. `qmp-driver --help` lists the commands and exit codes.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::parse();
    cli::init_logging(&cli);
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(cli::run(cli)),
        Err(e) => {
            eprintln!("qmp-driver: cannot start the async runtime: {e}");
            ExitCode::from(1)
        }
    }
}
