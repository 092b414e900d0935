//! The `plugins:` section and the routes' plugin chains: each plugin's file checked, its
//! configuration turned into the bytes the plugin receives (a YAML string as its raw bytes,
//! a map or list as JSON, as Envoy hands it over), limits checked. Loading the module itself
//! happens at startup (`plugin::Runtime::load`), where a failure names the plugin too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::Value;

use super::locate;
use super::schema::{OnError, RawPlugin};
use super::validate::Ctx;

/// A validated plugin. Debug output names the environment variables, never their values.
#[derive(Clone)]
pub struct PluginConfig {
    pub name: String,
    /// Absolute path of the `.wasm` file.
    pub wasm: PathBuf,
    /// `proxy_on_configure`'s buffer.
    pub config: Vec<u8>,
    /// `proxy_on_vm_start`'s buffer.
    pub vm_config: Vec<u8>,
    pub on_error: OnError,
    /// Memory cap per instance, bytes.
    pub memory: u64,
    /// Deadline per callback.
    pub time: Duration,
    /// `NAME=value` pairs of the plugin's WASI environment (read from cascade's environment).
    pub env: Vec<(String, String)>,
    /// Body callbacks on (`bodies:`).
    pub bodies: bool,
    /// Most body bytes held for a plugin that pauses (`limits.body`); also the bound of an
    /// HTTP call's request body and answer body.
    pub max_body: u64,
    /// Origins (indices) the plugin may call with `proxy_http_call` (`calls:`).
    pub calls: Vec<usize>,
    /// `limits.headers`: bytes a header map may grow to by the plugin's edits.
    pub max_headers: u64,
    /// `limits.shared_data`: bytes of keys and values of the plugin's shared data.
    pub shared_data: u64,
    /// `limits.shared_value`: bytes of one shared-data value.
    pub shared_value: u64,
}

impl std::fmt::Debug for PluginConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginConfig")
            .field("name", &self.name)
            .field("wasm", &self.wasm)
            .field("config_bytes", &self.config.len())
            .field("on_error", &self.on_error)
            .field("memory", &self.memory)
            .field("time", &self.time)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .finish()
    }
}

/// Envoy's encoding of a plugin configuration.
pub fn config_bytes(v: &Value) -> Result<Vec<u8>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(s.clone().into_bytes()),
        Value::Bool(b) => Ok(b.to_string().into_bytes()),
        Value::Number(n) => Ok(n.to_string().into_bytes()),
        other => serde_json::to_vec(other).map_err(|e| format!("cannot be turned into JSON: {e}")),
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

pub(super) fn plugins(
    cx: &mut Ctx,
    raw: &BTreeMap<String, Value>,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    origin_ix: &HashMap<String, Option<usize>>,
) -> (Vec<PluginConfig>, HashMap<String, Option<usize>>) {
    let mut out = Vec::new();
    let mut ix = HashMap::new();
    for (name, v) in raw {
        let path = locate::join("plugins", name);
        let parsed = cx
            .de::<RawPlugin>(&path, v)
            .and_then(|p| plugin(cx, &path, name, p, base_dir, env, origin_ix));
        ix.insert(name.clone(), parsed.as_ref().map(|_| out.len()));
        out.extend(parsed);
    }
    (out, ix)
}

