//! SigV4 signing of upstream requests (aws-sigv4), so private buckets work behind cascade.
//!
//! Only the headers that S3 requires to be signed go into the signature (host, content-type,
//! content-md5 and every `x-amz-*`), so nothing a proxy may legitimately touch afterwards
//! (hop-by-hop headers, `Transfer-Encoding`) can invalidate it. Bodies are never hashed:
//! uploads stream, so the payload is `UNSIGNED-PAYLOAD` (S3 accepts it over TLS and plain HTTP).

use std::time::SystemTime;

use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use pingora_http::RequestHeader;

use crate::config::S3Signing;

/// A signer for one origin: the identity is built once, not per request.
pub struct Signer {
    identity: Identity,
    region: String,
    service: String,
    forward_headers: Vec<String>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("region", &self.region)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

const STREAMING_UNSIGNED_TRAILER: &str = "STREAMING-UNSIGNED-PAYLOAD-TRAILER";

fn signed_header(name: &str) -> bool {
    name == "host"
        || name == "content-type"
        || name == "content-md5"
        || (name.starts_with("x-amz-")
            && name != "x-amz-date"
            && name != "x-amz-content-sha256"
            && name != "x-amz-security-token")
}

impl Signer {
    pub fn new(cfg: &S3Signing) -> Signer {
        Signer {
            identity: cfg.credentials.clone().into(),
            region: cfg.region.clone(),
            service: cfg.service.clone(),
            forward_headers: cfg.forward_headers.clone(),
        }
    }

    /// The origin's extra forwarded headers (`s3.forward_headers`).
    pub fn forward_headers(&self) -> &[String] {
        &self.forward_headers
    }

    /// Sign `req` in place for `url_base` (`http://host:port`), at `now`. The request's URI
    /// must already be the final upstream path and query, and its Host header set.
    pub fn sign(
        &self,
        req: &mut RequestHeader,
        url_base: &str,
        now: SystemTime,
    ) -> Result<(), String> {
        // An aws-chunked upload with unsigned chunks and trailing checksums (what SDKs send
        // with flexible checksums) keeps its payload mode: S3 needs it to read the framing.
        // Anything else is signed as UNSIGNED-PAYLOAD (chunk-signed modes were refused at
        // admission: their chunk signatures belong to the client's key).
        let streaming = req
            .headers
            .get("x-amz-content-sha256")
            .is_some_and(|v| v.as_bytes() == STREAMING_UNSIGNED_TRAILER.as_bytes());
        // Anything the client sent in these slots must not survive: the signer sets them.
        for h in [
            "authorization",
            "x-amz-date",
            "x-amz-content-sha256",
            "x-amz-security-token",
        ] {
            req.remove_header(h);
        }
        let uri = format!(
            "{url_base}{}",
            req.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let headers: Vec<(&str, &str)> = req
            .headers
            .iter()
            .filter(|(n, _)| signed_header(n.as_str()))
            .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str(), v)))
            .collect();

        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name(&self.service)
            .time(now)
            .settings(settings)
            .build()
            .map_err(|e| e.to_string())?
            .into();
        let body = if streaming {
            SignableBody::Precomputed(STREAMING_UNSIGNED_TRAILER.into())
        } else {
            SignableBody::UnsignedPayload
        };
        let signable = SignableRequest::new(req.method.as_str(), &uri, headers.into_iter(), body)
            .map_err(|e| e.to_string())?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| e.to_string())?
            .into_parts();
        for (name, value) in instructions.headers() {
            req.insert_header(name.to_string(), value.to_string())
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// S3's canonical form of a key path: percent-decoded, then every byte outside the
/// unreserved set (and `/`) encoded as `%XX`. Signing this exact string avoids mismatches
/// when clients encode differently (`(`, `!`, `+`, UTF-8).
pub fn s3_canonical_path(raw: &str) -> String {
    use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const S3: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    let decoded = percent_decode_str(raw).decode_utf8_lossy();
    utf8_percent_encode(&decoded, S3).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn signer() -> Signer {
        Signer::new(&S3Signing {
            region: "us-east-1".into(),
            service: "s3".into(),
            credentials: aws_credential_types::Credentials::new(
                "AKIDEXAMPLE",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                None,
                None,
                "t",
            ),
            forward_headers: Vec::new(),
        })
    }

    #[test]
    fn signs_and_replaces_client_authorization() {
        let mut req = RequestHeader::build("GET", b"/bucket/a%20b.jpg?versionId=1", None).unwrap();
        req.insert_header("host", "127.0.0.1:9000").unwrap();
        req.insert_header("authorization", "Bearer client-token")
            .unwrap();
        req.insert_header("x-amz-meta-owner", "me").unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        signer().sign(&mut req, "http://127.0.0.1:9000", t).unwrap();
        let auth = req.headers.get("authorization").unwrap().to_str().unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/us-east-1/s3/aws4_request"
            ),
            "{auth}"
        );
        assert!(
            auth.contains("SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-meta-owner"),
            "{auth}"
        );
        assert_eq!(
            req.headers.get("x-amz-content-sha256").unwrap(),
            "UNSIGNED-PAYLOAD"
        );
        assert_eq!(req.headers.get("x-amz-date").unwrap(), "20231114T221320Z");
        assert!(!format!("{:?}", signer()).contains("wJalr"));
    }

    #[test]
    fn streaming_unsigned_trailer_keeps_its_payload_mode() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut req = RequestHeader::build("PUT", b"/bucket/k", None).unwrap();
        req.insert_header("host", "h").unwrap();
        req.insert_header("x-amz-content-sha256", STREAMING_UNSIGNED_TRAILER)
            .unwrap();
        req.insert_header("x-amz-trailer", "x-amz-checksum-crc32")
            .unwrap();
        signer().sign(&mut req, "http://h", t).unwrap();
        assert_eq!(
            req.headers.get("x-amz-content-sha256").unwrap(),
            STREAMING_UNSIGNED_TRAILER
        );
        // A client's own hash is not trusted as ours.
        let mut req = RequestHeader::build("PUT", b"/bucket/k", None).unwrap();
        req.insert_header("host", "h").unwrap();
        req.insert_header("x-amz-content-sha256", "deadbeef")
            .unwrap();
        signer().sign(&mut req, "http://h", t).unwrap();
        assert_eq!(
            req.headers.get("x-amz-content-sha256").unwrap(),
            "UNSIGNED-PAYLOAD"
        );
    }

    #[test]
    fn signature_depends_on_path_and_method() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let sig = |m: &str, p: &str| {
            let mut req = RequestHeader::build(m, p.as_bytes(), None).unwrap();
            req.insert_header("host", "h").unwrap();
            signer().sign(&mut req, "http://h", t).unwrap();
            req.headers
                .get("authorization")
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        };
        assert_ne!(sig("GET", "/a"), sig("GET", "/b"));
        assert_ne!(sig("GET", "/a"), sig("HEAD", "/a"));
        assert_eq!(sig("GET", "/a"), sig("GET", "/a"));
    }

    #[test]
    fn canonical_paths() {
        assert_eq!(s3_canonical_path("/a b/c.jpg"), "/a%20b/c.jpg");
        assert_eq!(
            s3_canonical_path("/a%20b/(1)!.jpg"),
            "/a%20b/%281%29%21.jpg"
        );
        assert_eq!(s3_canonical_path("/caf%C3%A9"), "/caf%C3%A9");
        assert_eq!(s3_canonical_path("/x~y_z-1.2"), "/x~y_z-1.2");
        assert_eq!(s3_canonical_path("/a+b"), "/a%2Bb");
    }
}
