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

    /// Rewrite the upstream request for this origin: `key` is the object path (starts with
    /// `/`, raw as the client sent it after any route prefix strip), `query` the raw query.
    pub fn rewrite(
        &self,
        req: &mut RequestHeader,
        key: &str,
        query: Option<&str>,
    ) -> Result<(), String> {
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
        o.rewrite(
            &mut req,
            "/a/b c.jpg".replace(' ', "%20").as_str(),
            Some("v=1"),
        )
        .unwrap();
        assert_eq!(req.uri.to_string(), "/bucket/a/b%20c.jpg?v=1");
        assert_eq!(req.headers.get("host").unwrap(), "127.0.0.1:9000");
        // unsigned origins see the client's credentials (they may be the origin's own scheme)
        assert_eq!(req.headers.get("authorization").unwrap(), "Bearer x");
    }

    #[test]
    fn signed_rewrite_replaces_authorization_each_time() {
        let o = http_origin("/bucket", true);
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("authorization", "Bearer client").unwrap();
        o.rewrite(&mut req, "/k(1).jpg", None).unwrap();
        assert_eq!(req.uri.to_string(), "/bucket/k%281%29.jpg");
        let auth = req.headers.get("authorization").unwrap().to_str().unwrap();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 "), "{auth}");
        assert_eq!(req.headers.get_all("authorization").iter().count(), 1);
    }
}
