//! Properties (`proxy_get_property` / `proxy_set_property`): what a plugin can read about the
//! request, and cascade's writable routing properties.
//!
//! Readable: `request.{path,url_path,host,method,scheme,query,protocol}`,
//! `request.headers.<name>`, `source.{address,port}`, `plugin_name`, `plugin_root_id`,
//! `cascade.{route,origin_group,upstream_path}`; in the response phase and later also
//! `response.code`, `response.headers.<name>`, `cascade.served_from`, `cascade.cache_status`.
//! Numbers (`source.port`, `response.code`) are 8-byte little-endian integers, as in Envoy.
//!
//! Writable (request phase only): `cascade.origin_group` (a group name) and
//! `cascade.upstream_path` (an object path starting with `/`). A bad value does not fail the
//! call (the Rust SDK traps on any error status); it fails the request with 500 and a log
//! line naming the plugin. Any other path is stored for the request and readable back by
//! every plugin of the chain (Envoy's filter state), and the call returns OK, within bounds
//! (`limits::MAX_PROPERTIES` per request, `MAX_PROPERTY_VALUE` per value,
//! `MAX_PROPERTY_BYTES` in all): past them it is refused (`BAD_ARGUMENT`, as Envoy answers a
//! value it cannot set).

use super::host::{authority, Env, Phase, PluginInfo};
use super::limits::{MAX_PROPERTIES, MAX_PROPERTY_BYTES, MAX_PROPERTY_VALUE};
use super::{Names, RequestInfo};

/// The longest object path a plugin may route to (S3 keys are at most 1 KiB).
const MAX_UPSTREAM_PATH: usize = 16 << 10;

fn put(out: &mut Vec<u8>, b: &[u8]) -> bool {
    out.extend_from_slice(b);
    true
}

/// Writes the value of `path` into `out`; `false` when there is no such property.
pub fn get(path: &[&[u8]], env: Option<&mut Env>, plugin: &PluginInfo, out: &mut Vec<u8>) -> bool {
    out.clear();
    match path {
        [b"plugin_name"] | [b"plugin_root_id"] => return put(out, plugin.name.as_bytes()),
        [b"plugin_vm_id"] => return true,
        _ => {}
    }
    let Some(env) = env else { return false };
    let late = matches!(
        env.phase,
        Phase::Response | Phase::ResponseBody | Phase::Log
    );
    let (req, resp) = (env.req(), env.resp());
    let req_ok = req.is_some();
    match path {
        [b"request", rest @ ..] if req_ok => {
            let req = req.expect("checked");
            match rest {
                [b"path"] => put(out, req.raw_path()),
                [b"url_path"] => put(out, req.uri.path().as_bytes()),
                [b"host"] => put(out, authority(req)),
                [b"method"] => put(out, req.method.as_str().as_bytes()),
                [b"scheme"] => put(out, b"http"),
                [b"query"] => put(out, req.uri.query().unwrap_or("").as_bytes()),
                [b"protocol"] => put(out, format!("{:?}", req.version).as_bytes()),
                [b"headers", name] => match std::str::from_utf8(name)
                    .ok()
                    .and_then(|n| req.headers.get(n))
                {
                    Some(v) => put(out, v.as_bytes()),
                    None => false,
                },
                _ => false,
            }
        }
        [b"response", rest @ ..] if late && resp.is_some() => {
            let resp = resp.expect("checked");
            match rest {
                [b"code"] => put(out, &(resp.status.as_u16() as i64).to_le_bytes()),
                [b"headers", name] => match std::str::from_utf8(name)
                    .ok()
                    .and_then(|n| resp.headers.get(n))
                {
                    Some(v) => put(out, v.as_bytes()),
                    None => false,
                },
                _ => false,
            }
        }
        [b"cascade", b"served_from"] if late => {
            let from = resp
                .and_then(|r| r.headers.get(crate::proxy::SERVED_FROM))
                .map_or(&b"cascade"[..], |v| v.as_bytes());
            put(out, from)
        }
        // A tick has no request: its (default) request facts would name the first route.
        _ if env.phase == Phase::Tick => false,
        _ => {
            let (info, names) = env.split();
            let (Some(info), Some(names)) = (info, names) else {
                return false;
            };
            match path {
                [b"source", b"address"] => match info.source {
                    Some(a) => put(out, a.to_string().as_bytes()),
                    None => false,
                },
                [b"source", b"port"] => match info.source {
                    Some(a) => put(out, &(a.port() as i64).to_le_bytes()),
                    None => false,
                },
                [b"cascade", b"route"] => match names.routes.get(info.route) {
                    Some(n) => put(out, n.as_bytes()),
                    None => false,
                },
                [b"cascade", b"origin_group"] => match names.groups.get(info.group) {
                    Some(n) => put(out, n.as_bytes()),
                    None => false,
                },
                [b"cascade", b"upstream_path"] => put(out, info.key.as_bytes()),
                [b"cascade", b"cache_status"] if late => {
                    put(out, info.cache_status.unwrap_or("-").as_bytes())
                }
                _ => {
                    let key = path.join(&0u8);
                    match info.custom.iter().find(|(k, _)| *k == key) {
                        Some((_, v)) => put(out, v),
                        None => false,
                    }
                }
            }
        }
    }
}

