//! cascade test fixture `hog`: tries every bound the host puts on guest-driven allocations
//! (huge `fd_write`s and log lines, shared data past its limits, thousands of properties,
//! queues and metrics, a body grown past `limits.body`, header floods, oversized local
//! responses and HTTP calls), hands the host hostile pointers and lengths, and makes its own
//! allocator misbehave, then reports the status of each call in `x-hog-*` response headers.
//! Never deploy it.
//!
//! Written against the raw proxy-wasm ABI, without the SDK: the SDK panics on statuses it
//! does not expect and never passes a bad pointer, and its allocator cannot be made to lie.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::mem::MaybeUninit;

mod abi {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_log(level: u32, ptr: *const u8, len: usize) -> u32;
        pub fn proxy_get_header_map_value(
            map: u32,
            kp: *const u8,
            kl: usize,
            ret_ptr: *mut *mut u8,
            ret_len: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_pairs(
            map: u32,
            ret_ptr: *mut *mut u8,
            ret_len: *mut usize,
        ) -> u32;
        pub fn proxy_add_header_map_value(
            map: u32,
            kp: *const u8,
            kl: usize,
            vp: *const u8,
            vl: usize,
        ) -> u32;
        pub fn proxy_replace_header_map_value(
            map: u32,
            kp: *const u8,
            kl: usize,
            vp: *const u8,
            vl: usize,
        ) -> u32;
        pub fn proxy_remove_header_map_value(map: u32, kp: *const u8, kl: usize) -> u32;
        pub fn proxy_set_header_map_pairs(map: u32, ptr: *const u8, len: usize) -> u32;
        pub fn proxy_set_shared_data(
            kp: *const u8,
            kl: usize,
            vp: *const u8,
            vl: usize,
            cas: u32,
        ) -> u32;
        pub fn proxy_get_shared_data(
            kp: *const u8,
            kl: usize,
            ret_ptr: *mut *mut u8,
            ret_len: *mut usize,
            ret_cas: *mut u32,
        ) -> u32;
        pub fn proxy_set_property(pp: *const u8, pl: usize, vp: *const u8, vl: usize) -> u32;
        pub fn proxy_get_property(
            pp: *const u8,
            pl: usize,
            ret_ptr: *mut *mut u8,
            ret_len: *mut usize,
        ) -> u32;
        pub fn proxy_register_shared_queue(np: *const u8, nl: usize, ret_id: *mut u32) -> u32;
        pub fn proxy_define_metric(kind: u32, np: *const u8, nl: usize, ret_id: *mut u32) -> u32;
        pub fn proxy_set_buffer_bytes(
            kind: u32,
            start: usize,
            len: usize,
            ptr: *const u8,
            size: usize,
        ) -> u32;
        pub fn proxy_get_buffer_status(kind: u32, ret_len: *mut usize, ret_flags: *mut u32) -> u32;
        pub fn proxy_get_buffer_bytes(
            kind: u32,
            start: usize,
            max: usize,
            ret_ptr: *mut *mut u8,
            ret_len: *mut usize,
        ) -> u32;
        pub fn proxy_send_local_response(
            code: u32,
            dp: *const u8,
            dl: usize,
            bp: *const u8,
            bl: usize,
            hp: *const u8,
            hl: usize,
            grpc: i32,
        ) -> u32;
        #[allow(clippy::too_many_arguments)]
        pub fn proxy_http_call(
            up: *const u8,
            ul: usize,
            hp: *const u8,
            hl: usize,
            bp: *const u8,
            bl: usize,
            tp: *const u8,
            tl: usize,
            timeout: u32,
            ret_token: *mut u32,
        ) -> u32;
    }

    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        #[link_name = "fd_write"]
        pub fn wasi_fd_write(fd: u32, iovs: *const u32, n: usize, ret: *mut usize) -> u32;
        #[link_name = "random_get"]
        pub fn wasi_random_get(ptr: *mut u8, len: usize) -> u32;
        #[link_name = "clock_time_get"]
        pub fn wasi_clock_time_get(id: u32, precision: u64, ret: *mut u64) -> u32;
        #[link_name = "environ_get"]
        pub fn wasi_environ_get(array: *mut *mut u8, buf: *mut u8) -> u32;
    }
}

