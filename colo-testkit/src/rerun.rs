//! A test run again in child processes, each with an environment of its own: for the tests of
//! what clap reads from the environment (flag > env > file > default). The environment is
//! process-wide and the tests of one binary run beside each other, so a test cannot set a
//! variable for itself; its child, where clap reads the variables as it does in the binary, can.
//!
//! ```no_run
//! use colo_testkit::rerun::{Case, child_case, rerun_with_env};
//!
//! /// A `#[test]` in `tests` of its binary.
//! fn a_flag_beats_its_env_var() {
//!     if let Some(case) = child_case() {
//!         // Where the binary's parser reads `case.args` and the environment.
//!         let got = match case.args.as_slice() {
//!             [flag, name] if flag == "--name" => name.clone(),
//!             _ => std::env::var("COLO_X_NAME").unwrap(),
//!         };
//!         assert_eq!(got, case.want, "{case}");
//!         return;
//!     }
//!     let cases: &[Case] = &[
//!         ("--name flag".into(), &[("COLO_X_NAME", "env")], "flag"),
//!         (String::new(), &[("COLO_X_NAME", "env")], "env"),
//!     ];
//!     rerun_with_env("tests::a_flag_beats_its_env_var", &["COLO_X_"], cases);
//! }
//! ```

use std::fmt;

/// Set in the child: its case, as `ARGS => WANT`.
const CASE_VAR: &str = "COLO_TESTKIT_RERUN_CASE";

/// A case: the command line (arguments separated by single spaces), the environment, and what
/// the child must get from them.
pub type Case<'a> = (String, &'a [(&'a str, &'a str)], &'a str);

/// The case a child checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildCase {
    /// The command line's arguments, after the binary's name.
    pub args: Vec<String>,
    /// What the child must get from them.
    pub want: String,
}

impl fmt::Display for ChildCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} => {}", self.args.join(" "), self.want)
    }
}

/// `Some` in a child started by [`rerun_with_env`]: the case to check; `None` in the test
/// itself.
pub fn child_case() -> Option<ChildCase> {
    let case = std::env::var(CASE_VAR).ok()?;
    let (args, want) = case
        .split_once(" => ")
        .unwrap_or_else(|| panic!("{CASE_VAR}={case:?} is not `ARGS => WANT`"));
    Some(ChildCase {
        args: args
            .split(' ')
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect(),
        want: want.to_string(),
    })
}

/// Runs `test` (its full path in this test binary) again in a child process per case, with
/// the case's variables set and none inherited that starts with one of `clear`; panics unless
/// each child ran the test and it passed.
pub fn rerun_with_env(test: &str, clear: &[&str], cases: &[Case<'_>]) {
    let exe = std::env::current_exe().expect("the test binary");
    for (args, env, want) in cases {
        let case = format!("{args} => {want}");
        let mut child = std::process::Command::new(&exe);
        child.args([test, "--exact", "--nocapture"]);
        for (var, _) in std::env::vars_os() {
            let name = var.to_string_lossy();
            if clear.iter().any(|prefix| name.starts_with(prefix)) {
                child.env_remove(&var);
            }
        }
        let out = child
            .env(CASE_VAR, &case)
            .envs(env.iter().copied())
            .output()
            .expect("the test binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        // libtest passes when its filter matches nothing: make sure the case ran.
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{case} with {env:?}:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
