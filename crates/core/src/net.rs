//! Address ranges written in manifests (`listen[].trustedProxies`).
//!
//! A tiny CIDR type rather than a dependency: the proxy only needs "is this peer inside
//! one of these ranges", and the manifest needs a parse with a clear message.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address range: `10.0.0.0/8`, `::1/128`, or a bare address (a range of one).
///
/// An IPv4 range also matches the same addresses seen as IPv4-mapped IPv6
/// (`::ffff:10.1.2.3`), which is how a dual-stack listener reports IPv4 peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The range's first address (host bits cleared).
    #[must_use]
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Prefix length in bits.
    #[must_use]
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in the range.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_bits(u128::from(u32::from(ip)), self.prefix, 32) == u128::from(u32::from(net))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_bits(u128::from(ip), self.prefix, 128) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// `value` with everything but its first `prefix` of `width` bits cleared.
fn mask_bits(value: u128, prefix: u8, width: u8) -> u128 {
    if prefix == 0 {
        return 0;
    }
    let keep = u32::from(width - prefix);
    (value >> keep) << keep
}

/// Why a range did not parse; the message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address range `{text}`: {why} (expected an address or address/prefix like 10.0.0.0/8, 192.168.1.10 or fd00::/8)")]
pub struct CidrError {
    text: String,
    why: &'static str,
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |why| CidrError {
            text: text.to_string(),
            why,
        };
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err("not an IP address"))?;
        let addr = addr.to_canonical();
        let width: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) => {
                let p: u8 = p
                    .parse()
                    .map_err(|_| err("the prefix length is not a number"))?;
                if p > width {
                    return Err(err("the prefix length is longer than the address"));
                }
                p
            }
        };
        // Host bits set below the prefix (10.1.2.3/8) are a typo more often than not,
        // but every tool accepts them as the enclosing network; so do we.
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(
                u32::try_from(mask_bits(u128::from(u32::from(a)), prefix, 32))
                    .unwrap_or_default()
                    .into(),
            ),
            IpAddr::V6(a) => IpAddr::V6(mask_bits(u128::from(a), prefix, 128).into()),
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches_ranges() {
        let cases: &[(&str, &str, bool)] = &[
            ("10.0.0.0/8", "10.200.3.4", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.1.2.3/8", "10.9.9.9", true),
            ("192.168.1.10", "192.168.1.10", true),
            ("192.168.1.10", "192.168.1.11", false),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("0.0.0.0/0", "::1", false),
            ("127.0.0.1", "::ffff:127.0.0.1", true),
            ("::1", "::1", true),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe80::1", false),
            ("::/0", "2001:db8::1", true),
        ];
        for (range, ip, want) in cases {
            let c: Cidr = range.parse().unwrap();
            assert_eq!(c.contains(ip.parse().unwrap()), *want, "{range} {ip}");
        }
    }

    #[test]
    fn rejects_bad_ranges_with_a_reason() {
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
            "1.2.3.4/a",
        ] {
            let e = bad.parse::<Cidr>().unwrap_err().to_string();
            assert!(e.contains("expected an address"), "{bad}: {e}");
        }
    }

    #[test]
    fn displays_the_network() {
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
    }
}
