//! Range and Content-Range parsing and the slice a range maps to.
#![no_main]
use cascade::cache::slice::{answer, coverage, parse_content_range, plan, Answer, Coverage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (String, String, u32, bool)| {
    let (range, content_range, size, head) = input;
    let size = u64::from(size % (1 << 24)).max(1);
    let Some(s) = plan(Some(&range), head, size) else { return };
    if let Some((first, last, total)) = parse_content_range(&content_range) {
        if coverage(&s, first, last, total) == Coverage::Exact {
            if let Answer::Partial { lo, hi, total: t } = answer(&s, total, last - first + 1) {
                assert!(lo <= hi && hi < t && hi <= last && lo >= first);
            }
        }
    }
});
