//! Unit tests of the connection sources and node lists.

use super::nodes::*;
use super::*;
use crate::error::NodeListError;

#[test]
fn an_unparsable_url_is_a_typed_error_that_does_not_quote_it() {
    for url in [
        "amqp:alice:secret@host",
        "amqp://alice:secret@host:notaport/v",
        "http://alice:secret@host:5672/v",
        // Unencoded `/` in the password: the parser would take `123` as the port and
        // send `ss@host:5672/v` as the vhost.
        "amqp://alice:123/secret@host:5672/v",
    ] {
        let error = Source::url(url).unwrap_err();
        assert!(matches!(error, AmqpError::InvalidUrl), "{url}: {error:?}");
        let text = format!("{error} {error:?}");
        assert!(
            !text.contains("secret") && !text.contains("alice"),
            "{text}"
        );
        assert!(
            text.contains("amqp://user:password@host:port/vhost"),
            "{text}"
        );
    }
}

/// The one URL of a source of one node.
fn only_url(source: &Source) -> &SecretUrl {
    let Source::Nodes(set) = source else {
        panic!("not a URL source");
    };
    assert_eq!(set.nodes.urls.len(), 1);
    &set.nodes.urls[0]
}

#[test]
fn a_url_source_proposes_the_safe_presets_heartbeat() {
    // Without a proposal lapin takes the broker's heartbeat (RabbitMQ: 60 s), and a link
    // that stops carrying bytes goes unnoticed for two of them (L12).
    let source = Source::url("amqp://u:p@rabbit:5672/v").unwrap();
    let url = only_url(&source);
    assert_eq!(url.uri.query.heartbeat, Some(5));
    // The settings' value replaces the preset's, and one in the URL.
    let source = Source::url("amqp://u:p@rabbit:5672/v?heartbeat=0")
        .unwrap()
        .with_heartbeat(Duration::from_secs(7));
    let url = only_url(&source);
    assert_eq!(url.uri.query.heartbeat, Some(7));
    assert_eq!(source.target(), "rabbit:5672/v");
}

#[test]
fn a_parsed_url_shows_only_host_port_and_vhost() {
    let source = Source::url("amqp://alice:p%2Fa%40ss@rabbit:5673/%2f").unwrap();
    let url = only_url(&source);
    assert_eq!(url.uri.authority.userinfo.password, "p/a@ss");
    assert_eq!(url.uri.authority.port, 5673);
    assert_eq!(source.target(), "rabbit:5673/%2f");
    let debug = format!("{source:?}");
    assert!(!debug.contains("alice") && !debug.contains("ss"), "{debug}");
    // An unencoded `@` in the password is unambiguous (the last `@` ends it).
    let source = Source::url("amqp://alice:p@ss@rabbit/v").unwrap();
    assert_eq!(source.target(), "rabbit/v");
}

#[test]
fn passwords_holding_delimiters_never_show() {
    // Neither `Xq7` (before the delimiter) nor `Zk9` (after it) may show.
    for password in [
        "Xq7/Zk9", "Xq7?Zk9", "Xq7#Zk9", "Xq7@Zk9", "Xq7:Zk9", "Xq7%Zk9",
    ] {
        for scheme in ["amqp", "amqps"] {
            let url = format!("{scheme}://alice:{password}@rabbit:5672/v?heartbeat=10");
            let text = match Source::url(&url) {
                Ok(source) => {
                    assert_eq!(source.target(), "rabbit:5672/v", "{url}");
                    format!("{source:?}")
                }
                // `/`, `?`, `#`: lapin would read the password's tail as host or vhost.
                Err(e) => format!("{e} {e:?}"),
            };
            assert!(
                !text.contains("Xq7") && !text.contains("Zk9") && !text.contains("alice"),
                "{url} -> {text}"
            );
        }
    }
}

/// Every text a value shows: its `Display` and its `Debug`.
fn shown(error: &NodeListError) -> String {
    format!(
        "{error} / {error:?} / {} / {:?}",
        AmqpError::from(error.clone()),
        AmqpError::from(error.clone())
    )
}

