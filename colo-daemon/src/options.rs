//! A daemon's options, each from the first of four layers, the same for every colo daemon
//! (colo-proxyd, colo-blockd):
//!
//! 1. its flag (`--max-hold-ms 50`),
//! 2. its environment variable: the daemon's prefix and the option in capitals
//!    (`COLO_PROXYD_MAX_HOLD_MS=50`),
//! 3. the `--config` file: TOML with the options' long names as keys (`max-hold-ms = 50`),
//! 4. its default.
//!
//! clap reads the first two (`#[arg(long, env = ...)]`; a flag beats its variable), into an
//! args struct whose fields are `Option`s or lists, so that "not given" stays visible. The same
//! struct derives `Deserialize` (`kebab-case`, `deny_unknown_fields`) to read the file.
//! [`OptionLayers`] puts the file's values under what clap gave and remembers which options the
//! file gave, so that an invalid value is reported with the file and the key instead of the
//! flag ([`OptionError`]); the daemon applies its defaults last.
//!
//! ```
//! use colo_daemon::options::{OptionError, OptionLayers};
//!
//! let mut layers = OptionLayers::new("COLO_EXAMPLE_", Some("/etc/colo/example.toml".into()));
//! // Nothing on the command line or in the environment; 0 in the file.
//! let hold = layers.pick("max-hold-ms", None, Some(0)).unwrap_or(200);
//! assert_eq!(hold, 0);
//! let err = layers.invalid("max-hold-ms", "must be at least 1 ms");
//! assert_eq!(
//!     err.to_string(),
//!     "config file /etc/colo/example.toml: `max-hold-ms`: must be at least 1 ms"
//! );
//! let err: OptionError = layers.required::<u16>("port", None).unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "missing --port (or COLO_EXAMPLE_PORT, or `port` in the config file)"
//! );
//! ```

use std::path::PathBuf;

use serde::de::DeserializeOwned;

/// The environment variable of `option`: `prefix` and the option in capitals
/// (`COLO_PROXYD_`, `max-hold-ms`: `COLO_PROXYD_MAX_HOLD_MS`).
pub fn env_var(prefix: &str, option: &str) -> String {
    format!("{prefix}{}", option.to_uppercase().replace('-', "_"))
}

