//! Traffic probes: a stand-in proxy that reports where a redirected connection was headed
//! (`SO_ORIGINAL_DST`), an "app" server, and a client.

use crate::Netns;
use anyhow::{Context, Result};
use nix::sys::socket::{getsockopt, sockopt};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream};
use std::time::Duration;

/// The original destination of a connection accepted after an iptables REDIRECT.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    if v4 {
        let a = getsockopt(stream, sockopt::OriginalDst).ok()?;
        let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
        Some(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(a.sin_port),
        )))
    } else {
        let a = getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
        let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
        Some(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(a.sin6_port),
            0,
            0,
        )))
    }
}

/// Serve `listener` forever on a thread: each connection gets one line `<label> <local> <orig>`.
pub fn serve(listener: TcpListener, label: &'static str) {
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let orig = original_dst(&conn)
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into());
            let mut conn = conn;
            let _ = writeln!(conn, "{label} {local} {orig}");
        }
    });
}

/// Listen on `addr` inside `ns` (the socket belongs to that namespace) and serve it.
pub fn listen(ns: &Netns, addr: &str, label: &'static str) -> Result<()> {
    let addr = addr.to_string();
    let l = ns.run(move || TcpListener::bind(&addr).with_context(|| format!("bind {addr}")))??;
    serve(l, label);
    Ok(())
}

/// The proxy ports of Istio: 15001 (outbound) and 15006 (inbound), IPv4 and IPv6.
/// With IPv6 the listeners are dual-stack (`[::]`), which also accept IPv4.
pub fn start_proxy(ns: &Netns, ipv6: bool) -> Result<()> {
    listen(ns, &any(ipv6, 15001), "PROXY-OUT")?;
    listen(ns, &any(ipv6, 15006), "PROXY-IN")
}

/// The wildcard address for a port: `[::]:p` (dual-stack) or `0.0.0.0:p`.
pub fn any(ipv6: bool, port: u16) -> String {
    if ipv6 {
        format!("[::]:{port}")
    } else {
        format!("0.0.0.0:{port}")
    }
}

/// What a probe connection saw: who answered, on which local address, the original dst.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub label: String,
    pub local: String,
    pub orig: String,
}

/// Connect from inside `ns` to `dst` and read the one-line answer.
pub fn connect(ns: &Netns, dst: &str) -> Result<Seen> {
    let dst: SocketAddr = dst.parse().with_context(|| format!("address {dst}"))?;
    let line = ns.run(move || -> Result<String> {
        let s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))
            .with_context(|| format!("connect {dst}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line)
    })??;
    parse_seen(&line)
}

/// [`connect`] as `uid` (gid `uid`, no supplementary groups), so that the rules' owner matches
/// see that uid: `setpriv` running busybox `nc` inside `ns`, to `ip:port`.
pub fn connect_as(ns: &Netns, uid: u32, ip: &str, port: u16) -> Result<Seen> {
    let out = ns
        .output(std::process::Command::new("setpriv").args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "busybox",
            "nc",
            "-w",
            "3",
            ip,
            &port.to_string(),
        ]))
        .context("setpriv busybox nc (apt-get install busybox-static util-linux)")?;
    anyhow::ensure!(out.status.success(), "nc as {uid}: {out:?}");
    parse_seen(&String::from_utf8_lossy(&out.stdout))
}

pub fn parse_seen(line: &str) -> Result<Seen> {
    let mut it = line.split_whitespace();
    let mut next = || {
        it.next()
            .map(str::to_string)
            .with_context(|| format!("short answer {line:?}"))
    };
    Ok(Seen {
        label: next()?,
        local: next()?,
        orig: next()?,
    })
}