const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;
const REQUEST_BODY: u32 = 0;
const PLUGIN_CONFIGURATION: u32 = 7;
const CONTINUE: u32 = 0;
/// An address past the end of any memory this module can have (it never grows near 4 GiB).
const OUT: usize = 0xFFFF_FF00;

/// How `proxy_on_memory_allocate` answers its next call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Alloc {
    Normal,
    /// An address out of the memory.
    Bogus,
    /// An address a few bytes before the end of the memory: the data cannot fit.
    Edge,
    /// 0: "cannot allocate".
    Null,
    /// Calls back into the host (`proxy_get_property`) before answering.
    Reenter,
}

thread_local! {
    static ALLOC: Cell<Alloc> = const { Cell::new(Alloc::Normal) };
    /// Status of the call the allocator made in `Reenter` mode.
    static REENTERED: Cell<u32> = const { Cell::new(u32::MAX) };
    /// Per HTTP context: what to report in the response headers, and the mode it runs.
    static CONTEXTS: RefCell<HashMap<u32, Ctx>> = RefCell::new(HashMap::new());
}

#[derive(Default)]
struct Ctx {
    mode: String,
    size: usize,
    count: usize,
    report: Vec<(String, String)>,
    body_done: bool,
}

#[no_mangle]
pub extern "C" fn _initialize() {}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    match ALLOC.with(|a| a.replace(Alloc::Normal)) {
        Alloc::Normal => {}
        Alloc::Bogus => return OUT as *mut u8,
        Alloc::Edge => return (core::arch::wasm32::memory_size(0) * 65536 - 4) as *mut u8,
        Alloc::Null => return std::ptr::null_mut(),
        Alloc::Reenter => {
            let path = b"plugin_name";
            let (mut p, mut l) = (std::ptr::null_mut(), 0);
            // SAFETY: valid pointers; the host must refuse the nested call or survive it.
            let st = unsafe { abi::proxy_get_property(path.as_ptr(), path.len(), &mut p, &mut l) };
            REENTERED.with(|r| r.set(st));
        }
    }
    let mut v: Vec<MaybeUninit<u8>> = Vec::with_capacity(size);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(size) };
    Box::into_raw(v.into_boxed_slice()) as *mut u8
}

/// Takes ownership of bytes the host returned (allocated by `proxy_on_memory_allocate`).
fn owned(p: *mut u8, l: usize) -> Vec<u8> {
    if p.is_null() || l == 0 {
        return Vec::new();
    }
    // SAFETY: the host copied `l` bytes into a boxed slice of exactly `l` bytes we allocated.
    unsafe { Vec::from_raw_parts(p, l, l) }
}

fn header(map: u32, name: &str) -> Option<String> {
    let (mut p, mut l) = (std::ptr::null_mut(), 0);
    // SAFETY: valid pointers.
    let st =
        unsafe { abi::proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut p, &mut l) };
    (st == 0).then(|| String::from_utf8_lossy(&owned(p, l)).into_owned())
}

