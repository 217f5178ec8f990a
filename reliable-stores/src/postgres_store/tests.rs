//! Unit tests of the PostgreSQL store that need no database.

use super::*;
use crate::util::leak_check::{leaks, PASSWORDS};

#[test]
fn table_names_must_be_plain_identifiers() {
    assert!(valid_table("reliable_idempotency"));
    assert!(valid_table("_inbox2"));
    assert!(!valid_table(""));
    assert!(!valid_table("2inbox"));
    assert!(!valid_table("Inbox"));
    assert!(!valid_table("public.inbox"));
    assert!(!valid_table("inbox; DROP TABLE x"));
    assert!(!valid_table(&"a".repeat(49)));
}

/// The error of connecting to `url` (a closed port: nothing answers), Display and Debug.
async fn connect_error(url: String) -> (String, String) {
    let config = PostgresStoreConfig {
        timeout: Duration::from_secs(1),
        ..Default::default()
    };
    match PostgresStore::connect(&url, config).await {
        Ok(_) => panic!("something answered at {url}"),
        Err(e) => (url, format!("{e} | {e:?}")),
    }
}

#[tokio::test]
async fn connect_errors_never_show_a_url_password_holding_delimiters() {
    let mut urls = vec!["postgres://app:pa/ss@127.0.0.1:1/shop".to_owned()];
    for password in PASSWORDS {
        urls.extend([
            format!("postgres://app:{password}@127.0.0.1:1/shop"),
            format!("postgresql://app:{password}@127.0.0.1:1/shop"),
            format!("postgres://app@127.0.0.1:1/shop?sslmode=disable&password={password}"),
        ]);
    }
    let shown = leaks(urls, &["pa/ss", "Xq7", "Zk9"], connect_error).await;
    assert_eq!(shown, "");
}

#[tokio::test]
async fn connect_errors_never_show_a_key_value_password() {
    let strings = [
        "host=127.0.0.1 port=1 user=app password='Xq7 Zk9' dbname=shop",
        "host=127.0.0.1 port=1 user=app password = Xq7/Zk9 dbname=shop",
        r"host=127.0.0.1 port=1 user=app password='Xq7\' Zk9' dbname=shop",
        r"host=127.0.0.1 port=1 user=app password=Xq7\ Zk9 dbname=shop",
        "host=127.0.0.1 port=1 user=app password='Xq7/?#@:%Zk9' dbname=shop",
    ];
    let strings = strings.map(String::from).to_vec();
    assert_eq!(leaks(strings, &["Xq7", "Zk9"], connect_error).await, "");
}
