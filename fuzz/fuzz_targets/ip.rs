//! IP addresses and CIDR ranges: never panic; a parsed range contains its own first address,
//! and a single address contains exactly itself.
#![no_main]
use keygate_core::IpAllowList;
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;

fuzz_target!(|input: (&str, [u8; 16], bool)| {
    let (entry, raw, v4) = input;
    let probe: IpAddr = if v4 {
        IpAddr::from([raw[0], raw[1], raw[2], raw[3]])
    } else {
        IpAddr::from(raw)
    };
    if let Ok(list) = IpAllowList::parse(&[entry]) {
        for s in list.to_strings() {
            let first = s.split('/').next().unwrap_or_default();
            if let Ok(ip) = first.parse::<IpAddr>() {
                assert!(list.contains(ip), "{entry} -> {s}");
            }
        }
        let _ = list.contains(probe);
    }
    if let Ok(ip) = entry.trim().parse::<IpAddr>() {
        let one = IpAllowList::parse(&[entry]).expect("an address is a valid entry");
        assert!(one.contains(ip));
        assert_eq!(
            one.contains(probe),
            keygate_core::ip::canonical(probe) == keygate_core::ip::canonical(ip)
        );
    }
});
