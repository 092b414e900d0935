//! What a client may make cascade sign: the S3 policy of groups with a signed origin.
//!
//! cascade's credentials sign only what cascade chose to send. A request through a group
//! with a signed origin is checked here before any plugin or origin sees it:
//!
//! - **Queries**: the multipart operations (`uploads` with POST; `uploadId` with PUT, POST,
//!   DELETE, GET; `partNumber` with PUT, GET, HEAD) are forwarded. S3 sub-resources and
//!   overrides (`acl`, `tagging`, `versionId`, listings, `response-content-type`, ...) are
//!   refused with 403 unless the route lists them in `s3_allow`, and even then for reads
//!   (GET, HEAD) only. Anything else (cache busters,
//!   a plugin's signed-URL parameters, presigned-URL leftovers, `x-id`) is dropped: S3 ignores
//!   it, so it must not split the cache either.
//! - **The bucket itself**: an empty object key is the bucket (GET lists it, PUT creates it,
//!   DELETE deletes it): refused unless the route allows `list` (GET/HEAD only).
//! - **Headers** ([`forward_header`]): an allowlist (content headers, conditionals, `Range`,
//!   `x-amz-meta-*`, the checksum and streaming-upload headers SDKs send), extended per origin
//!   by `s3.forward_headers`. Every other `x-amz-*` (ACLs, grants, object lock, tagging,
//!   website redirects, SSE, storage class) is dropped before signing.
//! - `x-amz-copy-source` is refused (403): a copy's source would be outside the route's
//!   confinement. Payloads signed chunk by chunk with the client's key
//!   (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD`) cannot be re-signed: 400.

use http::{HeaderMap, Method};

/// S3 query parameters that select a sub-resource or change the answer: refused unless the
/// route allows them. `list` (not a parameter) stands for the bucket listing.
pub const SUBRESOURCES: &[&str] = &[
    "list",
    "accelerate",
    "acl",
    "analytics",
    "attributes",
    "continuation-token",
    "cors",
    "delete",
    "delimiter",
    "encoding-type",
    "encryption",
    "fetch-owner",
    "intelligent-tiering",
    "inventory",
    "key-marker",
    "legal-hold",
    "lifecycle",
    "list-type",
    "location",
    "logging",
    "marker",
    "max-keys",
    "max-parts",
    "max-uploads",
    "metadataTable",
    "metrics",
    "notification",
    "object-lock",
    "ownershipControls",
    "part-number-marker",
    "policy",
    "policyStatus",
    "prefix",
    "publicAccessBlock",
    "renameObject",
    "replication",
    "requestPayment",
    "response-cache-control",
    "response-content-disposition",
    "response-content-encoding",
    "response-content-language",
    "response-content-type",
    "response-expires",
    "restore",
    "retention",
    "select",
    "select-type",
    "session",
    "start-after",
    "tagging",
    "torrent",
    "upload-id-marker",
    "version-id-marker",
    "versionId",
    "versioning",
    "versions",
    "website",
];

/// The listing parameters `list` enables together.
const LISTING: &[&str] = &[
    "list-type",
    "prefix",
    "delimiter",
    "marker",
    "max-keys",
    "continuation-token",
    "start-after",
    "encoding-type",
    "fetch-owner",
];

/// The sub-resources a route enables (indices into [`SUBRESOURCES`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allow(u64);

impl Allow {
    /// From the route's `s3_allow` names; `Err((index, message))` names the bad entry.
    pub fn parse(names: &[String]) -> Result<Allow, (usize, String)> {
        const _: () = assert!(SUBRESOURCES.len() <= 64);
        let mut bits = 0u64;
        for (i, n) in names.iter().enumerate() {
            let Some(ix) = SUBRESOURCES.iter().position(|s| s == n) else {
                return Err((
                    i,
                    format!(
                        "unknown S3 sub-resource `{n}` (known: {})",
                        SUBRESOURCES.join(", ")
                    ),
                ));
            };
            bits |= 1 << ix;
            if n == "list" {
                for l in LISTING {
                    bits |= 1 << SUBRESOURCES.iter().position(|s| s == l).expect("listed");
                }
            }
        }
        Ok(Allow(bits))
    }