#[test]
fn a_node_list_is_validated_with_typed_errors_that_show_no_secret() {
    let empty: [&str; 0] = [];
    let error = Nodes::parse(&empty).unwrap_err();
    assert_eq!(error, NodeListError::Empty);
    assert!(shown(&error).contains("at least one"), "{}", shown(&error));

    let error = Nodes::parse(&[
        "amqp://alice:Xq7secret@rabbit-1:5672/orders",
        "amqp:alice:Xq7secret@rabbit-2",
    ])
    .unwrap_err();
    assert_eq!(error, NodeListError::InvalidUrl { index: 1 });
    let text = shown(&error);
    assert!(
        text.contains("index 1") && text.contains("amqp://user:password@host:port/vhost"),
        "{text}"
    );

    let error = Nodes::parse(&[
        "amqp://alice:Xq7secret@rabbit-1:5672/orders",
        "amqp://alice:Xq7secret@rabbit-2:5672/orders",
        "amqp://alice:Xq7secret@rabbit-3:5672/billing",
    ])
    .unwrap_err();
    assert!(
        matches!(error, NodeListError::MixedVhosts { index: 2, .. }),
        "{error:?}"
    );
    let text = shown(&error);
    assert!(
        text.contains("`billing`") && text.contains("`orders`"),
        "{text}"
    );

    for other in [
        "amqp://bob:Xq7secret@rabbit-2:5672/orders",
        "amqp://alice:Zk9other@rabbit-2:5672/orders",
        "amqp://rabbit-2:5672/orders",
    ] {
        let error =
            Nodes::parse(&["amqp://alice:Xq7secret@rabbit-1:5672/orders", other]).unwrap_err();
        assert_eq!(
            error,
            NodeListError::MixedCredentials { index: 1 },
            "{other}"
        );
        let text = shown(&error);
        assert!(text.contains("same user and password"), "{text}");
    }

    // Nothing of the credentials shows, whatever went wrong.
    for error in [
        NodeListError::Empty,
        NodeListError::InvalidUrl { index: 1 },
        NodeListError::MixedCredentials { index: 1 },
        Nodes::parse(&["amqp://alice:Xq7secret@r1/a", "amqp://alice:Xq7secret@r2/b"]).unwrap_err(),
    ] {
        let text = shown(&error);
        for secret in ["alice", "bob", "Xq7", "Zk9"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
}

#[test]
fn a_node_list_shows_its_targets_and_no_credentials() {
    let nodes = Nodes::parse(&[
        "amqp://alice:Xq7%2Fsecret@rabbit-1:5672/%2f",
        "amqps://alice:Xq7%2Fsecret@rabbit-2:5671/%2f?heartbeat=3",
    ])
    .unwrap();
    assert_eq!(
        nodes.targets().collect::<Vec<_>>(),
        ["rabbit-1:5672/%2f", "rabbit-2:5671/%2f"]
    );
    let source = Source::nodes(nodes.clone()).with_heartbeat(Duration::from_secs(7));
    assert_eq!(source.target(), "rabbit-1:5672/%2f, rabbit-2:5671/%2f");
    // The settings' heartbeat goes to every node, replacing one in a URL.
    let Source::Nodes(set) = &source else {
        panic!("not a node source");
    };
    assert!(set
        .nodes
        .urls
        .iter()
        .all(|u| u.uri.query.heartbeat == Some(7)));
    for text in [format!("{nodes:?}"), format!("{source:?}")] {
        assert!(
            text.contains("rabbit-1:5672") && text.contains("rabbit-2:5671"),
            "{text}"
        );
        assert!(!text.contains("alice") && !text.contains("Xq7"), "{text}");
    }
    // One URL is a list of one, shown as before.
    let one = Source::url("amqp://alice:Xq7@rabbit:5672/v").unwrap();
    assert_eq!(format!("{one:?}"), "Url(amqp://***@rabbit:5672/v)");
}

#[test]
fn rounds_start_after_the_last_node_that_failed() {
    let source =
        Source::nodes(Nodes::parse(&["amqp://a:1/v", "amqp://b:2/v", "amqp://c:3/v"]).unwrap());
    let Source::Nodes(set) = &source else {
        panic!("not a node source");
    };
    assert_eq!(set.first(), 0);
    set.failed(0);
    assert_eq!(set.first(), 1, "after the failed node");
    set.failed(1);
    set.failed(2);
    assert_eq!(set.first(), 0, "round robin");
    // A failure of a node that is not the next one changes nothing.
    set.failed(2);
    assert_eq!(set.first(), 0);
    // The publisher found node 0 suspect: the next connection tries node 1 first.
    set.avoid(0, "no confirm in time");
    assert_eq!(set.first(), 1);
}