/// A bad setting, saying where it came from. Each message is complete on one line and says its
/// cause once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// A required setting is missing from the command line, the environment and the file.
    #[error("missing --{option} (or {env}, or `{option}` in the config file)")]
    Missing {
        /// The option (its long name, the file's key).
        option: &'static str,
        /// Its environment variable.
        env: String,
    },
    /// A setting from the command line or the environment is not acceptable.
    #[error("--{option} (or {env}): {reason}")]
    Invalid {
        /// The option.
        option: &'static str,
        /// Its environment variable.
        env: String,
        /// What is wrong.
        reason: String,
    },
    /// A setting from the config file is not acceptable.
    #[error("config file {path}: `{option}`: {reason}")]
    InvalidInFile {
        /// The file.
        path: PathBuf,
        /// The key (the option's long name).
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The config file cannot be read, is not TOML, has an unknown key or a value of the
    /// wrong type (the parser's message shows the line and the key).
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The layers of one daemon's options: its environment variables' prefix, its `--config` file
/// (if any), and which options took their value from that file.
#[derive(Debug, Clone)]
pub struct OptionLayers {
    env_prefix: &'static str,
    file: Option<PathBuf>,
    from_file: Vec<&'static str>,
}

impl OptionLayers {
    /// The layers of a daemon whose variables start with `env_prefix` (`COLO_PROXYD_`), with
    /// `file` as its `--config` file.
    pub fn new(env_prefix: &'static str, file: Option<PathBuf>) -> OptionLayers {
        OptionLayers {
            env_prefix,
            file,
            from_file: Vec::new(),
        }
    }

    /// The environment variable of `option`.
    pub fn env_var(&self, option: &str) -> String {
        env_var(self.env_prefix, option)
    }

    /// Reads the `--config` file into the daemon's args struct (every option unset without
    /// one).
    pub fn read_file<T: DeserializeOwned + Default>(&self) -> Result<T, OptionError> {
        let Some(path) = &self.file else {
            return Ok(T::default());
        };
        let file_error = |reason: String| OptionError::File {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        toml::from_str(&text).map_err(|e| file_error(e.to_string().trim_end().to_string()))
    }

    /// `given` (by the flag or the environment variable) if there is one, else the file's
    /// value; the daemon's default comes after both (`.unwrap_or(default)`).
    pub fn pick<T>(
        &mut self,
        option: &'static str,
        given: Option<T>,
        file: Option<T>,
    ) -> Option<T> {
        if given.is_some() {
            return given;
        }
        if file.is_some() {
            self.from_file.push(option);
        }
        file
    }

    /// A list option: `given` unless empty, else the file's (a list given on one layer
    /// replaces the whole list of the layers below).
    pub fn pick_list<T>(&mut self, option: &'static str, given: Vec<T>, file: Vec<T>) -> Vec<T> {
        let nonempty = |v: Vec<T>| (!v.is_empty()).then_some(v);
        self.pick(option, nonempty(given), nonempty(file))
            .unwrap_or_default()
    }

    /// `value`, or [`OptionError::Missing`] when no layer gave one.
    pub fn required<T>(&self, option: &'static str, value: Option<T>) -> Result<T, OptionError> {
        value.ok_or_else(|| self.missing(option))
    }

    /// `option` is missing from every layer.
    pub fn missing(&self, option: &'static str) -> OptionError {
        OptionError::Missing {
            option,
            env: self.env_var(option),
        }
    }

    /// `option`'s value is not acceptable, because of `reason`: named as the file's key when
    /// the value came from the file, else as the flag and its variable.
    pub fn invalid(&self, option: &'static str, reason: impl Into<String>) -> OptionError {
        let reason = reason.into();
        match &self.file {
            Some(path) if self.from_file.contains(&option) => OptionError::InvalidInFile {
                path: path.clone(),
                option,
                reason,
            },
            _ => OptionError::Invalid {
                option,
                env: self.env_var(option),
                reason,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
    struct Options {
        max_hold_ms: Option<u64>,
        name: Option<String>,
        bypass: Vec<String>,
    }

    #[test]
    fn the_env_var_is_the_prefix_and_the_option_in_capitals() {
        assert_eq!(
            env_var("COLO_PROXYD_", "max-hold-ms"),
            "COLO_PROXYD_MAX_HOLD_MS"
        );
        let layers = OptionLayers::new("COLO_BLOCKD_", None);
        assert_eq!(layers.env_var("log-budget"), "COLO_BLOCKD_LOG_BUDGET");
    }

    #[test]
    fn given_beats_the_file_which_beats_nothing() {
        let mut layers = OptionLayers::new("COLO_X_", Some("/x.toml".into()));
        assert_eq!(layers.pick("a", Some(1), Some(2)), Some(1));
        assert_eq!(layers.pick("b", None, Some(2)), Some(2));
        assert_eq!(layers.pick::<u8>("c", None, None), None);
        assert_eq!(layers.pick_list("d", vec![1], vec![2, 3]), [1]);
        assert_eq!(layers.pick_list("e", vec![], vec![2, 3]), [2, 3]);
        assert_eq!(layers.from_file, ["b", "e"]);
    }

    #[test]
    fn an_invalid_value_is_named_where_it_came_from() {
        let mut layers = OptionLayers::new("COLO_X_", Some("/x.toml".into()));
        layers.pick("from-file", None, Some(0));
        layers.pick("given", Some(0), Some(1));
        assert_eq!(
            layers.invalid("from-file", "too small").to_string(),
            "config file /x.toml: `from-file`: too small"
        );
        assert_eq!(
            layers.invalid("given", "too small").to_string(),
            "--given (or COLO_X_GIVEN): too small"
        );
        assert_eq!(
            layers.missing("image").to_string(),
            "missing --image (or COLO_X_IMAGE, or `image` in the config file)"
        );
        assert_eq!(layers.required("image", Some(1)), Ok(1));
    }

    #[test]
    fn the_file_is_toml_with_the_long_options_as_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        let layers = OptionLayers::new("COLO_X_", Some(path.clone()));
        let err = layers.read_file::<Options>().unwrap_err();
        assert!(
            matches!(&err, OptionError::File { path: p, .. } if *p == path),
            "{err}"
        );
        std::fs::write(&path, "max-hold-ms = 5\nbypass = [\"port=1\"]\n").unwrap();
        let o: Options = layers.read_file().unwrap();
        assert_eq!(
            (o.max_hold_ms, o.name, o.bypass),
            (Some(5), None, vec!["port=1".into()])
        );
        std::fs::write(&path, "max-hlod-ms = 5\n").unwrap();
        let err = layers.read_file::<Options>().unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("config file {}: ", path.display()))
                && err.contains("max-hlod-ms")
                && !err.ends_with('\n'),
            "{err}"
        );
        let none: Options = OptionLayers::new("COLO_X_", None).read_file().unwrap();
        assert_eq!(none.max_hold_ms, None);
    }
}
