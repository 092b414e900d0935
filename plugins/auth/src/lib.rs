//! cascade `auth` plugin: API keys, signed URLs (HMAC-SHA256) and HS256 JWTs.
//!
//! See README.md for the configuration and the status codes.

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(AuthRoot { config: None }) });
}}

/// base64url, padding optional (JWTs are unpadded, some encoders pad anyway).
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn default_key_header() -> String {
    "x-api-key".into()
}
fn default_signature_param() -> String {
    "signature".into()
}
fn default_expires_param() -> String {
    "expires".into()
}
fn default_realm() -> String {
    "cascade".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default = "default_key_header")]
    key_header: String,
    hmac_secret: Option<String>,
    #[serde(default = "default_signature_param")]
    signature_param: String,
    #[serde(default = "default_expires_param")]
    expires_param: String,
    jwt_hs256_secret: Option<String>,
    #[serde(default = "default_realm")]
    realm: String,
    /// Secrets from the environment the host gives the plugin (WASI environ), so they
    /// need not be written in cascade's config file. `keys_env` holds comma-separated keys.
    keys_env: Option<String>,
    hmac_secret_env: Option<String>,
    jwt_hs256_secret_env: Option<String>,
}

/// The value of environment variable `var` (named by config key `what`).
fn from_env(what: &str, var: &str) -> Result<String, String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(v),
        Ok(_) => Err(format!("{what}: environment variable {var} is empty")),
        Err(_) => Err(format!(
            "{what}: environment variable {var} is not set for the plugin"
        )),
    }
}

/// `direct` or, if absent, the variable named by `env`; both given is an error.
fn secret(
    what: &str,
    direct: Option<String>,
    env: Option<String>,
) -> Result<Option<String>, String> {
    match (direct, env) {
        (Some(_), Some(_)) => Err(format!("give {what} or {what}_env, not both")),
        (Some(s), None) => Ok(Some(s)),
        (None, Some(var)) => from_env(&format!("{what}_env"), &var).map(Some),
        (None, None) => Ok(None),
    }
}

struct Config {
    keys: Vec<Vec<u8>>,
    key_header: String,
    /// Pre-keyed MACs: cloned per request, so the key schedule runs once.
    hmac: Option<HmacSha256>,
    signature_param: String,
    expires_param: String,
    jwt: Option<HmacSha256>,
    /// Value of the `www-authenticate` header sent with 401.
    challenge: String,
}

impl Config {
    fn parse(bytes: &[u8]) -> Result<Config, String> {
        let mut raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if let Some(var) = &raw.keys_env {
            let keys = from_env("keys_env", var)?;
            raw.keys.extend(
                keys.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(String::from),
            );
        }
        let hmac_secret = secret("hmac_secret", raw.hmac_secret, raw.hmac_secret_env)?;
        let jwt_secret = secret(
            "jwt_hs256_secret",
            raw.jwt_hs256_secret,
            raw.jwt_hs256_secret_env,
        )?;
        let keyed = |what: &str, s: Option<String>| -> Result<Option<HmacSha256>, String> {
            match s {
                None => Ok(None),
                Some(s) if s.is_empty() => Err(format!("{what} must not be empty")),
                Some(s) => HmacSha256::new_from_slice(s.as_bytes())
                    .map(Some)
                    .map_err(|e| format!("{what}: {e}")),
            }
        };
        if raw.keys.iter().any(|k| k.is_empty()) {
            return Err("keys must not contain an empty key".into());
        }
        let key_header = raw.key_header.trim().to_ascii_lowercase();
        if key_header.is_empty() || key_header.starts_with(':') {
            return Err(format!("invalid key_header {:?}", raw.key_header));
        }
        if raw.signature_param.is_empty() || raw.expires_param.is_empty() {
            return Err("signature_param and expires_param must not be empty".into());
        }
        if raw.realm.contains('"') || raw.realm.contains('\\') {
            return Err("realm must not contain '\"' or '\\'".into());
        }
        let config = Config {
            keys: raw.keys.into_iter().map(String::into_bytes).collect(),
            key_header,
            hmac: keyed("hmac_secret", hmac_secret)?,
            signature_param: raw.signature_param,
            expires_param: raw.expires_param,
            jwt: keyed("jwt_hs256_secret", jwt_secret)?,
            challenge: format!("Bearer realm=\"{}\"", raw.realm),
        };
        if config.keys.is_empty() && config.hmac.is_none() && config.jwt.is_none() {
            return Err("give at least one of keys, hmac_secret, jwt_hs256_secret".into());
        }
        Ok(config)
    }
}

