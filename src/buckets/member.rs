//! cascade's own requests to a bucket set's members, signed like any request through the
//! member's origin: `HEAD` of one key (where is it? how big?) and `ListObjectsV2`, paginated,
//! for a reconcile.

use std::sync::LazyLock;
use std::time::Duration;

use pingora_core::connectors::http::Connector;

use crate::origin::fetch::{fetch, Fetched, Own};
use crate::origin::Origin;

/// One connector (and connection pool) for every member request.
static CONNECTOR: LazyLock<Connector> = LazyLock::new(|| Connector::new(None));

/// A listing page larger than this is refused (S3 pages are 1,000 keys, well under 1 MiB).
const MAX_PAGE: usize = 16 << 20;

async fn request(
    origin: &Origin,
    method: http::Method,
    key: &str,
    query: Option<&str>,
    limit: usize,
) -> Result<Fetched, String> {
    let peer_ix = origin
        .pick(key, 0)
        .ok_or_else(|| format!("origin `{}` has no usable peer", origin.name))?;
    fetch(
        &CONNECTOR,
        &origin.peers[peer_ix],
        Own {
            method,
            key,
            query,
            agent: "cascade-bucket-set",
            limit,
            pool: true,
        },
    )
    .await
}

/// Is `key` on this member? `Ok(Some(size))`: yes; `Ok(None)`: no (404, or 403 as S3 answers
/// without ListBucket); `Err`: the member could not say.
pub async fn head(origin: &Origin, key: &str, timeout: Duration) -> Result<Option<u64>, String> {
    let a = tokio::time::timeout(timeout, request(origin, http::Method::HEAD, key, None, 0))
        .await
        .map_err(|_| format!("timeout after {timeout:?}"))??;
    match a.status {
        200..=299 => Ok(Some(a.length.unwrap_or(0))),
        403 | 404 => Ok(None),
        s => Err(format!("status {s}")),
    }
}

/// Every object of the member: (canonical key, size). One signed ListObjectsV2 per 1,000
/// keys.
pub async fn list(origin: &Origin, timeout: Duration) -> Result<Vec<(String, u64)>, String> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut query = String::from("list-type=2&max-keys=1000");
        if let Some(t) = &token {
            query.push_str("&continuation-token=");
            query.push_str(
                &percent_encoding::utf8_percent_encode(t, percent_encoding::NON_ALPHANUMERIC)
                    .to_string(),
            );
        }
        let a = tokio::time::timeout(
            timeout,
            request(origin, http::Method::GET, "/", Some(&query), MAX_PAGE),
        )
        .await
        .map_err(|_| format!("listing timed out after {timeout:?}"))??;
        if a.status != 200 {
            return Err(format!(
                "listing answered {}: {}",
                a.status,
                String::from_utf8_lossy(&a.body[..a.body.len().min(300)])
            ));
        }
        if a.truncated {
            return Err(format!("a listing page over {MAX_PAGE} bytes"));
        }
        let page = parse_page(&a.body)?;
        out.extend(page.objects);
        match page.next {
            Some(t) if page.truncated => token = Some(t),
            _ => return Ok(out),
        }
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct Page {
    pub objects: Vec<(String, u64)>,
    pub truncated: bool,
    pub next: Option<String>,
}