    fn allows(&self, name: &str) -> bool {
        SUBRESOURCES
            .iter()
            .position(|s| *s == name)
            .is_some_and(|ix| self.0 & (1 << ix) != 0)
    }
}

/// Headers the signer sets itself: never taken from a client.
pub fn signer_owned(name: &str) -> bool {
    matches!(
        name,
        "authorization" | "x-amz-date" | "x-amz-content-sha256" | "x-amz-security-token" | "host"
    )
}

/// Does a client header go to a signed origin? `name` is lower-case (as `http` keeps them).
pub fn forward_header(name: &str, extra: &[String]) -> bool {
    let builtin = match name {
        "content-type"
        | "content-encoding"
        | "content-disposition"
        | "content-language"
        | "content-md5"
        | "cache-control"
        | "expires"
        | "range"
        | "content-length"
        | "transfer-encoding"
        | "expect"
        | "accept"
        | "accept-encoding"
        | "user-agent"
        | "origin"
        | "access-control-request-method"
        | "access-control-request-headers"
        | "x-amz-sdk-checksum-algorithm"
        | "x-amz-trailer"
        | "x-amz-decoded-content-length" => true,
        // Read (and replaced) by the signer: it keeps STREAMING-UNSIGNED-PAYLOAD-TRAILER.
        "x-amz-content-sha256" => true,
        n => {
            n.starts_with("if-") || n.starts_with("x-amz-meta-") || n.starts_with("x-amz-checksum-")
        }
    };
    builtin
        || extra.iter().any(|e| match e.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == e,
        })
}

/// A request the S3 policy refuses: status, S3 error code, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    fn denied(message: String) -> Refusal {
        Refusal {
            status: 403,
            code: "AccessDenied",
            message,
        }
    }

    /// The S3-style XML body (what SDKs parse into an error code and message).
    pub fn xml(&self, resource: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message><Resource>{}</Resource><RequestId>cascade</RequestId></Error>\n",
            self.code,
            crate::origin::dir::xml_escape(&self.message),
            crate::origin::dir::xml_escape(resource)
        )
    }
}

/// What the policy made of a request's query.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Query {
    /// What goes upstream (and into the cache key): the forwarded pairs as the client wrote
    /// them, in their order. `None`: nothing.
    pub forward: Option<String>,
    /// The forwarded query names an operation or a sub-resource: its answer is not the
    /// object, so it is never cached.
    pub not_object: bool,
}

/// The name of one `k=v` pair, percent-decoded (S3 decodes names too). `None`: malformed.
fn pair_name(pair: &str) -> Option<String> {
    let raw = pair.split_once('=').map_or(pair, |(k, _)| k);
    let d = super::path::decode(raw.as_bytes())?;
    String::from_utf8(d).ok()
}