struct AuthRoot {
    config: Option<Rc<Config>>,
}

impl Context for AuthRoot {}

impl RootContext for AuthRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(c) => {
                self.config = Some(Rc::new(c));
                true
            }
            Err(e) => {
                log::error!("auth: invalid configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(AuthHttp { config }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct AuthHttp {
    config: Rc<Config>,
}

impl Context for AuthHttp {}

/// Outcome of checking the request's credentials.
#[derive(PartialEq, Debug)]
enum Verdict {
    Ok,
    /// No credentials at all: 401 with a challenge.
    Missing,
    /// Credentials present but wrong, expired or unsupported: 403.
    Bad,
}

impl HttpContext for AuthHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _eos: bool) -> Action {
        let verdict = self.check();
        match verdict {
            Verdict::Ok => {
                // Secrets never reach the bucket: neither the key headers nor the signed-URL
                // parameters (which would also split the cache by signature).
                self.set_http_request_header(&self.config.key_header, None);
                self.set_http_request_header("authorization", None);
                let path = self.get_http_request_header(":path").unwrap_or_default();
                let c = &*self.config;
                let stripped = strip_params(&path, &[&c.signature_param, &c.expires_param]);
                if stripped != path {
                    self.set_http_request_header(":path", Some(&stripped));
                }
                Action::Continue
            }
            Verdict::Missing => {
                self.send_http_response(
                    401,
                    vec![
                        ("www-authenticate", self.config.challenge.as_str()),
                        ("content-type", "text/plain"),
                    ],
                    Some(b"unauthorized\n"),
                );
                Action::Pause
            }
            Verdict::Bad => {
                self.send_http_response(
                    403,
                    vec![("content-type", "text/plain")],
                    Some(b"forbidden\n"),
                );
                Action::Pause
            }
        }
    }
}

