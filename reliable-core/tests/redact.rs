//! Every connection-string form the workspace's crates accept, with passwords holding the
//! characters that end a URL part somewhere: `/ ? # @ : %`.

use proptest::prelude::*;
use reliable_core::redact::{
    host_and_path, is_secret_key, redact_url, secrets, userinfo, Scrubber, MASK,
};

/// One password per delimiter, and all of them at once. Each test checks that neither `Xq7`
/// (before the delimiter) nor `Zk9` (after it) shows.
const PASSWORDS: [&str; 7] = [
    "Xq7/Zk9",
    "Xq7?Zk9",
    "Xq7#Zk9",
    "Xq7@Zk9",
    "Xq7:Zk9",
    "Xq7%Zk9",
    "Xq7/?#@:%Zk9",
];

fn assert_hidden(input: &str, shown: &str) {
    assert!(
        !shown.contains("Xq7") && !shown.contains("Zk9"),
        "{input} -> {shown}"
    );
}

/// `password` as a libpq value: quoted, `\` and `'` escaped.
fn quoted(password: &str) -> String {
    format!("'{}'", password.replace('\\', r"\\").replace('\'', r"\'"))
}

#[test]
fn url_passwords_are_masked_in_every_scheme_and_the_rest_is_kept() {
    for password in PASSWORDS {
        for (url, expected, host, path) in [
            (
                "amqp://app:{pw}@h:5672/%2f",
                "amqp://app:***@h:5672/%2f",
                "h:5672",
                "/%2f",
            ),
            (
                "amqps://app:{pw}@h/v?heartbeat=10",
                "amqps://app:***@h/v?heartbeat=10",
                "h",
                "/v",
            ),
            (
                "redis://default:{pw}@h:6379/0",
                "redis://default:***@h:6379/0",
                "h:6379",
                "/0",
            ),
            (
                "redis://:{pw}@[::1]:6379",
                "redis://:***@[::1]:6379",
                "[::1]:6379",
                "",
            ),
            (
                "rediss://u:{pw}@h:6380/1#insecure",
                "rediss://u:***@h:6380/1#insecure",
                "h:6380",
                "/1",
            ),
            (
                "postgres://app:{pw}@h:5432/shop",
                "postgres://app:***@h:5432/shop",
                "h:5432",
                "/shop",
            ),
            (
                "postgresql://app:{pw}@h1,h2:5433/shop?sslmode=disable",
                "postgresql://app:***@h1,h2:5433/shop?sslmode=disable",
                "h1,h2:5433",
                "/shop",
            ),
        ] {
            let url = url.replace("{pw}", password);
            assert_eq!(redact_url(&url), expected, "{url}");
            assert_eq!(host_and_path(&url), Some((host, path)), "{url}");
            assert_eq!(secrets(&url), [password], "{url}");
            assert!(
                userinfo(&url).is_some_and(|u| u.ends_with(password)),
                "{url}"
            );
        }
    }
}

#[test]
fn query_passwords_are_masked() {
    for password in PASSWORDS {
        for url in [
            format!("postgres://app@h:5432/shop?sslmode=disable&password={password}"),
            format!("postgres://h/shop?password={password}&sslmode=disable"),
            format!("redis+unix:///run/redis.sock?db=0&pass={password}"),
            format!("unix:///run/redis.sock?pass={password}&db=1"),
            format!("redis://h:6379/0?PASSWORD={password}"),
        ] {
            let shown = redact_url(&url);
            assert_hidden(&url, &shown);
            if !password.contains('@') {
                // Without a `@` the rest is exact: only the value is masked.
                assert_eq!(shown, url.replace(password, MASK), "{url}");
            }
        }
    }
    assert_eq!(
        host_and_path("redis+unix:///run/redis.sock?pass=x"),
        Some(("", "/run/redis.sock"))
    );
    // The last `@` is inside the query: the host cannot be told from the password.
    assert_eq!(host_and_path("redis://h/0?password=p@ss"), None);
}

#[test]
fn key_value_passwords_are_masked_as_tokio_postgres_reads_them() {
    for password in PASSWORDS {
        let input = format!("host=h user=app password={} dbname=shop", quoted(password));
        assert_eq!(
            redact_url(&input),
            "host=h user=app password=*** dbname=shop"
        );
        let input = format!("host=h password = {password} dbname=shop");
        assert_eq!(redact_url(&input), "host=h password = *** dbname=shop");
    }
    for (input, expected) in [
        ("host=h password='a b' port=1", "host=h password=*** port=1"),
        (
            r"host=h password='Xq7\' Zk9' port=1",
            "host=h password=*** port=1",
        ),
        (
            r"host=h password=Xq7\ Zk9 port=1",
            "host=h password=*** port=1",
        ),
        (
            "host=h sslpassword=Xq7 port=1",
            "host=h sslpassword=*** port=1",
        ),
        // tokio-postgres takes the next word as the value.
        ("password= Xq7Zk9", "password= ***"),
        // From where it stops parsing, everything is masked.
        ("host=h password='Xq7 Zk9", "host=h ***"),
        ("host='h password=Xq7Zk9", "***"),
        ("host=h password=", "host=h ***"),
        ("host=h Xq7Zk9", "host=h ***"),
        ("hôst=h password=Xq7Zk9", "***"),
    ] {
        assert_eq!(redact_url(input), expected, "{input}");
    }
    assert_eq!(secrets("host=h password='a b'"), ["'a b'"]);
}