/// A ListObjectsV2 answer: keys become cascade's canonical keys (`/` + the key in the
/// normal percent-encoding), the form the index is keyed by.
pub fn parse_page(xml: &[u8]) -> Result<Page, String> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_reader(xml);
    let mut page = Page::default();
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut key: Option<String> = None;
    let mut size: Option<u64> = None;
    let mut buf = Vec::new();
    let mut root_seen = false;
    loop {
        match r.read_event_into(&mut buf) {
            Err(e) => return Err(format!("listing is not XML: {e}")),
            Ok(Event::Eof) => break,
            Ok(Event::Start(e)) => {
                if path.is_empty() {
                    // Anything else (an object that happens to be XML, an error document)
                    // must never read as "this member is empty".
                    if e.local_name().as_ref() != b"ListBucketResult" {
                        return Err("the answer is not a ListBucketResult".into());
                    }
                    root_seen = true;
                }
                path.push(e.local_name().as_ref().to_vec());
            }
            Ok(Event::End(e)) => {
                if e.local_name().as_ref() == b"Contents" {
                    match (key.take(), size.take()) {
                        (Some(k), Some(s)) => {
                            let mut canon = String::with_capacity(k.len() + 1);
                            canon.push('/');
                            crate::boundary::path::encode_into(&mut canon, k.as_bytes());
                            page.objects.push((canon, s));
                        }
                        _ => return Err("listing entry without Key or Size".into()),
                    }
                }
                path.pop();
            }
            Ok(Event::Text(t)) => {
                let text = t
                    .decode()
                    .map_err(|e| format!("listing text: {e}"))
                    .and_then(|s| {
                        quick_xml::escape::unescape(&s)
                            .map(|c| c.into_owned())
                            .map_err(|e| format!("listing text: {e}"))
                    })?;
                let names: Vec<&[u8]> = path.iter().map(Vec::as_slice).collect();
                match names.as_slice() {
                    [.., b"Contents", b"Key"] => {
                        key = Some(key.unwrap_or_default() + &text);
                    }
                    [.., b"Contents", b"Size"] => {
                        size = Some(
                            text.trim()
                                .parse()
                                .map_err(|_| format!("bad Size {text:?}"))?,
                        )
                    }
                    [_, b"IsTruncated"] => page.truncated = text.trim() == "true",
                    [_, b"NextContinuationToken"] => page.next = Some(text),
                    _ => {}
                }
            }
            Ok(Event::GeneralRef(e)) => {
                // An entity in a key (`&amp;`): resolved and appended to the key being read.
                let names: Vec<&[u8]> = path.iter().map(Vec::as_slice).collect();
                if let [.., b"Contents", b"Key"] = names.as_slice() {
                    let name = e.decode().map_err(|e| format!("listing text: {e}"))?;
                    let ch = match &*name {
                        "amp" => "&".to_string(),
                        "lt" => "<".to_string(),
                        "gt" => ">".to_string(),
                        "quot" => "\"".to_string(),
                        "apos" => "'".to_string(),
                        n => match e.resolve_char_ref() {
                            Ok(Some(c)) => c.to_string(),
                            _ => return Err(format!("unknown entity &{n};")),
                        },
                    };
                    key = Some(key.unwrap_or_default() + &ch);
                }
            }
            Ok(_) => {}
        }
        buf.clear();
    }
    if !root_seen {
        return Err("the answer is not a ListBucketResult".into());
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_parse_into_canonical_keys() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>
<Contents><Key>a/b.txt</Key><Size>12</Size></Contents>
<Contents><Key>caf&#233; &amp; co;x</Key><Size>3</Size></Contents>
<IsTruncated>true</IsTruncated><NextContinuationToken>tok/1=</NextContinuationToken>
</ListBucketResult>"#;
        let p = parse_page(xml).unwrap();
        assert_eq!(
            p.objects,
            vec![
                ("/a/b.txt".to_string(), 12),
                ("/caf%C3%A9%20&%20co%3Bx".to_string(), 3)
            ]
        );
        assert!(p.truncated);
        assert_eq!(p.next.as_deref(), Some("tok/1="));
    }

    #[test]
    fn hostile_listings_are_refused() {
        assert!(parse_page(b"<ListBucketResult><Contents><Key>x</Key></Contents>").is_err());
        assert!(parse_page(b"<ListBucketResult><Contents><Key>x</Key><Size>-1</Size></Contents></ListBucketResult>").is_err());
        assert!(parse_page(b"<a><b></a>").is_err());
        assert!(parse_page(b"<Error><Code>AccessDenied</Code></Error>").is_err());
        assert!(
            parse_page(b"").is_err(),
            "an empty answer is not an empty member"
        );
    }
}
