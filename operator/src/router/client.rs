//! Who is calling: the client address of a request, seen through the proxies we trust.
//!
//! Behind an Ingress every socket peer is the Ingress, so per-client limits keyed by the
//! peer would put every client in one bucket. Forwarded-for headers name the real client,
//! but anyone can send them: they are believed only when the peer is a trusted proxy, and
//! then only up to the right-most address that is not itself a trusted proxy (each proxy
//! appends the address it received from, so everything left of that is the client's word).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// A bad `--trusted-proxies` entry.
#[derive(Debug, thiserror::Error)]
#[error("{value:?} is not an IP address or a CIDR block (like 10.0.0.0/8 or fd00::/8)")]
pub struct ProxyParseError {
    value: String,
}

/// Parses one trusted proxy: a CIDR block, or a single address.
pub fn parse_proxy(value: &str) -> Result<IpNet, ProxyParseError> {
    let v = value.trim();
    v.parse::<IpNet>()
        .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| ProxyParseError {
            value: value.to_owned(),
        })
}

/// The proxies whose forwarded-for headers are believed (`--trusted-proxies`).
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Trusts these blocks; empty trusts nobody (the socket peer is the client).
    pub fn new(blocks: Vec<IpNet>) -> Self {
        Self(blocks)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: the socket `peer`, or, when the peer is a trusted proxy, the
    /// right-most address of `X-Forwarded-For` (else `Forwarded`) that is not a trusted
    /// proxy. A malformed hop stops the walk at the last trusted address before it, so a
    /// client cannot pick its own address by sending garbage.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.trusts(client) {
            return client;
        }
        for hop in forwarded_chain(headers).into_iter().rev() {
            let Some(ip) = hop else {
                return client;
            };
            client = ip.to_canonical();
            if !self.trusts(client) {
                return client;
            }
        }
        client
    }
}

/// The forwarded-for chain, left (original client) to right (nearest proxy); `None` for an
/// entry that is not an address (`unknown`, obfuscated names, garbage).
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let xff: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{0}"))
        .collect();
    if !xff.is_empty() {
        return xff
            .iter()
            .flat_map(|line| line.split(','))
            .map(parse_hop)
            .collect();
    }
    headers
        .get_all(http::header::FORWARDED)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{0}"))
        .flat_map(|line| line.split(','))
        .filter_map(|element| {
            // An element without `for=` says nothing about the client: skip it.
            element.split(';').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                k.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| parse_hop(v.trim().trim_matches('"')))
            })
        })
        .collect()
}

/// One hop: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, or `[2001:db8::1]:5678`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            s.strip_prefix('[')
                .and_then(|r| r.split_once(']'))
                .and_then(|(ip, _)| ip.parse::<Ipv6Addr>().ok())
                .map(IpAddr::V6)
        })
}

/// The address a per-client limit counts: IPv4 as is, IPv6 by its /64 (one subscriber
/// usually holds a whole /64, so single addresses would be a fresh bucket per request).
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::new(list.iter().map(|p| parse_proxy(p).unwrap()).collect())
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let t = proxies(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(t.client_ip(ip("203.0.113.9"), &h), ip("203.0.113.9"));
        assert_eq!(
            TrustedProxies::default().client_ip(ip("10.0.0.1"), &h),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn a_trusted_chain_yields_its_right_most_untrusted_address() {
        let t = proxies(&["10.0.0.0/8", "192.168.1.1"]);
        // The client's own (spoofed) entries sit left of what the proxies appended.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.1.1.1")]);
        assert_eq!(t.client_ip(ip("192.168.1.1"), &h), ip("198.51.100.7"));
        // Several header lines are one list; ports and IPv4-mapped addresses are fine.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.7:4000"),
        ]);
        assert_eq!(t.client_ip(ip("::ffff:10.0.0.2"), &h), ip("198.51.100.7"));
        // Garbage right of the real client stops the walk at the last trusted hop.
        let h = headers(&[("x-forwarded-for", "198.51.100.7, not-an-ip, 10.1.1.1")]);
        assert_eq!(t.client_ip(ip("10.0.0.2"), &h), ip("10.1.1.1"));
        // No header: the proxy itself.
        assert_eq!(
            t.client_ip(ip("10.0.0.2"), &HeaderMap::new()),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn forwarded_is_read_when_there_is_no_x_forwarded_for() {
        let t = proxies(&["10.0.0.0/8"]);
        let h = headers(&[(
            "forwarded",
            r#"for=6.6.6.6, for="[2001:db8::7]:443";proto=https, by=10.0.0.1;for=10.2.2.2"#,
        )]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("2001:db8::7"));
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(t.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn bad_proxy_entries_are_refused_with_the_value() {
        assert_eq!(parse_proxy("10.0.0.7").unwrap().prefix_len(), 32);
        assert_eq!(parse_proxy(" fd00::/8 ").unwrap().prefix_len(), 8);
        let e = parse_proxy("10.0.0.0/33").unwrap_err().to_string();
        assert!(e.contains("\"10.0.0.0/33\""), "{e}");
        assert!(parse_proxy("ingress").is_err());
    }

    #[test]
    fn ipv6_clients_are_limited_per_64() {
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("::ffff:198.51.100.7")), ip("198.51.100.7"));
    }
}
