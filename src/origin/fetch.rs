//! cascade's own requests to a peer — health checks, a bucket set's lookups and listings:
//! one request without a body, rewritten and signed like any request through the peer, its
//! answer's header and up to `limit` body bytes.

use bytes::BytesMut;
use pingora_core::connectors::http::Connector;
use pingora_http::RequestHeader;

use super::{Forward, Peer};

/// An answer to [`fetch`].
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    /// The answer's `Content-Length`, if it said one.
    pub length: Option<u64>,
    /// Up to the limit's bytes of the body.
    pub body: BytesMut,
    /// The body went on past the limit (not read further).
    pub truncated: bool,
}

/// One of cascade's own requests.
#[derive(Debug, Clone)]
pub struct Own<'a> {
    pub method: http::Method,
    /// The canonical key and the query, as a client's would be after admission.
    pub key: &'a str,
    pub query: Option<&'a str>,
    /// `User-Agent`: says which part of cascade asks.
    pub agent: &'static str,
    /// Body bytes to read (0: none).
    pub limit: usize,
    /// A connection whose answer was read whole goes back to the connector's pool; a health
    /// check says `false` to test a fresh connection each time.
    pub pool: bool,
}

/// Sends `r` to `peer` (no client headers, no credentials but the peer's own signature) and
/// reads the answer: its header (1xx skipped) and at most `r.limit` body bytes.
pub async fn fetch(connector: &Connector, peer: &Peer, r: Own<'_>) -> Result<Fetched, String> {
    let Own {
        method,
        key,
        query,
        agent,
        limit,
        pool,
    } = r;
    let head = method == http::Method::HEAD;
    let mut req = RequestHeader::build(method, b"/", Some(4)).map_err(|e| e.to_string())?;
    req.insert_header(http::header::USER_AGENT, agent)
        .map_err(|e| e.to_string())?;
    peer.rewrite(&mut req, key, query, Forward { credentials: false })?;
    let target = peer.http_peer();
    let (mut s, _) = connector
        .get_http_session(&*target)
        .await
        .map_err(|e| format!("connect: {}", e.etype().as_str()))?;
    s.write_request_header(Box::new(req))
        .await
        .map_err(|e| format!("write: {}", e.etype().as_str()))?;
    s.finish_request_body()
        .await
        .map_err(|e| format!("write: {}", e.etype().as_str()))?;
    let (status, length) = loop {
        s.read_response_header()
            .await
            .map_err(|e| format!("read: {}", e.etype().as_str()))?;
        let h = s.response_header().ok_or("no answer")?;
        if !h.status.is_informational() {
            let len = h
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            break (h.status.as_u16(), len);
        }
    };
    let mut body = BytesMut::new();
    let mut whole = head;
    let mut truncated = false;
    if limit > 0 && !head {
        loop {
            match s
                .read_response_body()
                .await
                .map_err(|e| format!("read: {}", e.etype().as_str()))?
            {
                Some(chunk) => {
                    let room = limit - body.len();
                    if chunk.len() > room {
                        body.extend_from_slice(&chunk[..room]);
                        truncated = true;
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                None => {
                    whole = true;
                    break;
                }
            }
        }
    }
    if pool && whole {
        connector
            .release_http_session(
                s,
                &*target,
                pingora_core::upstreams::peer::Peer::idle_timeout(&*target),
            )
            .await;
    }
    Ok(Fetched {
        status,
        length,
        body,
        truncated,
    })
}
