//! Origins at run time: where an attempt connects (a Pingora `HttpPeer`) and how the
//! request is rewritten for it (Host, bucket prefix + key, SigV4 signature). `dir` holds the
//! local-directory origin that cascade serves itself on a Unix socket.
//!
//! Invariant: `rewrite` starts from the client's request every time (Pingora re-clones the
//! downstream header per attempt), so a fallback replay never inherits the previous
//! origin's Host or signature.

pub mod dir;
pub mod sign;

use std::net::ToSocketAddrs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;

use crate::config::{OriginConfig, OriginKind, Timeouts};
use sign::{s3_canonical_path, Signer};

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// What of the client's request an attempt may carry besides the allowlist.
#[derive(Debug, Clone, Copy)]
pub struct Forward {
    /// The client's credentials (`Authorization`, `Cookie`): main only, unless the group
    /// says `forward_credentials`.
    pub credentials: bool,
}

#[derive(Debug)]
pub struct Origin {
    pub name: String,
    pub read_only: bool,
    pub timeouts: Timeouts,
    peer: HttpPeer,
    host_header: String,
    prefix: String,
    /// `scheme://authority`, what the signature covers besides the path.
    url_base: String,
    signer: Option<Signer>,
}

impl Origin {
    /// Build the runtime origin. `dir_socket` is where the directory origin of this name
    /// listens (only for `dir` origins). Host names are resolved here, once.
    pub fn new(cfg: &OriginConfig, dir_socket: Option<&Path>) -> Result<Origin, String> {
        let (mut peer, host_header, prefix, url_base, signer) = match &cfg.kind {
            OriginKind::Http {
                tls,
                tls_verify,
                host,
                port,
                host_header,
                prefix,
                s3,
            } => {
                let addr = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| format!("origin `{}`: cannot resolve {host}: {e}", cfg.name))?
                    .next()
                    .ok_or_else(|| format!("origin `{}`: {host} has no address", cfg.name))?;
                let mut peer = HttpPeer::new(addr, *tls, host.clone());
                peer.options.verify_cert = *tls_verify;
                peer.options.verify_hostname = *tls_verify;
                let scheme = if *tls { "https" } else { "http" };
                (
                    peer,
                    host_header.clone(),
                    prefix.clone(),
                    format!("{scheme}://{host_header}"),
                    s3.as_ref().map(Signer::new),
                )
            }
            OriginKind::Dir { .. } => {
                let sock = dir_socket.ok_or_else(|| format!("origin `{}`: no socket", cfg.name))?;
                let peer = HttpPeer::new_uds(&sock.to_string_lossy(), false, String::new())
                    .map_err(|e| format!("origin `{}`: {e}", cfg.name))?;
                (
                    peer,
                    "localhost".into(),
                    String::new(),
                    "http://localhost".into(),
                    None,
                )
            }
        };
        let t = cfg.timeouts;
        peer.options.connection_timeout = Some(t.connect);
        peer.options.total_connection_timeout = Some(t.connect);
        peer.options.read_timeout = Some(t.read);
        peer.options.write_timeout = Some(t.write);
        peer.options.idle_timeout = Some(POOL_IDLE);
        Ok(Origin {
            name: cfg.name.clone(),
            read_only: cfg.read_only,
            timeouts: t,
            peer,
            host_header,
            prefix,
            url_base,
            signer,
        })
    }

    pub fn peer(&self) -> Box<HttpPeer> {
        Box::new(self.peer.clone())
    }

    pub fn is_signed(&self) -> bool {
        self.signer.is_some()
    }

    /// Rewrite the upstream request for this origin: `key` is the canonical object path
    /// (`boundary::path` normal form, starts with `/`), `query` the forwarded query (after the
    /// S3 policy). A signed origin gets only the allowlisted client headers
    /// (`boundary::s3::forward_header`), then the signature; `forward.credentials` false (a
    /// fallback) drops the client's `Authorization`, `Cookie` and `Proxy-Authorization`.
    pub fn rewrite(
        &self,
        req: &mut RequestHeader,
        key: &str,
        query: Option<&str>,
        forward: Forward,
    ) -> Result<(), String> {
        // Which client headers go: a signed origin gets the S3 allowlist; a fallback (another
        // trust domain) gets only what a read needs, nothing that could be a credential.
        let extra = self.signer.as_ref().map(|s| s.forward_headers());
        if extra.is_some() || !forward.credentials {
            let drop: Vec<http::HeaderName> = req
                .headers
                .keys()
                .filter(|n| {
                    let n = n.as_str();
                    extra.is_some_and(|e| !crate::boundary::s3::forward_header(n, e))
                        || (!forward.credentials && !crate::boundary::fallback_header(n))
                })
                .cloned()
                .collect();
            for n in &drop {
                req.remove_header(n);
            }
        }
        let query = match query {
            Some(q) if !forward.credentials => Some(crate::boundary::without_credentials(q)),
            q => q.map(std::borrow::Cow::Borrowed),
        };
        let query = query.as_deref().filter(|q| !q.is_empty());
        let mut target =
            String::with_capacity(self.prefix.len() + key.len() + 1 + query.map_or(0, str::len));
        target.push_str(&self.prefix);
        if self.signer.is_some() {
            target.push_str(&s3_canonical_path(key));
        } else {
            target.push_str(key);
        }
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        let uri = http::Uri::try_from(target).map_err(|e| format!("bad upstream path: {e}"))?;
        req.set_uri(uri);
        req.insert_header(http::header::HOST, &self.host_header)
            .map_err(|e| e.to_string())?;
        if let Some(signer) = &self.signer {
            // `sign` drops the client's Authorization before adding its own.
            signer.sign(req, &self.url_base, SystemTime::now())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::S3Signing;

    fn http_origin(prefix: &str, s3: bool) -> Origin {
        let cfg = OriginConfig {
            name: "o".into(),
            kind: OriginKind::Http {
                tls: false,
                tls_verify: true,
                host: "127.0.0.1".into(),
                port: 9000,
                host_header: "127.0.0.1:9000".into(),
                prefix: prefix.into(),
                s3: s3.then(|| S3Signing {
                    region: "us-east-1".into(),
                    service: "s3".into(),
                    credentials: aws_credential_types::Credentials::new(
                        "AK", "SK", None, None, "t",
                    ),
                    forward_headers: Vec::new(),
                }),
            },
            read_only: false,
            timeouts: Timeouts::default(),
        };
        Origin::new(&cfg, None).unwrap()
    }

    #[test]
    fn path_style_rewrite() {
        let o = http_origin("/bucket", false);
        let mut req = RequestHeader::build("GET", b"/ignored", None).unwrap();
        req.insert_header("host", "media.example.com").unwrap();
        req.insert_header("authorization", "Bearer x").unwrap();
        req.insert_header("cookie", "s=1").unwrap();
        let main = Forward { credentials: true };
        o.rewrite(&mut req, "/a/b%20c.jpg", Some("v=1"), main)
            .unwrap();
        assert_eq!(req.uri.to_string(), "/bucket/a/b%20c.jpg?v=1");
        assert_eq!(req.headers.get("host").unwrap(), "127.0.0.1:9000");
        // unsigned origins see the client's credentials (they may be the origin's own scheme)
        assert_eq!(req.headers.get("authorization").unwrap(), "Bearer x");
        // ... but not as a fallback: another trust domain
        req.insert_header("x-api-key", "k").unwrap();
        req.insert_header("range", "bytes=0-1").unwrap();
        let q = Some("w=1&X-Amz-Credential=c&access_token=t&X-Amz-Signature=s");
        o.rewrite(&mut req, "/a", q, Forward { credentials: false })
            .unwrap();
        for gone in ["authorization", "cookie", "x-api-key"] {
            assert!(req.headers.get(gone).is_none(), "{gone}");
        }
        assert_eq!(req.headers.get("range").unwrap(), "bytes=0-1");
        assert_eq!(req.uri.to_string(), "/bucket/a?w=1");
    }

    #[test]
    fn signed_origins_get_the_allowlist_only() {
        let o = http_origin("/bucket", true);
        let mut req = RequestHeader::build("PUT", b"/x", None).unwrap();
        for (k, v) in [
            ("x-amz-copy-source", "bucket/other/secret"),
            ("x-amz-acl", "public-read"),
            ("x-amz-grant-read", "id=1"),
            ("x-amz-meta-owner", "me"),
            ("x-amz-checksum-crc32", "AAAAAA=="),
            ("content-type", "image/png"),
            ("cookie", "s=1"),
            ("if-none-match", "*"),
        ] {
            req.insert_header(k, v).unwrap();
        }
        o.rewrite(&mut req, "/k", None, Forward { credentials: true })
            .unwrap();
        for gone in [
            "x-amz-copy-source",
            "x-amz-acl",
            "x-amz-grant-read",
            "cookie",
        ] {
            assert!(req.headers.get(gone).is_none(), "{gone}");
        }
        for kept in [
            "x-amz-meta-owner",
            "x-amz-checksum-crc32",
            "content-type",
            "if-none-match",
        ] {
            assert!(req.headers.get(kept).is_some(), "{kept}");
        }
        let auth = req.headers.get("authorization").unwrap().to_str().unwrap();
        assert!(
            !auth.contains("x-amz-acl") && auth.contains("x-amz-meta-owner"),
            "{auth}"
        );
    }

    #[test]
    fn signed_rewrite_replaces_authorization_each_time() {
        let o = http_origin("/bucket", true);
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("authorization", "Bearer client").unwrap();
        o.rewrite(&mut req, "/k(1).jpg", None, Forward { credentials: true })
            .unwrap();
        assert_eq!(req.uri.to_string(), "/bucket/k%281%29.jpg");
        let auth = req.headers.get("authorization").unwrap().to_str().unwrap();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 "), "{auth}");
        assert_eq!(req.headers.get_all("authorization").iter().count(), 1);
    }
}
