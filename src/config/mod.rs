//! Configuration: the YAML schema (`schema`), human-readable units (`units`), positions of
//! fields in the source (`locate`) and validation into a [`Config`] that the rest of cascade
//! can use without further checks (`validate`).
//!
//! Loading never stops at the first mistake: each section, origin, group and route is
//! deserialized on its own, so `cascade check` prints every error at once, each as
//! `FILE:LINE:COL: FIELD: message`.

pub mod locate;
pub mod plugins;
pub mod schema;
pub mod units;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use plugins::PluginConfig;
pub use schema::{
    Balance, CacheFallback, OnError, Passive, Placement, RedisOnError, SetCooldown, Timeouts,
    DEFAULT_PLUGIN_INSTANCES, MAX_PLUGIN_INSTANCES,
};
pub use validate::{
    AdminConfig, BucketSetConfig, Config, GroupConfig, HealthConfig, HostMatch, MemberConfig,
    OriginConfig, OriginKind, PeerConfig, RedisConfig, RetryOn, RouteCache, RouteConfig, S3Signing,
    MAX_MEMBERS,
};

/// One configuration error, located in the source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    /// Dotted path of the field (`origins.staging.url`), empty for whole-file errors.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.col)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// All the errors of one file.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Read, parse and validate a config file. Environment variables named by the file are read
/// through `env` (the process environment in production, a map in tests).
pub fn load_file(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let src = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            col: 0,
            field: String::new(),
            message: format!("cannot read config file: {e}"),
        }])
    })?;
    load_str(&src, path, env)
}

/// Parse and validate config text; `path` names the source in errors and anchors relative
/// directory paths.
pub fn load_str(
    src: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    validate::load(src, path, env)
}

/// The process environment, for [`load_file`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}