fn plugin(
    cx: &mut Ctx,
    path: &str,
    name: &str,
    raw: RawPlugin,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    origin_ix: &HashMap<String, Option<usize>>,
) -> Option<PluginConfig> {
    let mut ok = true;
    if !valid_name(name) {
        cx.err(
            path,
            format!("plugin name `{name}` may only use letters, digits, `-`, `_` and `.`"),
        );
        ok = false;
    }
    let wasm = {
        let p = PathBuf::from(&raw.wasm);
        if p.is_absolute() {
            p
        } else {
            base_dir.join(p)
        }
    };
    match std::fs::metadata(&wasm) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            cx.err(
                &locate::join(path, "wasm"),
                format!("{} is not a file", wasm.display()),
            );
            ok = false;
        }
        Err(e) => {
            cx.err(
                &locate::join(path, "wasm"),
                format!("plugin `{name}`: {}: {e}", wasm.display()),
            );
            ok = false;
        }
    }
    let config = match config_bytes(&raw.config) {
        Ok(b) => b,
        Err(m) => {
            cx.err(&locate::join(path, "config"), m);
            ok = false;
            Vec::new()
        }
    };
    let vm_config = match config_bytes(&raw.vm_config) {
        Ok(b) => b,
        Err(m) => {
            cx.err(&locate::join(path, "vm_config"), m);
            ok = false;
            Vec::new()
        }
    };
    if !(1 << 20..=4 << 30).contains(&raw.limits.memory) {
        cx.err(
            &locate::join(path, "limits.memory"),
            "must be between 1MiB and 4GiB",
        );
        ok = false;
    }
    if raw.limits.time.is_zero() || raw.limits.time > Duration::from_secs(10) {
        cx.err(
            &locate::join(path, "limits.time"),
            "must be greater than zero and at most 10s",
        );
        ok = false;
    }
    if !(1 << 10..=1 << 20).contains(&raw.limits.headers) {
        cx.err(
            &locate::join(path, "limits.headers"),
            "must be between 1KiB and 1MiB (Pingora refuses larger headers)",
        );
        ok = false;
    }
    if raw.limits.shared_data > 1 << 30 {
        cx.err(
            &locate::join(path, "limits.shared_data"),
            "must be at most 1GiB",
        );
        ok = false;
    }
    if raw.limits.shared_value == 0 || raw.limits.shared_value > raw.limits.shared_data {
        cx.err(
            &locate::join(path, "limits.shared_value"),
            format!(
                "must be greater than zero and at most limits.shared_data ({} bytes)",
                raw.limits.shared_data
            ),
        );
        ok = false;
    }
    let mut vars = Vec::with_capacity(raw.env.len());
    for (i, var) in raw.env.iter().enumerate() {
        let field = locate::index(&locate::join(path, "env"), i);
        if var.is_empty() || var.contains('=') || var.contains('\0') {
            cx.err(
                &field,
                format!("`{var}` is not an environment variable name"),
            );
            ok = false;
            continue;
        }
        match env(var) {
            Some(v) => vars.push((var.clone(), v)),
            None => {
                cx.err(&field, format!("environment variable `{var}` is not set"));
                ok = false;
            }
        }
    }
    let mut calls = Vec::with_capacity(raw.calls.len());
    for (i, o) in raw.calls.iter().enumerate() {
        match origin_ix.get(o) {
            Some(Some(ix)) => calls.push(*ix),
            Some(None) => ok = false, // reported at the origin itself
            None => {
                cx.err(
                    &locate::index(&locate::join(path, "calls"), i),
                    format!(
                        "unknown origin `{o}` (defined: {})",
                        defined(origin_ix, "none")
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then(|| PluginConfig {
        name: name.to_string(),
        wasm: wasm.canonicalize().unwrap_or(wasm),
        config,
        vm_config,
        on_error: raw.on_error,
        memory: raw.limits.memory,
        time: raw.limits.time,
        env: vars,
        bodies: raw.bodies,
        max_body: raw.limits.body,
        calls,
        max_headers: raw.limits.headers,
        shared_data: raw.limits.shared_data,
        shared_value: raw.limits.shared_value,
    })
}

/// The names of `ix`, sorted and comma-separated (`none` when empty), for "unknown" errors.
fn defined(ix: &HashMap<String, Option<usize>>, none: &str) -> String {
    let mut known: Vec<&str> = ix.keys().map(String::as_str).collect();
    known.sort_unstable();
    if known.is_empty() {
        none.to_string()
    } else {
        known.join(", ")
    }
}

/// Resolves a route's `plugins:` list to indices. `None` after reporting an error.
pub(super) fn chain(
    cx: &mut Ctx,
    route_path: &str,
    names: &[String],
    plugin_ix: &HashMap<String, Option<usize>>,
) -> Option<Vec<usize>> {
    let mut out = Vec::with_capacity(names.len());
    let mut seen = HashSet::new();
    let mut ok = true;
    for (i, n) in names.iter().enumerate() {
        let field = locate::index(&locate::join(route_path, "plugins"), i);
        if !seen.insert(n.as_str()) {
            cx.err(&field, format!("plugin `{n}` is listed twice"));
            ok = false;
            continue;
        }
        match plugin_ix.get(n) {
            Some(Some(ix)) => out.push(*ix),
            Some(None) => ok = false, // reported at the plugin itself
            None => {
                cx.err(
                    &field,
                    format!(
                        "unknown plugin `{n}` (defined: {})",
                        defined(plugin_ix, "none; add a top-level `plugins:` section")
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_bytes_follow_envoy() {
        let v: Value = serde_yaml::from_str("{keys: [k1], n: 2}").unwrap();
        assert_eq!(config_bytes(&v).unwrap(), br#"{"keys":["k1"],"n":2}"#);
        let v: Value = serde_yaml::from_str("\"raw {not json}\"").unwrap();
        assert_eq!(config_bytes(&v).unwrap(), b"raw {not json}");
        assert_eq!(config_bytes(&Value::Null).unwrap(), b"");
    }

    fn with_limits(limits: &str) -> Result<crate::config::Config, Vec<(usize, String)>> {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("p.wasm");
        std::fs::write(&wasm, b"not loaded here").unwrap();
        let yaml = format!(
            "listen: [{{addr: 127.0.0.1:1}}]\norigins: {{a: {{url: \"http://127.0.0.1:9\"}}}}\n\
             groups: {{g: {{main: a}}}}\nplugins:\n  p:\n    wasm: {}\n    limits:\n{limits}\
             routes: [{{path: /, group: g, plugins: [p]}}]\n",
            wasm.display()
        );
        crate::config::load_str(&yaml, Path::new("/tmp/t.yaml"), &|_| None)
            .map_err(|e| e.0.into_iter().map(|e| (e.line, e.field)).collect())
    }

    #[test]
    fn guest_allocation_limits_have_defaults_and_are_validated_with_their_line() {
        let c = with_limits("      body: 1MiB\n").unwrap();
        let p = &c.plugins[0];
        assert_eq!(
            (p.max_headers, p.shared_data, p.shared_value),
            (64 << 10, 16 << 20, 1 << 20)
        );
        let c =
            with_limits("      headers: 8KiB\n      shared_data: 1MiB\n      shared_value: 1MiB\n")
                .unwrap();
        let p = &c.plugins[0];
        assert_eq!(
            (p.max_headers, p.shared_data, p.shared_value),
            (8 << 10, 1 << 20, 1 << 20)
        );
        let errs =
            with_limits("      headers: 100\n      shared_data: 2GiB\n      shared_value: 0\n")
                .unwrap_err();
        for want in [
            (8, "plugins.p.limits.headers"),
            (9, "plugins.p.limits.shared_data"),
            (10, "plugins.p.limits.shared_value"),
        ] {
            assert!(
                errs.iter().any(|(l, f)| (*l, f.as_str()) == want),
                "missing {want:?} in {errs:?}"
            );
        }
        let errs = with_limits("      shared_data: 1MiB\n      shared_value: 2MiB\n").unwrap_err();
        assert_eq!(errs, vec![(9, "plugins.p.limits.shared_value".to_string())]);
    }
}