#[test]
fn strings_without_a_url_scheme_are_masked_up_to_the_last_at() {
    for password in PASSWORDS {
        for input in [
            format!("sasl_ssl://app:{password}@b1:9092,b2:9092"),
            format!("app:{password}@h:5672"),
            format!("amqp:app:{password}@h"),
        ] {
            let shown = redact_url(&input);
            assert_hidden(&input, &shown);
            assert!(shown.starts_with("***@"), "{input} -> {shown}");
        }
    }
    assert_eq!(host_and_path("app:pw@h:5672"), None);
    assert_eq!(userinfo("app:pw@h:5672"), None);
}

#[test]
fn strings_without_credentials_are_kept() {
    for input in [
        "",
        "b1:9092,b2:9092",
        "SASL_SSL://b1:9092",
        "amqp://h:5672/v?heartbeat=10",
        "redis://h:1/0",
        "redis://user@h",
        "redis://[::1]:6379/0",
        "postgres://h1:5432,h2:5433/db",
        "postgres:///shop?host=/run/postgresql",
        "host=h port=5432 user=app dbname=shop",
    ] {
        assert_eq!(redact_url(input), input);
        assert!(secrets(input).is_empty(), "{input}");
    }
    assert_eq!(host_and_path("redis://user@h"), Some(("h", "")));
    assert_eq!(userinfo("redis://h:1/0"), None);
}

#[test]
fn an_authority_that_is_no_host_and_port_is_masked_with_all_after_it() {
    for input in [
        "amqp://user:secret",
        "amqp://user:pa/ss",
        "amqp://user:pa?ss",
        "redis://u:pa:12/0",
    ] {
        let scheme = input.split_once("://").map(|(s, _)| s).unwrap_or_default();
        assert_eq!(redact_url(input), format!("{scheme}://***"), "{input}");
        assert_eq!(host_and_path(input), None, "{input}");
    }
}

#[test]
fn a_user_that_is_no_plain_name_is_masked_too() {
    // A `@` in the query: everything before it is taken for userinfo.
    assert_eq!(redact_url("redis://h/0?password=p@ss"), "redis://***");
    assert_eq!(
        redact_url("postgres://u:p@h/db?application_name=a@b"),
        "postgres://u:***@b"
    );
}

#[test]
fn secret_keys_cover_every_crate() {
    for name in [
        "password",
        "PASSWORD",
        "pass",
        "sslpassword",
        "sasl.password",
        "sasl.username",
        "ssl.key.password",
        "ssl.key.pem",
        "ssl.keystore.password",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.assertion.private.key.passphrase",
    ] {
        assert!(is_secret_key(name), "{name}");
    }
    for name in ["bootstrap.servers", "user", "host", "db", "sslmode"] {
        assert!(!is_secret_key(name), "{name}");
    }
}

#[test]
fn the_scrubber_removes_raw_and_decoded_secrets() {
    let mut s = Scrubber::default();
    s.add("p%40ss");
    assert_eq!(
        s.scrub("auth p@ss and p%40ss failed"),
        "auth *** and *** failed"
    );
    s.add("");
    assert_eq!(s.scrub("nothing"), "nothing");
    assert_eq!(format!("{s:?}"), "Scrubber(2 secret(s))");

    let mut s = Scrubber::default();
    s.add_secrets_of("postgres://app:Xq7/Zk9@h/db?password=Qw8");
    assert_eq!(
        s.scrub("user app password Xq7/Zk9 or Qw8"),
        "user app password *** or ***"
    );
}

proptest! {
    #[test]
    fn a_url_password_never_shows(middle in "[/?#@:%&= a-e]{0,12}") {
        let password = format!("Xq7{middle}Zk9");
        for scheme in ["amqp", "amqps", "redis", "rediss", "postgres", "postgresql"] {
            let url = format!("{scheme}://app:{password}@h:1/x");
            prop_assert_eq!(redact_url(&url), format!("{scheme}://app:***@h:1/x"));
            prop_assert_eq!(host_and_path(&url), Some(("h:1", "/x")));
        }
        let input = format!("host=h password={} port=1", quoted(&password));
        prop_assert_eq!(redact_url(&input), "host=h password=*** port=1");
        let url = format!("postgres://h/db?password={}", password.replace('&', "%26"));
        assert_hidden(&url, &redact_url(&url));
    }

    #[test]
    fn any_input_is_handled_without_panicking(input in "\\PC{0,40}") {
        let _ = (redact_url(&input), secrets(&input), userinfo(&input), host_and_path(&input));
    }
}