/// Whether `path` names a custom property (stored for the request), not one of cascade's.
pub fn is_custom(path: &[&[u8]]) -> bool {
    path.first() != Some(&&b"cascade"[..])
}

/// Applies a property write (request phase only; ignored otherwise). `Err`: a custom property
/// refused for its bounds (why).
pub fn set(
    path: &[&[u8]],
    value: &[u8],
    phase: Phase,
    info: &mut RequestInfo,
    names: &Names,
    plugin: &str,
) -> Result<(), String> {
    let lossy = || String::from_utf8_lossy(value).into_owned();
    match path {
        [b"cascade", b"origin_group"] if phase == Phase::Request => {
            match names.groups.iter().position(|g| g.as_bytes() == value) {
                Some(ix) => {
                    info.group = ix;
                    info.routing_changed = true;
                }
                None => {
                    info.route_error = Some(format!(
                        "plugin `{plugin}` set cascade.origin_group to `{}`, which is not a group (defined: {})",
                        lossy(),
                        names.groups.join(", ")
                    ))
                }
            }
        }
        [b"cascade", b"upstream_path"] if phase == Phase::Request => {
            // The same canonical check as a client's path: decoded once, re-encoded in normal
            // form; the route's key mode is applied by `admit::finalize`.
            match crate::boundary::path::canonicalize(value) {
                Ok(_) if value.len() > MAX_UPSTREAM_PATH => {
                    info.route_error = Some(format!(
                        "plugin `{plugin}` set a cascade.upstream_path of {} bytes (at most {MAX_UPSTREAM_PATH})",
                        value.len()
                    ))
                }
                Ok(c) => {
                    info.key = c.path;
                    info.key_changed = true;
                    info.routing_changed = true;
                }
                Err(e) => {
                    info.route_error = Some(format!(
                        "plugin `{plugin}` set cascade.upstream_path to {:?}: {e}",
                        lossy()
                    ))
                }
            }
        }
        [b"cascade", ..] => {} // read-only or out of phase: accepted, ignored
        _ => return set_custom(info, path.join(&0u8), value),
    }
    Ok(())
}

/// Stores custom property `key`, within the bounds of a request's custom properties.
fn set_custom(info: &mut RequestInfo, key: Vec<u8>, value: &[u8]) -> Result<(), String> {
    if value.len() > MAX_PROPERTY_VALUE {
        return Err(format!(
            "a value of {} bytes (at most {MAX_PROPERTY_VALUE})",
            value.len()
        ));
    }
    let others: usize = (info.custom.iter())
        .filter(|(k, _)| *k != key)
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if others + key.len() + value.len() > MAX_PROPERTY_BYTES {
        return Err(format!(
            "custom properties of more than {MAX_PROPERTY_BYTES} bytes for one request"
        ));
    }
    if let Some(slot) = info.custom.iter_mut().find(|(k, _)| *k == key) {
        slot.1 = value.to_vec();
    } else if info.custom.len() < MAX_PROPERTIES {
        info.custom.push((key, value.to_vec()));
    } else {
        return Err(format!(
            "more than {MAX_PROPERTIES} custom properties for one request"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_properties_are_bounded_per_request() {
        let mut info = RequestInfo::default();
        let names = Names::default();
        let set = |info: &mut RequestInfo, k: &str, v: &[u8]| {
            let path: Vec<&[u8]> = vec![b"x", k.as_bytes()];
            set(&path, v, Phase::Request, info, &names, "p")
        };
        for i in 0..MAX_PROPERTIES {
            set(&mut info, &format!("k{i}"), b"v").unwrap();
        }
        let e = set(&mut info, "one-more", b"v").unwrap_err();
        assert!(e.contains("more than 64 custom properties"), "{e}");
        set(&mut info, "k0", b"rewritten").expect("an existing one may change");
        let big = vec![b'x'; MAX_PROPERTY_VALUE + 1];
        assert!(set(&mut info, "k1", &big)
            .unwrap_err()
            .contains("a value of"));
        // The bytes of all of them are bounded too.
        let mut info = RequestInfo::default();
        let v = vec![b'x'; MAX_PROPERTY_VALUE];
        let fit = MAX_PROPERTY_BYTES / (MAX_PROPERTY_VALUE + 8);
        for i in 0..fit {
            set(&mut info, &format!("k{i}"), &v).unwrap();
        }
        let e = set(&mut info, "last", &v).unwrap_err();
        assert!(e.contains("bytes for one request"), "{e}");
        assert_eq!(info.custom.len(), fit);
        assert!(is_custom(&[b"x"]) && !is_custom(&[b"cascade", b"route"]));
    }
}
