//! Who sent a request: the TCP peer, or what a trusted proxy says about the client behind it.

use std::net::{IpAddr, SocketAddr};

use crate::headers::Headers;

/// What we know about the client of one request.
#[derive(Debug, Clone)]
pub struct Client {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The client's address: the peer, or what a trusted proxy says.
    pub addr: IpAddr,
    /// Whether the peer is a trusted proxy.
    pub trusted: bool,
    /// Whether the client used https (our TLS, or a trusted proxy's word).
    pub https: bool,
}

impl Client {
    /// The forwarding facts of this client ([`crate::headers::ForwardedHeaders`]).
    pub fn via(&self) -> crate::headers::Via {
        crate::headers::Via { client: self.addr, peer: self.peer.ip(), trusted: self.trusted, https: self.https }
    }

    /// Works out the client from the peer and, only when the peer is in `trusted_proxies`, X-Forwarded-For and
    /// X-Forwarded-Proto. `tls`: whether our listener terminates TLS.
    pub fn of<H: Headers + ?Sized>(
        trusted_proxies: &[ipnet::IpNet],
        tls: bool,
        peer: SocketAddr,
        headers: &H,
    ) -> Client {
        let is_trusted = |ip: IpAddr| {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            trusted_proxies.iter().any(|net| net.contains(&ip))
        };
        let trusted = is_trusted(peer.ip());
        let mut addr = peer.ip();
        let mut https = tls;
        if trusted {
            // The right-most address that isn't one of our proxies is the client (earlier entries are the
            // client's own claims).
            let chain: Vec<IpAddr> = headers
                .values("x-forwarded-for")
                .filter_map(crate::headers::text)
                .flat_map(|v| v.split(','))
                .filter_map(|s| s.trim().parse().ok())
                .collect();
            if let Some(ip) = chain.iter().rev().find(|ip| !is_trusted(**ip)).or(chain.first()) {
                addr = *ip;
            }
            if let Some(proto) = headers.first_text("x-forwarded-proto") {
                https = proto.trim().eq_ignore_ascii_case("https");
            }
        }
        Client { peer, addr, trusted, https }
    }
}
