//! The proxy against small local servers: bytes, blackholes, resets, cuts.

use super::*;
use std::time::Duration;

/// An upstream that echoes every byte back.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn read_exact_within(s: &mut TcpStream, n: usize, within: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0; n];
    tokio::time::timeout(within, s.read_exact(&mut buf))
        .await
        .ok()
        .map(|r| {
            r.unwrap();
            buf
        })
}

#[tokio::test]
async fn bytes_flow_both_ways_and_are_counted() {
    let proxy = Proxy::start(echo_server().await).await.unwrap();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    let got = read_exact_within(&mut s, 5, Duration::from_secs(5)).await;
    assert_eq!(got.as_deref(), Some(&b"hello"[..]));
    let stats = proxy.stats();
    assert_eq!((stats.to_upstream, stats.from_upstream), (5, 5));
    assert_eq!((stats.accepted, stats.open), (1, 1));
}

#[tokio::test]
async fn a_blackhole_holds_bytes_without_closing_and_a_restore_delivers_them() {
    let proxy = Proxy::start(echo_server().await).await.unwrap();
    let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
    open.write_all(b"a").await.unwrap();
    assert!(read_exact_within(&mut open, 1, Duration::from_secs(5))
        .await
        .is_some());

    proxy.blackhole();
    assert!(proxy.is_blackholed());
    open.write_all(b"during").await.unwrap();
    // A connection made during the blackhole is accepted, and held.
    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    fresh.write_all(b"fresh").await.unwrap();
    assert!(
        read_exact_within(&mut open, 1, Duration::from_millis(500))
            .await
            .is_none(),
        "nothing may pass a blackhole"
    );
    assert!(read_exact_within(&mut fresh, 1, Duration::from_millis(200))
        .await
        .is_none());
    // Neither socket was closed: a read would have returned 0 (EOF) or an error at once.
    assert_eq!(proxy.stats().to_upstream, 1);
    assert_eq!(proxy.stats().open, 2);

    proxy.restore();
    let got = read_exact_within(&mut open, 6, Duration::from_secs(5)).await;
    assert_eq!(got.as_deref(), Some(&b"during"[..]));
    let got = read_exact_within(&mut fresh, 5, Duration::from_secs(5)).await;
    assert_eq!(got.as_deref(), Some(&b"fresh"[..]));
    assert_eq!(proxy.stats().to_upstream, 1 + 6 + 5);
}

#[tokio::test]
async fn a_cut_resets_open_connections_and_later_ones_work() {
    let proxy = Proxy::start(echo_server().await).await.unwrap();
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(b"x").await.unwrap();
    assert!(read_exact_within(&mut s, 1, Duration::from_secs(5))
        .await
        .is_some());
    proxy.cut();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the cut must end the connection at once");
    assert!(
        matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
    let mut later = TcpStream::connect(proxy.addr()).await.unwrap();
    later.write_all(b"y").await.unwrap();
    assert!(read_exact_within(&mut later, 1, Duration::from_secs(5))
        .await
        .is_some());
    assert_eq!(proxy.stats().cut, 1);
}

/// An upstream that reports how each of its connections ended: `Ok(bytes read)` at EOF,
/// or the read error.
async fn reporting_server() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<io::Result<usize>>,
) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = tx.send(s.read_to_end(&mut sink).await);
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn a_close_is_passed_on_as_a_close_and_a_reset_as_a_reset_after_the_restore() {
    let (upstream, mut ended) = reporting_server().await;
    let proxy = Proxy::start(upstream).await.unwrap();
    let mut closing = TcpStream::connect(proxy.addr()).await.unwrap();
    closing.write_all(b"bye").await.unwrap();
    closing.shutdown().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), ended.recv()).await;
    assert_eq!(end.unwrap().unwrap().unwrap(), 3, "EOF after the bytes");

    let resetting = TcpStream::connect(proxy.addr()).await.unwrap();
    // Wait until the proxy carries it (its upstream connection exists).
    while proxy.stats().open < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.blackhole();
    resetting.set_zero_linger().unwrap();
    drop(resetting);
    let early = tokio::time::timeout(Duration::from_millis(500), ended.recv()).await;
    assert!(
        early.is_err(),
        "a reset must not pass a blackhole: {early:?}"
    );
    proxy.restore();
    let end = tokio::time::timeout(Duration::from_secs(5), ended.recv()).await;
    let end = end.unwrap().unwrap();
    assert!(
        matches!(&end, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "{end:?}"
    );
}

#[tokio::test]
async fn bytes_sent_into_a_blackhole_die_with_a_reset_of_their_sender() {
    let (upstream, mut ended) = reporting_server().await;
    let proxy = Proxy::start(upstream).await.unwrap();
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    client.write_all(b"before").await.unwrap();
    while proxy.stats().to_upstream < 6 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.blackhole();
    client.write_all(b"during").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.set_zero_linger().unwrap();
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.restore();
    let end = tokio::time::timeout(Duration::from_secs(5), ended.recv()).await;
    let end = end.unwrap().unwrap();
    assert!(
        matches!(&end, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "{end:?}"
    );
    assert_eq!(proxy.stats().to_upstream, 6, "`during` must not arrive");
}

#[tokio::test]
async fn dropping_the_proxy_stops_listening() {
    let proxy = Proxy::start(echo_server().await).await.unwrap();
    let addr = proxy.addr();
    drop(proxy);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[test]
fn url_for_keeps_credentials_path_and_query() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let proxy = Proxy::start("127.0.0.1:1".parse().unwrap()).await.unwrap();
        let port = proxy.addr().port();
        assert_eq!(
            proxy.url_for("amqp://guest:p@ss@127.0.0.1:5672/%2f?heartbeat=5"),
            format!("amqp://guest:p@ss@127.0.0.1:{port}/%2f?heartbeat=5")
        );
        assert_eq!(
            proxy.url_for("amqp://rabbit"),
            format!("amqp://127.0.0.1:{port}")
        );
    });
}
