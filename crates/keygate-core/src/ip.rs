//! IP allow-lists: single addresses and CIDR ranges, IPv4 and IPv6.

use crate::InvalidInput;
use ipnet::IpNet;
use std::net::IpAddr;

/// A list of networks; empty means "any address".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpAllowList {
    nets: Vec<IpNet>,
}

impl IpAllowList {
    /// Parses entries such as `203.0.113.7`, `10.0.0.0/8`, `2001:db8::/32`, `::1`.
    /// Host bits in a range are cleared (`10.1.2.3/8` is `10.0.0.0/8`).
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, InvalidInput> {
        let mut nets = Vec::with_capacity(items.len());
        for item in items {
            let s = item.as_ref().trim();
            let net = if s.contains('/') {
                s.parse::<IpNet>().ok().map(|n| n.trunc())
            } else {
                s.parse::<IpAddr>().ok().map(|a| IpNet::from(canonical(a)))
            };
            match net {
                Some(n) => nets.push(n),
                None => {
                    return Err(InvalidInput::new(format!(
                        "invalid IP address or CIDR range {:?}",
                        s.chars().take(64).collect::<String>()
                    )))
                }
            }
        }
        nets.sort();
        nets.dedup();
        Ok(Self { nets })
    }

    /// Whether the list is empty (no restriction).
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` is inside one of the networks. IPv4-mapped IPv6 addresses
    /// (`::ffff:1.2.3.4`, as dual-stack sockets report them) count as their IPv4 address.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The entries in their canonical text form (`10.0.0.0/8`, `203.0.113.7/32`).
    pub fn to_strings(&self) -> Vec<String> {
        self.nets.iter().map(|n| n.to_string()).collect()
    }
}

/// Maps `::ffff:a.b.c.d` to `a.b.c.d`; other addresses are unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test ip")
    }

    #[test]
    fn matches_v4_v6_and_ranges() {
        let l = IpAllowList::parse(&["10.0.0.0/8", "203.0.113.7", "2001:db8::/32"]).expect("ok");
        assert!(l.contains(ip("10.200.1.1")));
        assert!(l.contains(ip("203.0.113.7")));
        assert!(!l.contains(ip("203.0.113.8")));
        assert!(l.contains(ip("2001:db8:1::5")));
        assert!(!l.contains(ip("2001:db9::1")));
        assert!(l.contains(ip("::ffff:10.1.1.1")));
    }

    #[test]
    fn host_bits_are_cleared() {
        let l = IpAllowList::parse(&["10.1.2.3/8"]).expect("ok");
        assert_eq!(l.to_strings(), vec!["10.0.0.0/8"]);
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["10.0.0.0/33", "not-an-ip", "1.2.3", "::/129", ""] {
            assert!(IpAllowList::parse(&[bad]).is_err(), "{bad}");
        }
    }
}