impl AuthHttp {
    fn now(&self) -> u64 {
        self.get_current_time()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn check(&self) -> Verdict {
        let c = &*self.config;
        let mut present = false;

        // 1. API key header.
        if let Some(key) = self.get_http_request_header(&c.key_header) {
            present = true;
            if key_matches(&c.keys, key.trim().as_bytes()) {
                return Verdict::Ok;
            }
        }

        // 2. Authorization: Bearer <api key | JWT>.
        if let Some(authz) = self.get_http_request_header("authorization") {
            present = true;
            if let Some(token) = bearer_token(&authz) {
                if key_matches(&c.keys, token.as_bytes()) {
                    return Verdict::Ok;
                }
                if let Some(jwt) = &c.jwt {
                    if verify_jwt(jwt, token, self.now()) {
                        return Verdict::Ok;
                    }
                }
            }
        }

        // 3. Signed URL: ?expires=<unix s>&signature=<hex HMAC>.
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let (url_path, query) = match path.split_once('?') {
            Some((p, q)) => (p, q),
            None => (path.as_str(), ""),
        };
        let expires = query_param(query, &c.expires_param);
        let signature = query_param(query, &c.signature_param);
        if expires.is_some() || signature.is_some() {
            present = true;
            if let (Some(mac), Some(expires), Some(signature)) = (&c.hmac, expires, signature) {
                // Prefer the host's view of the path (same value, but normalised by it).
                let prop = self.get_property(vec!["request", "url_path"]);
                let url_path = match &prop {
                    Some(p) => std::str::from_utf8(p).unwrap_or(url_path),
                    None => url_path,
                };
                if verify_signed_url(mac, url_path, expires, signature, self.now()) {
                    return Verdict::Ok;
                }
            }
        }

        if present {
            Verdict::Bad
        } else {
            Verdict::Missing
        }
    }
}

/// Constant-time comparison against every configured key (no early exit).
fn key_matches(keys: &[Vec<u8>], candidate: &[u8]) -> bool {
    let mut ok = subtle::Choice::from(0u8);
    for k in keys {
        ok |= k.as_slice().ct_eq(candidate);
    }
    ok.into()
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    (!token.is_empty()).then_some(token)
}

/// First value of `name` in a raw query string (no percent-decoding: the values used here
/// are digits and hex).
fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// `path` without the query parameters named in `names` (the rest kept in order; no `?`
/// left when nothing remains).
fn strip_params(path: &str, names: &[&str]) -> String {
    let Some((p, q)) = path.split_once('?') else {
        return path.to_string();
    };
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| {
            let k = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !pair.is_empty() && !names.contains(&k)
        })
        .collect();
    if kept.is_empty() {
        p.to_string()
    } else {
        format!("{p}?{}", kept.join("&"))
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    fn nibble(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

fn verify_signed_url(mac: &HmacSha256, path: &str, expires: &str, sig: &str, now: u64) -> bool {
    let Ok(exp) = expires.parse::<u64>() else {
        return false;
    };
    if now > exp {
        return false;
    }
    let Some(sig) = decode_hex(sig) else {
        return false;
    };
    let mut mac = mac.clone();
    mac.update(path.as_bytes());
    mac.update(b"\n");
    mac.update(expires.as_bytes());
    mac.verify_slice(&sig).is_ok()
}

#[derive(Deserialize)]
struct JwtHeader {
    alg: String,
}

#[derive(Deserialize)]
struct JwtClaims {
    exp: Option<f64>,
    nbf: Option<f64>,
}

fn verify_jwt(mac: &HmacSha256, token: &str, now: u64) -> bool {
    let mut parts = token.splitn(3, '.');
    let (Some(h), Some(p), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    if s.contains('.') {
        return false;
    }
    let Ok(header) = B64URL.decode(h) else {
        return false;
    };
    match serde_json::from_slice::<JwtHeader>(&header) {
        Ok(hdr) if hdr.alg == "HS256" => {}
        _ => return false,
    }
    let Ok(sig) = B64URL.decode(s) else {
        return false;
    };
    let mut mac = mac.clone();
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    if mac.verify_slice(&sig).is_err() {
        return false;
    }
    let Ok(payload) = B64URL.decode(p) else {
        return false;
    };
    let Ok(claims) = serde_json::from_slice::<JwtClaims>(&payload) else {
        return false;
    };
    let now = now as f64;
    if matches!(claims.exp, Some(exp) if now >= exp) {
        return false;
    }
    if matches!(claims.nbf, Some(nbf) if now < nbf) {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(secret: &str) -> HmacSha256 {
        HmacSha256::new_from_slice(secret.as_bytes()).unwrap()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn jwt(secret: &str, header: &str, claims: &str) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signing = format!("{}.{}", e.encode(header), e.encode(claims));
        let mut m = mac(secret);
        m.update(signing.as_bytes());
        format!("{signing}.{}", e.encode(m.finalize().into_bytes()))
    }

    #[test]
    fn config_validation() {
        assert!(Config::parse(br#"{"keys":["k"]}"#).is_ok());
        assert!(Config::parse(br#"{"hmac_secret":"s"}"#).is_ok());
        assert!(Config::parse(br#"{}"#).is_err());
        assert!(Config::parse(br#"{"keys":[]}"#).is_err());
        assert!(Config::parse(br#"{"keys":["k"],"typo":1}"#).is_err());
        assert!(Config::parse(b"").is_err());
        std::env::set_var("AUTH_TEST_KEYS", "a, b,,c");
        let c = Config::parse(br#"{"keys":["k"],"keys_env":"AUTH_TEST_KEYS"}"#).unwrap();
        assert_eq!(c.keys.len(), 4);
        assert!(Config::parse(br#"{"keys_env":"AUTH_TEST_UNSET"}"#).is_err());
        assert!(Config::parse(br#"{"hmac_secret":"s","hmac_secret_env":"X"}"#).is_err());
        std::env::set_var("AUTH_TEST_JWT", "j");
        assert!(
            Config::parse(br#"{"jwt_hs256_secret_env":"AUTH_TEST_JWT"}"#)
                .unwrap()
                .jwt
                .is_some()
        );
        let c = Config::parse(br#"{"keys":["k"],"key_header":"X-Key","realm":"r"}"#).unwrap();
        assert_eq!(c.key_header, "x-key");
        assert_eq!(c.challenge, "Bearer realm=\"r\"");
    }

    #[test]
    fn keys_and_bearer() {
        let keys = vec![b"alpha".to_vec(), b"beta".to_vec()];
        assert!(key_matches(&keys, b"beta"));
        assert!(!key_matches(&keys, b"bet"));
        assert!(!key_matches(&[], b""));
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer   abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn signed_url() {
        let m = mac("s3cret");
        let mut sig = mac("s3cret");
        sig.update(b"/a/b.jpg\n2000");
        let sig = hex(&sig.finalize().into_bytes());
        assert!(verify_signed_url(&m, "/a/b.jpg", "2000", &sig, 1999));
        assert!(verify_signed_url(&m, "/a/b.jpg", "2000", &sig, 2000));
        assert!(!verify_signed_url(&m, "/a/b.jpg", "2000", &sig, 2001));
        assert!(!verify_signed_url(&m, "/a/c.jpg", "2000", &sig, 1000));
        assert!(!verify_signed_url(&m, "/a/b.jpg", "2001", &sig, 1000));
        assert!(!verify_signed_url(&m, "/a/b.jpg", "2000", "zz", 1000));
        assert_eq!(
            strip_params("/a.jpg?w=1&expires=2&signature=ab&h=3", &["signature", "expires"]),
            "/a.jpg?w=1&h=3"
        );
        assert_eq!(
            strip_params("/a.jpg?expires=2&signature=ab", &["signature", "expires"]),
            "/a.jpg"
        );
        assert_eq!(strip_params("/a.jpg", &["signature"]), "/a.jpg");
        let q = format!("x=1&expires=2000&signature={sig}");
        assert_eq!(query_param(&q, "expires"), Some("2000"));
        assert_eq!(query_param(&q, "signature"), Some(sig.as_str()));
        assert_eq!(query_param(&q, "nope"), None);
    }

    #[test]
    fn jwt_hs256() {
        let m = mac("jwtsecret");
        let h = r#"{"alg":"HS256","typ":"JWT"}"#;
        assert!(verify_jwt(&m, &jwt("jwtsecret", h, r#"{"sub":"x"}"#), 100));
        assert!(verify_jwt(
            &m,
            &jwt("jwtsecret", h, r#"{"exp":200,"nbf":50}"#),
            100
        ));
        assert!(!verify_jwt(&m, &jwt("jwtsecret", h, r#"{"exp":100}"#), 100));
        assert!(!verify_jwt(&m, &jwt("jwtsecret", h, r#"{"nbf":101}"#), 100));
        assert!(!verify_jwt(&m, &jwt("other", h, r#"{}"#), 100));
        let none = r#"{"alg":"none"}"#;
        assert!(!verify_jwt(&m, &jwt("jwtsecret", none, r#"{}"#), 100));
        assert!(!verify_jwt(&m, "a.b", 100));
        assert!(!verify_jwt(&m, "a.b.c.d", 100));
    }
}