fn set_header(map: u32, name: &str, value: &str) -> u32 {
    // SAFETY: valid pointers.
    unsafe {
        abi::proxy_replace_header_map_value(
            map,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    }
}

fn add_header(map: u32, name: &str, value: &[u8]) -> u32 {
    // SAFETY: valid pointers.
    unsafe {
        abi::proxy_add_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    }
}

/// Pairs in a header map (its serialized count).
fn map_count(map: u32) -> u32 {
    let (mut p, mut l) = (std::ptr::null_mut(), 0);
    // SAFETY: valid pointers.
    let st = unsafe { abi::proxy_get_header_map_pairs(map, &mut p, &mut l) };
    let bytes = owned(p, l);
    if st != 0 || bytes.len() < 4 {
        return 0;
    }
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// A serialized header map of `pairs`.
fn serialize(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Runs `call` up to `count` times (with the index), stopping at the first status that is
/// not OK: `(calls that returned OK, the last status)`.
fn repeat(count: usize, mut call: impl FnMut(usize) -> u32) -> (usize, u32) {
    let mut last = 0;
    for i in 0..count {
        last = call(i);
        if last != 0 {
            return (i, last);
        }
    }
    (count, last)
}

/// `name=status` of one hostile call.
type Probe = (&'static str, u32);

/// Hostile pointers and lengths, one call each.
fn bogus() -> Vec<Probe> {
    let out = OUT as *const u8;
    let outm = OUT as *mut u8;
    let (mut p, mut l, mut n) = (std::ptr::null_mut::<u8>(), 0usize, 0u32);
    let msg = b"hog";
    let key = b"hog.bogus";
    let mut w = 0usize;
    // One iovec pointing out of the memory, one array out of the memory.
    let iov_out = [OUT as u32, 16u32];
    let iov_ok = [msg.as_ptr() as u32, msg.len() as u32];
    let mut v = Vec::new();
    // SAFETY: the host must treat every one of these as an error, never dereference it.
    unsafe {
        v.push(("log", abi::proxy_log(2, out, 10)));
        v.push(("log_len", abi::proxy_log(2, msg.as_ptr(), usize::MAX)));
        v.push((
            "fd_iovs",
            abi::wasi_fd_write(1, OUT as *const u32, 1, &mut w),
        ));
        v.push((
            "fd_data",
            abi::wasi_fd_write(1, iov_out.as_ptr(), 1, &mut w),
        ));
        v.push((
            "fd_ret",
            abi::wasi_fd_write(1, iov_ok.as_ptr(), 1, OUT as *mut usize),
        ));
        v.push((
            "pairs_ret",
            abi::proxy_get_header_map_pairs(REQUEST_HEADERS, OUT as *mut *mut u8, &mut l),
        ));
        v.push((
            "value_key",
            abi::proxy_get_header_map_value(REQUEST_HEADERS, out, 4, &mut p, &mut l),
        ));
        v.push((
            "add_key",
            abi::proxy_add_header_map_value(REQUEST_HEADERS, out, 4, msg.as_ptr(), 3),
        ));
        v.push((
            "set_pairs",
            abi::proxy_set_header_map_pairs(REQUEST_HEADERS, out, 16),
        ));
        v.push((
            "prop_path",
            abi::proxy_get_property(out, 11, &mut p, &mut l),
        ));
        v.push((
            "prop_ret",
            abi::proxy_get_property(b"plugin_name".as_ptr(), 11, &mut p, OUT as *mut usize),
        ));
        v.push((
            "set_prop",
            abi::proxy_set_property(out, 10, msg.as_ptr(), 3),
        ));
        v.push((
            "shared_key",
            abi::proxy_set_shared_data(out, 5, msg.as_ptr(), 3, 0),
        ));
        abi::proxy_set_shared_data(key.as_ptr(), key.len(), msg.as_ptr(), 3, 0);
        v.push((
            "shared_ret",
            abi::proxy_get_shared_data(key.as_ptr(), key.len(), &mut p, &mut l, OUT as *mut u32),
        ));
        v.push((
            "buffer_ret",
            abi::proxy_get_buffer_bytes(
                PLUGIN_CONFIGURATION,
                0,
                100,
                OUT as *mut *mut u8,
                OUT as *mut usize,
            ),
        ));
        v.push((
            "buffer_status",
            abi::proxy_get_buffer_status(PLUGIN_CONFIGURATION, OUT as *mut usize, OUT as *mut u32),
        ));
        v.push(("metric", abi::proxy_define_metric(0, out, 5, &mut n)));
        v.push(("queue", abi::proxy_register_shared_queue(out, 5, &mut n)));
        v.push((
            "call",
            abi::proxy_http_call(
                out,
                3,
                msg.as_ptr(),
                0,
                msg.as_ptr(),
                0,
                msg.as_ptr(),
                0,
                1000,
                &mut n,
            ),
        ));
        v.push((
            "local",
            abi::proxy_send_local_response(200, out, 5, msg.as_ptr(), 3, msg.as_ptr(), 0, -1),
        ));
        v.push(("random", abi::wasi_random_get(outm, 16)));
        v.push(("clock", abi::wasi_clock_time_get(0, 0, OUT as *mut u64)));
        v.push(("environ", abi::wasi_environ_get(OUT as *mut *mut u8, outm)));
    }
    v
}

/// The allocator misbehaving while the host returns the request's headers.
fn alloc_modes() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for (name, mode) in [
        ("bogus", Alloc::Bogus),
        ("edge", Alloc::Edge),
        ("null", Alloc::Null),
        ("reenter", Alloc::Reenter),
    ] {
        ALLOC.with(|a| a.set(mode));
        REENTERED.with(|r| r.set(u32::MAX));
        let (mut p, mut l) = (std::ptr::null_mut(), 0);
        // SAFETY: valid pointers; the answer may point anywhere, so it is only kept when OK.
        let st = unsafe { abi::proxy_get_header_map_pairs(REQUEST_HEADERS, &mut p, &mut l) };
        if st == 0 {
            drop(owned(p, l));
        }
        ALLOC.with(|a| a.set(Alloc::Normal));
        let v = match mode {
            Alloc::Reenter => format!("{st}/{}", REENTERED.with(|r| r.get())),
            _ => st.to_string(),
        };
        out.push((name, v));
    }
    out
}

/// What a mode reports: `x-hog-<name>` response headers.
#[derive(Default)]
struct Report(Vec<(String, String)>);

impl Report {
    fn put(&mut self, name: &str, value: impl ToString) {
        self.0.push((format!("x-hog-{name}"), value.to_string()));
    }

    /// The outcome of [`repeat`].
    fn status(&mut self, (ok, status): (usize, u32)) {
        self.put("ok", ok);
        self.put("status", status);
    }
}

/// Runs a request-phase mode.
fn request_mode(mode: &str, size: usize, count: usize) -> Report {
    let buf = vec![b'h'; size];
    let mut report = Report::default();
    match mode {
        // `count` iovecs, each naming the same `size` bytes.
        "fd_write" => {
            let iovs: Vec<u32> = (0..count)
                .flat_map(|_| [buf.as_ptr() as u32, size as u32])
                .collect();
            let mut w = 0;
            // SAFETY: valid pointers.
            let st = unsafe { abi::wasi_fd_write(1, iovs.as_ptr(), count, &mut w) };
            report.put("status", st.to_string());
            report.put("written", w.to_string());
        }
        "log" => report.status(
            // SAFETY: valid pointers.
            repeat(count, |_| unsafe { abi::proxy_log(2, buf.as_ptr(), size) }),
        ),
        "shared" => report.status(repeat(count, |i| {
            let k = format!("hog.{i}");
            // SAFETY: valid pointers.
            unsafe { abi::proxy_set_shared_data(k.as_ptr(), k.len(), buf.as_ptr(), size, 0) }
        })),
        "shared_key" => report.status(
            // SAFETY: valid pointers.
            repeat(1, |_| unsafe {
                abi::proxy_set_shared_data(buf.as_ptr(), size, b"v".as_ptr(), 1, 0)
            }),
        ),
        "props" => report.status(repeat(count, |i| {
            let path = format!("hog\0p{i}");
            // SAFETY: valid pointers.
            unsafe { abi::proxy_set_property(path.as_ptr(), path.len(), buf.as_ptr(), size) }
        })),
        // A path of `size` NUL bytes: splitting it would make a slice per byte.
        "props_path" => {
            let path = vec![0u8; size];
            // SAFETY: valid pointers.
            let set = unsafe { abi::proxy_set_property(path.as_ptr(), size, b"v".as_ptr(), 1) };
            let (mut p, mut l) = (std::ptr::null_mut(), 0);
            // SAFETY: valid pointers.
            let get = unsafe { abi::proxy_get_property(path.as_ptr(), size, &mut p, &mut l) };
            drop(owned(p, l));
            report.put("status", set.to_string());
            report.put("get", get.to_string());
        }
        "queues" => report.status(repeat(count, |i| {
            let name = format!("hog.q{i}");
            let mut id = 0;
            // SAFETY: valid pointers.
            unsafe { abi::proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) }
        })),
        "queue_name" => {
            let mut id = 0;
            // SAFETY: valid pointers.
            let st = unsafe { abi::proxy_register_shared_queue(buf.as_ptr(), size, &mut id) };
            report.put("status", st.to_string());
        }
        "metrics" => report.status(repeat(count, |i| {
            let name = format!("hog_m{i}");
            let mut id = 0;
            // SAFETY: valid pointers.
            unsafe { abi::proxy_define_metric(0, name.as_ptr(), name.len(), &mut id) }
        })),
        "metric_name" => {
            let mut id = 0;
            // SAFETY: valid pointers.
            let st = unsafe { abi::proxy_define_metric(0, buf.as_ptr(), size, &mut id) };
            report.put("status", st.to_string());
        }
        "headers" => {
            let r = repeat(count, |i| {
                add_header(REQUEST_HEADERS, &format!("x-flood-{i}"), &buf)
            });
            report.status(r);
            report.put("pairs", map_count(REQUEST_HEADERS).to_string());
        }
        // A `:method` of `size` token bytes.
        "method" => {
            let method = vec![b'M'; size];
            let name = b":method";
            // SAFETY: valid pointers.
            let st = unsafe {
                abi::proxy_replace_header_map_value(
                    REQUEST_HEADERS,
                    name.as_ptr(),
                    name.len(),
                    method.as_ptr(),
                    size,
                )
            };
            report.put("status", st);
        }
        "header_pairs" => {
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..count)
                .map(|i| (format!("x-p{i}").into_bytes(), buf.clone()))
                .collect();
            let blob = serialize(&pairs);
            // SAFETY: valid pointers.
            let st = unsafe {
                abi::proxy_set_header_map_pairs(REQUEST_HEADERS, blob.as_ptr(), blob.len())
            };
            report.put("status", st.to_string());
            report.put("pairs", map_count(REQUEST_HEADERS).to_string());
        }
        "local" => {
            let headers = serialize(&[(b"x-hog-local".to_vec(), b"1".to_vec())]);
            // SAFETY: valid pointers.
            let st = unsafe {
                abi::proxy_send_local_response(
                    200,
                    b"hog".as_ptr(),
                    3,
                    buf.as_ptr(),
                    size,
                    headers.as_ptr(),
                    headers.len(),
                    -1,
                )
            };
            report.put("status", st.to_string());
        }
        "local_headers" => {
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..count)
                .map(|i| (format!("x-l{i}").into_bytes(), buf.clone()))
                .collect();
            let headers = serialize(&pairs);
            // SAFETY: valid pointers.
            let st = unsafe {
                abi::proxy_send_local_response(
                    200,
                    b"hog".as_ptr(),
                    3,
                    b"x".as_ptr(),
                    1,
                    headers.as_ptr(),
                    headers.len(),
                    -1,
                )
            };
            report.put("status", st.to_string());
        }
        "http_call" => {
            let mut pairs = vec![
                (b":method".to_vec(), b"GET".to_vec()),
                (b":path".to_vec(), b"/".to_vec()),
                (b":authority".to_vec(), b"web".to_vec()),
            ];
            pairs.extend((0..count).map(|i| (format!("x-c{i}").into_bytes(), buf.clone())));
            let headers = serialize(&pairs);
            let mut token = 0;
            // SAFETY: valid pointers.
            let st = unsafe {
                abi::proxy_http_call(
                    b"web".as_ptr(),
                    3,
                    headers.as_ptr(),
                    headers.len(),
                    b"".as_ptr(),
                    0,
                    b"".as_ptr(),
                    0,
                    1000,
                    &mut token,
                )
            };
            report.put("status", st.to_string());
        }
        "bogus" => {
            let v: Vec<String> = bogus()
                .into_iter()
                .map(|(k, st)| format!("{k}={st}"))
                .collect();
            report.put("bogus", v.join(","));
        }
        "alloc" => {
            let v: Vec<String> = alloc_modes()
                .into_iter()
                .map(|(k, st)| format!("{k}={st}"))
                .collect();
            report.put("alloc", v.join(","));
        }
        _ => {}
    }
    report
}

