//! Resets this process's own TCP connections to given ports, as a client's link reset looks
//! from the client (the socket is destroyed under it: the next read or write fails), without a
//! proxy and without touching anyone else's connections (other clients, brokers among
//! themselves). Needs `ss -K` (iproute2 with socket destroy, as root); Linux only.

use std::collections::HashSet;
use std::process::Command;

/// Why the reset could not run.
#[derive(Debug)]
pub struct ResetError(pub String);

impl std::fmt::Display for ResetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "could not reset the connections: {}", self.0)
    }
}

impl std::error::Error for ResetError {}

/// The state column of `/proc/net/tcp` for an established connection.
const TCP_ESTABLISHED: &str = "01";

/// Destroys every established TCP connection of this process whose remote port is one of `ports`; returns
/// how many it destroyed.
pub fn reset_own_connections(ports: &[u16]) -> Result<usize, ResetError> {
    let inodes = own_socket_inodes()?;
    let mut local_ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state), Some(inode)) =
                (fields.get(1), fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            // Only live links: a half-closed socket left over from an earlier connection to a
            // port that has since been bound again is not this link.
            if *state != TCP_ESTABLISHED {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if inodes.contains(*inode) && port(remote).is_some_and(|p| ports.contains(&p)) {
                if let Some(p) = port(local) {
                    local_ports.push(p);
                }
            }
        }
    }
    for port in &local_ports {
        let out = Command::new("ss")
            .args(["-K", "-t", "sport", "=", &format!(":{port}")])
            .output()
            .map_err(|e| ResetError(format!("ss: {e}")))?;
        if !out.status.success() {
            return Err(ResetError(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
    }
    Ok(local_ports.len())
}

/// The inodes of this process's sockets.
fn own_socket_inodes() -> Result<HashSet<String>, ResetError> {
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|e| ResetError(e.to_string()))?;
    Ok(dir
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_reset_connection_fails_its_next_read_and_others_survive() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut accepted, _) = server.accept().unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut bystander =
            std::net::TcpStream::connect(("127.0.0.1", other.local_addr().unwrap().port()))
                .unwrap();
        let (mut bystander_peer, _) = other.accept().unwrap();
        let n = reset_own_connections(&[port]).expect("ss -K (run as root)");
        assert_eq!(n, 1);
        let mut buf = [0u8; 1];
        let _ = accepted.write_all(b"x");
        assert!(client.read(&mut buf).is_err() || client.write_all(b"y").is_err());
        bystander.write_all(b"z").unwrap();
        bystander_peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"z");
    }

    /// A socket left half-closed by an earlier connection to a port that a new listener has
    /// taken again (listeners bind with `SO_REUSEADDR`) is not one of the links to cut: only
    /// established connections count.
    #[test]
    fn a_half_closed_socket_to_a_reused_port_is_not_counted() {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        let stale = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (accepted, _) = first.accept().unwrap();
        drop(accepted);
        drop(first);
        let server = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_accepted, _) = server.accept().unwrap();
        let n = reset_own_connections(&[port]).expect("ss -K (run as root)");
        assert_eq!(n, 1);
        drop(stale);
    }
}