/// Applies the policy to a request through a signed group. `key` is the canonical object
/// path (starts with `/`), `query` the client's (after plugins).
pub fn check(
    method: &Method,
    key: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    allow: &Allow,
) -> Result<Query, Refusal> {
    if headers.contains_key("x-amz-copy-source") {
        return Err(Refusal::denied(
            "copying objects (x-amz-copy-source) is not allowed through cascade".into(),
        ));
    }
    if let Some(v) = headers.get("x-amz-content-sha256") {
        if v.as_bytes().starts_with(b"STREAMING-AWS4-") {
            return Err(Refusal {
                status: 400,
                code: "InvalidRequest",
                message: "payloads signed chunk by chunk with the client's key cannot be re-signed by cascade; send UNSIGNED-PAYLOAD or STREAMING-UNSIGNED-PAYLOAD-TRAILER".into(),
            });
        }
    }
    let read = matches!(*method, Method::GET | Method::HEAD);
    let bucket = key == "/";
    if bucket && !(read && allow.allows("list")) {
        return Err(Refusal::denied(format!(
            "{method} on the bucket itself (an empty object key) is not allowed through this route"
        )));
    }
    let mut out = Query::default();
    let Some(q) = query.filter(|q| !q.is_empty()) else {
        return Ok(out);
    };
    let mut fwd = String::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let Some(name) = pair_name(pair) else {
            return Err(Refusal {
                status: 400,
                code: "InvalidArgument",
                message: "malformed percent-encoding in the query".into(),
            });
        };
        let op = match name.as_str() {
            "uploads" => *method == Method::POST,
            "uploadId" => matches!(
                *method,
                Method::PUT | Method::POST | Method::DELETE | Method::GET
            ),
            "partNumber" => matches!(*method, Method::PUT | Method::GET | Method::HEAD),
            _ => false,
        };
        let forward = if op {
            true
        } else if name == "uploads" || name == "uploadId" || name == "partNumber" {
            return Err(Refusal::denied(format!(
                "`{name}` is not allowed with {method}"
            )));
        } else if SUBRESOURCES.contains(&name.as_str()) && name != "list" {
            if !allow.allows(&name) {
                return Err(Refusal::denied(format!(
                    "the S3 sub-resource `{name}` is not allowed through this route"
                )));
            }
            // `s3_allow` opens reads only: `DELETE ?versionId`, `PUT ?acl`, `PUT ?tagging`
            // would let any writer rewrite history or permissions with cascade's keys.
            if !read {
                return Err(Refusal::denied(format!(
                    "the S3 sub-resource `{name}` is allowed through this route for reads (GET, HEAD) only"
                )));
            }
            // Listing parameters only make sense on the bucket.
            if LISTING.contains(&name.as_str()) && !bucket {
                return Err(Refusal::denied(format!(
                    "`{name}` is only allowed on a bucket listing"
                )));
            }
            true
        } else {
            false
        };
        if forward {
            out.not_object = true;
            if !fwd.is_empty() {
                fwd.push('&');
            }
            fwd.push_str(pair);
        }
    }
    if bucket {
        out.not_object = true;
    }
    out.forward = (!fwd.is_empty()).then_some(fwd);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(method: &str, key: &str, query: Option<&str>, allow: &[&str]) -> Result<Query, u16> {
        let allow =
            Allow::parse(&allow.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("known");
        check(
            &Method::from_bytes(method.as_bytes()).unwrap(),
            key,
            query,
            &HeaderMap::new(),
            &allow,
        )
        .map_err(|r| r.status)
    }

    fn fwd(method: &str, key: &str, query: &str) -> Option<String> {
        run(method, key, Some(query), &[]).unwrap().forward
    }

    #[test]
    fn multipart_operations_pass() {
        assert_eq!(fwd("POST", "/k", "uploads"), Some("uploads".into()));
        assert_eq!(fwd("POST", "/k", "uploads="), Some("uploads=".into()));
        assert_eq!(
            fwd("PUT", "/k", "partNumber=2&uploadId=abc%2F"),
            Some("partNumber=2&uploadId=abc%2F".into())
        );
        assert_eq!(fwd("POST", "/k", "uploadId=u"), Some("uploadId=u".into()));
        assert_eq!(fwd("DELETE", "/k", "uploadId=u"), Some("uploadId=u".into()));
        assert_eq!(
            fwd("GET", "/k", "partNumber=1"),
            Some("partNumber=1".into())
        );
        assert!(
            run("GET", "/k", Some("partNumber=1"), &[])
                .unwrap()
                .not_object
        );
    }

    #[test]
    fn other_parameters_are_dropped() {
        assert_eq!(fwd("GET", "/k", "v=3&expires=1&signature=ab"), None);
        assert_eq!(fwd("GET", "/k", "x-id=GetObject"), None);
        assert_eq!(
            fwd("GET", "/k", "X-Amz-Signature=x&X-Amz-Credential=y"),
            None
        );
        assert_eq!(
            fwd("PUT", "/k", "x-id=UploadPart&partNumber=1&uploadId=u"),
            Some("partNumber=1&uploadId=u".into())
        );
        assert!(!run("GET", "/k", Some("v=1"), &[]).unwrap().not_object);
    }

    #[test]
    fn subresources_are_refused_unless_allowed() {
        for q in [
            "acl",
            "tagging",
            "versionId=3",
            "version%49d=3",
            "response-content-type=text/html",
            "delete",
            "retention",
            "legal-hold",
            "list-type=2",
        ] {
            assert_eq!(run("GET", "/k", Some(q), &[]), Err(403), "{q}");
        }
        assert_eq!(run("GET", "/k", Some("uploads"), &[]), Err(403));
        assert_eq!(run("PUT", "/k", Some("partNumber=1&acl"), &[]), Err(403));
        // Allowed sub-resources are for reads: a writer cannot delete versions or set ACLs.
        assert_eq!(
            run("DELETE", "/k", Some("versionId=3"), &["versionId"]),
            Err(403)
        );
        assert_eq!(run("PUT", "/k", Some("acl"), &["acl"]), Err(403));
        assert_eq!(run("PUT", "/k", Some("tagging"), &["tagging"]), Err(403));
        assert_eq!(
            run("GET", "/k", Some("acl"), &["acl"]).map(|q| q.forward),
            Ok(Some("acl".into()))
        );
        let ok = run("GET", "/k", Some("versionId=3&v=1"), &["versionId"]).unwrap();
        assert_eq!(ok.forward.as_deref(), Some("versionId=3"));
        assert!(ok.not_object);
        assert_eq!(run("GET", "/k", Some("%zz=1"), &[]), Err(400));
        assert_eq!(
            fwd("GET", "/k", "a=%zz"),
            None,
            "values are not ours to judge"
        );
    }

    #[test]
    fn the_bucket_itself() {
        assert_eq!(run("GET", "/", None, &[]), Err(403));
        assert_eq!(run("PUT", "/", None, &["list"]), Err(403));
        assert_eq!(run("DELETE", "/", None, &["list"]), Err(403));
        assert_eq!(run("POST", "/", Some("delete"), &["delete"]), Err(403));
        let l = run("GET", "/", Some("list-type=2&prefix=a/"), &["list"]).unwrap();
        assert_eq!(l.forward.as_deref(), Some("list-type=2&prefix=a/"));
        assert_eq!(run("GET", "/k", Some("prefix=a"), &["list"]), Err(403));
    }

    #[test]
    fn copy_and_chunk_signed_payloads() {
        let mut h = HeaderMap::new();
        h.insert("x-amz-copy-source", "bucket/other/secret".parse().unwrap());
        let e = check(&Method::PUT, "/k", None, &h, &Allow::default()).unwrap_err();
        assert_eq!(e.status, 403);
        assert!(e.xml("/k").contains("<Code>AccessDenied</Code>"));
        let mut h = HeaderMap::new();
        h.insert(
            "x-amz-content-sha256",
            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD".parse().unwrap(),
        );
        assert_eq!(
            check(&Method::PUT, "/k", None, &h, &Allow::default())
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn header_allowlist() {
        for h in [
            "content-type",
            "if-none-match",
            "if-match",
            "range",
            "x-amz-meta-owner",
            "x-amz-checksum-crc32",
            "x-amz-sdk-checksum-algorithm",
            "x-amz-trailer",
            "x-amz-decoded-content-length",
        ] {
            assert!(forward_header(h, &[]), "{h}");
        }
        for h in [
            "x-amz-acl",
            "x-amz-grant-read",
            "x-amz-copy-source",
            "x-amz-object-lock-mode",
            "x-amz-website-redirect-location",
            "x-amz-server-side-encryption",
            "x-amz-tagging",
            "cookie",
            "authorization",
            "x-forwarded-for",
        ] {
            assert!(!forward_header(h, &[]), "{h}");
        }
        let extra = vec!["x-amz-server-side-encryption*".to_string()];
        assert!(forward_header(
            "x-amz-server-side-encryption-aws-kms-key-id",
            &extra
        ));
        assert!(!forward_header("x-amz-acl", &extra));
        assert_eq!(
            Allow::parse(&["nope".to_string()]).unwrap_err().0,
            0,
            "unknown names are config errors"
        );
    }

    #[test]
    fn xml_is_escaped() {
        let r = Refusal::denied("a <b> & c".into());
        assert!(r.xml("/x<y").contains("a &lt;b&gt; &amp; c"));
        assert!(r.xml("/x<y").contains("<Resource>/x&lt;y</Resource>"));
    }
}