fn with_ctx<R>(id: u32, f: impl FnOnce(&mut Ctx) -> R) -> Option<R> {
    CONTEXTS.with(|c| c.borrow_mut().get_mut(&id).map(f))
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(id: u32, parent: u32) {
    if parent != 0 {
        CONTEXTS.with(|c| c.borrow_mut().insert(id, Ctx::default()));
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(id: u32, _headers: usize, _eos: u32) -> u32 {
    let mode = header(REQUEST_HEADERS, "x-hog").unwrap_or_default();
    let num = |name: &str, default: usize, max: usize| {
        header(REQUEST_HEADERS, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
            .min(max)
    };
    let size = num("x-hog-size", 1024, 8 << 20);
    let count = num("x-hog-count", 1, 100_000);
    let report = request_mode(&mode, size, count);
    with_ctx(id, |ctx| {
        ctx.mode = mode;
        ctx.size = size;
        ctx.count = count;
        ctx.report = report.0;
    });
    CONTINUE
}

/// `body` mode: appends `size` bytes to the request body, `count` times at most, on its
/// first chunk (send the body chunked: its length changes).
#[no_mangle]
pub extern "C" fn proxy_on_request_body(id: u32, _size: usize, _eos: u32) -> u32 {
    with_ctx(id, |ctx| {
        if ctx.mode != "body" || ctx.body_done {
            return;
        }
        ctx.body_done = true;
        let buf = vec![b'b'; ctx.size];
        // SAFETY: valid pointers (start past the end: append, as the spec allows).
        let (ok, st) = repeat(ctx.count, |_| unsafe {
            abi::proxy_set_buffer_bytes(REQUEST_BODY, usize::MAX, 0, buf.as_ptr(), buf.len())
        });
        let (mut len, mut flags) = (0, 0);
        // SAFETY: valid pointers.
        unsafe { abi::proxy_get_buffer_status(REQUEST_BODY, &mut len, &mut flags) };
        ctx.report.push(("x-hog-ok".into(), ok.to_string()));
        ctx.report.push(("x-hog-status".into(), st.to_string()));
        ctx.report.push(("x-hog-body".into(), len.to_string()));
    });
    CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(id: u32, _headers: usize, _eos: u32) -> u32 {
    with_ctx(id, |ctx| {
        let report = std::mem::take(&mut ctx.report);
        if ctx.mode == "resp_headers" {
            // Flood first; then make room for the report by removing three of ours.
            let buf = vec![b'r'; ctx.size];
            let (ok, st) = repeat(ctx.count, |i| {
                add_header(RESPONSE_HEADERS, &format!("x-flood-{i}"), &buf)
            });
            for i in 0..3 {
                let name = format!("x-flood-{i}");
                // SAFETY: valid pointers.
                unsafe {
                    abi::proxy_remove_header_map_value(RESPONSE_HEADERS, name.as_ptr(), name.len())
                };
            }
            set_header(RESPONSE_HEADERS, "x-hog-ok", &ok.to_string());
            set_header(RESPONSE_HEADERS, "x-hog-status", &st.to_string());
        }
        for (k, v) in &report {
            set_header(RESPONSE_HEADERS, k, v);
        }
        set_header(
            RESPONSE_HEADERS,
            "x-hog",
            if ctx.mode.is_empty() {
                "none"
            } else {
                &ctx.mode
            },
        );
    });
    CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_done(_id: u32) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(id: u32) {
    CONTEXTS.with(|c| c.borrow_mut().remove(&id));
}
