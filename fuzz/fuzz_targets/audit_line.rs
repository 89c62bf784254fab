//! The audit line scanner against serde_json: whatever the fast scan reads, serde_json reads
//! the same (the scan may only decline, never disagree).
#![no_main]
use keygate_core::audit::LineHead;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    if let Some(scanned) = LineHead::scan(line) {
        let read: LineHead<'_> = serde_json::from_slice(line).unwrap_or_else(|e| {
            panic!(
                "scan took a line serde refuses ({e}): {:?}",
                String::from_utf8_lossy(line)
            )
        });
        assert_eq!(scanned, read, "{:?}", String::from_utf8_lossy(line));
    }
});
