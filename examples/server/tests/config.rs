//! The server's settings, read together from every crate: defaults, every variable,
//! every problem at once, secrets never shown.

use std::collections::HashMap;
use std::time::Duration;
use upcoach_core::config::Settings;

use upcoach_core::config::{ConfigError, ConfigErrors, ConfigProblem};
use upcoach_server::ServerConfig;

fn config(vars: &[(&str, &str)]) -> Result<ServerConfig, ConfigErrors> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ServerConfig::from_lookup(|name| map.get(name).cloned())
}

/// The parts of a configuration that compare.
fn comparable(c: &ServerConfig) -> impl PartialEq + std::fmt::Debug + use<> {
    (
        c.addr,
        c.metrics_public,
        c.services.clone(),
        c.auth.clone(),
        c.cache.clone(),
        c.perf.clone(),
        c.realtime.allowed_origins.clone(),
        c.realtime.max_connections,
        c.realtime.max_connections_per_user,
    )
}

fn only_error(vars: &[(&str, &str)]) -> ConfigError {
    let errors = config(vars).expect_err("should be refused");
    assert_eq!(errors.0.len(), 1, "expected one problem, got {errors}");
    errors.0.into_iter().next().unwrap()
}

const GOOGLE: &[(&str, &str)] = &[
    ("GOOGLE_CLIENT_ID", "web.apps.googleusercontent.com"),
    ("GOOGLE_CLIENT_SECRET", "g-secret-value"),
];
const APPLE_KEY: &str = "-----BEGIN PRIVATE KEY-----\\nMIGTAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBHkwdwIBAQQg\\n-----END PRIVATE KEY-----";
const APPLE: &[(&str, &str)] = &[
    ("APPLE_WEB_CLIENT_ID", "com.example.web"),
    ("APPLE_TEAM_ID", "ABCDE12345"),
    ("APPLE_KEY_ID", "KEY1234567"),
    ("APPLE_PRIVATE_KEY", APPLE_KEY),
];
const FACEBOOK: &[(&str, &str)] = &[
    ("FACEBOOK_APP_ID", "1234567890"),
    ("FACEBOOK_APP_SECRET", "fb-secret-value"),
];

#[test]
fn empty_environment_gives_the_in_memory_defaults() {
    let c = config(&[]).unwrap();
    assert_eq!(comparable(&c), comparable(&ServerConfig::default()));
    assert_eq!(c.addr.to_string(), "127.0.0.1:8080");
    assert!(c.services.redis_url.is_none() && c.services.database_url.is_none());
    assert_eq!(c.cache.prefix, "upcoach");
    assert!(c.perf.enabled);
    assert_eq!(c.perf.slow_query_threshold, Duration::from_millis(1000));
    assert_eq!(
        c.services.database_statement_timeout,
        Duration::from_secs(10)
    );
    assert!(c.auth.google.is_none() && c.auth.apple.is_none() && c.auth.facebook.is_none());
}

#[test]
fn empty_strings_count_as_unset() {
    let c = config(&[
        ("REDIS_URL", ""),
        ("CACHE_PREFIX", "  "),
        ("GOOGLE_CLIENT_ID", ""),
    ])
    .unwrap();
    assert_eq!(comparable(&c), comparable(&ServerConfig::default()));
}

#[test]
fn a_full_environment_is_read() {
    let mut vars = vec![
        ("UPCOACH_ADDR", "[::]:9000"),
        ("REDIS_URL", "redis://:pw@127.0.0.1:6379/2"),
        ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
        (
            "WEBSOCKET_CORS_ORIGINS",
            "https://app.example.com, http://localhost:3000/",
        ),
        ("CACHE_PREFIX", "upcoach_prod"),
        ("PERFORMANCE_MONITORING_ENABLED", "false"),
        ("SLOW_QUERY_THRESHOLD", "250"),
        ("UPCOACH_METRICS_PUBLIC", "no"),
        ("REALTIME_MAX_CONNECTIONS", "19000"),
        ("DATABASE_MAX_CONNECTIONS", "40"),
        ("DATABASE_STATEMENT_TIMEOUT_SECONDS", "0"),
        ("AUTH_REFRESH_GRACE_SECONDS", "10"),
        ("AUTH_SESSION_LIFETIME_DAYS", "30"),
        ("UPCOACH_PUBLIC_URL", "https://api.example.com"),
        (
            "AUTH_RETURN_TO_ALLOWLIST",
            "https://app.example.com/signed-in, http://localhost:3000/cb",
        ),
        ("AUTH_SIGNING_KEY", "c2VlZA"),
        ("GOOGLE_ISSUER_URL", "http://127.0.0.1:9999/"),
        ("GOOGLE_HOSTED_DOMAIN", "example.com"),
        ("REALTIME_MAX_CONNECTIONS_PER_USER", "4"),
        ("GOOGLE_MOBILE_CLIENT_ID", "ios.apps.googleusercontent.com"),
    ];
    vars.extend_from_slice(GOOGLE);
    vars.extend_from_slice(APPLE);
    vars.extend_from_slice(FACEBOOK);
    let c = config(&vars).unwrap();
    assert_eq!(c.addr.port(), 9000);
    assert_eq!(
        c.services.redis_url.as_ref().unwrap().expose(),
        "redis://:pw@127.0.0.1:6379/2"
    );
    assert_eq!(
        c.realtime.allowed_origins,
        ["https://app.example.com", "http://localhost:3000"]
    );
    assert_eq!(c.cache.prefix, "upcoach_prod");
    assert!(!c.perf.enabled);
    assert_eq!(c.perf.slow_query_threshold, Duration::from_millis(250));
    assert!(!c.metrics_public);
    assert_eq!(c.services.database_max_connections, 40);
    assert_eq!(c.services.database_statement_timeout, Duration::ZERO);
    assert_eq!(c.auth.refresh_grace, Duration::from_secs(10));
    assert_eq!(c.auth.session_lifetime, Duration::from_secs(30 * 24 * 3600));
    assert_eq!(c.realtime.max_connections, 19_000);
    assert_eq!(c.realtime.max_connections_per_user, 4);
    assert_eq!(
        c.auth.public_url.as_deref(),
        Some("https://api.example.com")
    );
    assert_eq!(
        c.auth.return_to_allowlist,
        [
            "https://app.example.com/signed-in",
            "http://localhost:3000/cb"
        ]
    );
    assert_eq!(c.auth.signing_key.as_ref().unwrap().expose(), "c2VlZA");
    assert!(c.auth.previous_signing_key.is_none());
    assert_eq!(
        c.auth.google.as_ref().unwrap().issuer_url,
        "http://127.0.0.1:9999"
    );
    assert_eq!(
        c.auth.google.as_ref().unwrap().hosted_domain.as_deref(),
        Some("example.com")
    );
    let google = c.auth.google.as_ref().unwrap();
    assert_eq!(
        google.audiences(),
        [
            "web.apps.googleusercontent.com",
            "ios.apps.googleusercontent.com"
        ]
    );
    let apple = c.auth.apple.as_ref().unwrap();
    assert!(
        apple.private_key.expose().contains("\nMIGT"),
        "\\n escapes become newlines"
    );
    assert_eq!(c.auth.facebook.as_ref().unwrap().app_id, "1234567890");
}

#[test]
fn every_invalid_value_names_its_variable() {
    let cases: &[(&str, &str)] = &[
        ("UPCOACH_ADDR", "localhost"),
        ("UPCOACH_ADDR", "127.0.0.1:99999"),
        ("REDIS_URL", "127.0.0.1:6379"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("REDIS_URL", "rediss://127.0.0.1:6379"),
        ("DATABASE_URL", "mysql://root@localhost/db"),
        ("DATABASE_URL", "postgres://"),
        ("WEBSOCKET_CORS_ORIGINS", "*"),
        ("WEBSOCKET_CORS_ORIGINS", "https://app.example.com/path"),
        ("WEBSOCKET_CORS_ORIGINS", "ftp://app.example.com"),
        ("WEBSOCKET_CORS_ORIGINS", "app.example.com"),
        ("CACHE_PREFIX", "has space"),
        ("CACHE_PREFIX", &"x".repeat(65)),
        ("PERFORMANCE_MONITORING_ENABLED", "maybe"),
        ("UPCOACH_METRICS_PUBLIC", "sometimes"),
        ("SLOW_QUERY_THRESHOLD", "1s"),
        ("SLOW_QUERY_THRESHOLD", "0"),
        ("SLOW_QUERY_THRESHOLD", "-5"),
        ("REALTIME_MAX_CONNECTIONS", "0"),
        ("DATABASE_MAX_CONNECTIONS", "0"),
        ("DATABASE_MAX_CONNECTIONS", "1001"),
        ("DATABASE_MAX_CONNECTIONS", "many"),
        ("DATABASE_STATEMENT_TIMEOUT_SECONDS", "3601"),
        ("DATABASE_STATEMENT_TIMEOUT_SECONDS", "10s"),
        ("DATABASE_STATEMENT_TIMEOUT_SECONDS", "-1"),
        ("AUTH_REFRESH_GRACE_SECONDS", "61"),
        ("AUTH_REFRESH_GRACE_SECONDS", "10s"),
        ("AUTH_SESSION_LIFETIME_DAYS", "0"),
        ("AUTH_SESSION_LIFETIME_DAYS", "366"),
        ("REALTIME_MAX_CONNECTIONS", "lots"),
        ("REALTIME_MAX_CONNECTIONS_PER_USER", "-1"),
        ("UPCOACH_PUBLIC_URL", "api.example.com"),
        ("UPCOACH_PUBLIC_URL", "https://api.example.com/base"),
        (
            "AUTH_RETURN_TO_ALLOWLIST",
            "https://app.example.com/x?next=1",
        ),
        ("AUTH_RETURN_TO_ALLOWLIST", "javascript:alert(1)"),
    ];
    for (var, value) in cases {
        let e = only_error(&[(var, value)]);
        assert_eq!(e.variable, *var, "{var}={value:?}");
        assert!(
            matches!(e.problem, ConfigProblem::Invalid { .. }),
            "{var}={value:?}"
        );
        let text = e.to_string();
        assert!(text.starts_with(var) && text.contains("expected"), "{text}");
    }
}

#[test]
fn every_missing_provider_variable_names_itself() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("GOOGLE_CLIENT_ID", "id")], "GOOGLE_CLIENT_SECRET"),
        (&[("GOOGLE_CLIENT_SECRET", "s")], "GOOGLE_CLIENT_ID"),
        (
            &[("GOOGLE_WEB_CLIENT_ID", "w"), ("GOOGLE_CLIENT_SECRET", "s")],
            "GOOGLE_CLIENT_ID",
        ),
        (&[("FACEBOOK_APP_ID", "123")], "FACEBOOK_APP_SECRET"),
        (&[("FACEBOOK_APP_SECRET", "s")], "FACEBOOK_APP_ID"),
    ];
    for (vars, missing) in cases {
        let e = only_error(vars);
        assert_eq!(e.variable, *missing);
        assert!(matches!(e.problem, ConfigProblem::Missing { .. }));
        assert!(e.to_string().contains("is not set"), "{e}");
    }
    for var in [
        "APPLE_TEAM_ID",
        "APPLE_KEY_ID",
        "APPLE_PRIVATE_KEY",
        "APPLE_WEB_CLIENT_ID",
    ] {
        let vars: Vec<_> = APPLE.iter().copied().filter(|(k, _)| *k != var).collect();
        let e = only_error(&vars);
        assert_eq!(e.variable, var);
        assert!(matches!(e.problem, ConfigProblem::Missing { .. }));
    }
}

#[test]
fn invalid_provider_values_are_refused() {
    let with = |base: &[(&'static str, &'static str)], var: &'static str, value: &str| {
        let mut vars: Vec<(&str, &str)> = base.iter().copied().filter(|(k, _)| *k != var).collect();
        vars.push((var, value));
        only_error(&vars)
    };
    assert_eq!(
        with(APPLE, "APPLE_TEAM_ID", "short").variable,
        "APPLE_TEAM_ID"
    );
    assert_eq!(
        with(APPLE, "APPLE_KEY_ID", "KEY-123456").variable,
        "APPLE_KEY_ID"
    );
    let e = with(APPLE, "APPLE_PRIVATE_KEY", "not a pem");
    assert_eq!(e.variable, "APPLE_PRIVATE_KEY");
    assert!(
        !e.to_string().contains("not a pem"),
        "a secret is never repeated: {e}"
    );
    assert_eq!(
        with(FACEBOOK, "FACEBOOK_APP_ID", "abc").variable,
        "FACEBOOK_APP_ID"
    );
    assert_eq!(
        with(GOOGLE, "GOOGLE_CLIENT_ID", "has space").variable,
        "GOOGLE_CLIENT_ID"
    );
    assert_eq!(
        with(GOOGLE, "GOOGLE_WEB_CLIENT_ID", "has space").variable,
        "GOOGLE_WEB_CLIENT_ID"
    );
    assert_eq!(
        with(GOOGLE, "GOOGLE_MOBILE_CLIENT_ID", "tab\there").variable,
        "GOOGLE_MOBILE_CLIENT_ID"
    );
    assert_eq!(
        with(APPLE, "APPLE_MOBILE_CLIENT_ID", "has space").variable,
        "APPLE_MOBILE_CLIENT_ID"
    );
    assert_eq!(
        with(APPLE, "APPLE_WEB_CLIENT_ID", &"x".repeat(300)).variable,
        "APPLE_WEB_CLIENT_ID"
    );
    assert_eq!(
        with(FACEBOOK, "FACEBOOK_APP_ID", &"1".repeat(33)).variable,
        "FACEBOOK_APP_ID"
    );
}

#[test]
fn all_problems_are_reported_together() {
    let errors = config(&[
        ("UPCOACH_ADDR", "nope"),
        ("SLOW_QUERY_THRESHOLD", "nope"),
        ("GOOGLE_CLIENT_ID", "id"),
    ])
    .unwrap_err();
    let vars: Vec<_> = errors.variables().collect();
    assert_eq!(
        vars,
        [
            "UPCOACH_ADDR",
            "SLOW_QUERY_THRESHOLD",
            "GOOGLE_CLIENT_SECRET"
        ]
    );
    assert!(errors.to_string().starts_with("3 configuration problems:"));
}

#[test]
fn secrets_never_show_in_debug_or_errors() {
    let mut vars = vec![
        ("REDIS_URL", "redis://user:redis-pass-value@127.0.0.1:6379"),
        (
            "DATABASE_URL",
            "postgres://app:pg-pass-value@127.0.0.1:5432/db",
        ),
    ];
    vars.extend_from_slice(GOOGLE);
    vars.extend_from_slice(APPLE);
    vars.extend_from_slice(FACEBOOK);
    let c = config(&vars).unwrap();
    let debug = format!("{c:?} {c:#?}");
    for secret in [
        "redis-pass-value",
        "pg-pass-value",
        "g-secret-value",
        "fb-secret-value",
        "MIGTAgEAMBMG",
    ] {
        assert!(
            !debug.contains(secret),
            "{secret} leaked into Debug: {debug}"
        );
    }
    assert!(debug.contains("postgres://app:***@127.0.0.1:5432/db"));

    // An unusable URL that carries a password is not echoed either.
    let e = only_error(&[("REDIS_URL", "http://u:leaky-pass@127.0.0.1")]);
    assert!(!e.to_string().contains("leaky-pass"), "{e}");
    let e = only_error(&[(
        "WEBSOCKET_CORS_ORIGINS",
        "https://u:origin-pass@app.example.com",
    )]);
    assert!(!e.to_string().contains("origin-pass"), "{e}");

    // Passwords in query parameters are redacted as well.
    let c = config(&[
        (
            "DATABASE_URL",
            "postgres://app@db/app?password=qp-secret&sslmode=disable",
        ),
        ("REDIS_URL", "unix:///run/redis.sock?pass=unix-secret&db=2"),
    ])
    .unwrap();
    let shown = format!(
        "{c:?} {} {}",
        c.services.database_url.as_ref().unwrap(),
        c.services.redis_url.as_ref().unwrap()
    );
    assert!(
        !shown.contains("qp-secret") && !shown.contains("unix-secret"),
        "{shown}"
    );
    assert!(
        shown.contains("sslmode=disable") && shown.contains("db=2"),
        "{shown}"
    );
    assert!(
        c.services
            .database_url
            .unwrap()
            .expose()
            .contains("qp-secret")
    );
}

/// The variables of one generic OpenID provider `name` (`OIDC_<NAME>_*`), required ones
/// only.
fn openid_vars(name: &str) -> Vec<(String, String)> {
    let prefix = format!("OIDC_{}", name.to_ascii_uppercase().replace('-', "_"));
    vec![
        (
            format!("{prefix}_ISSUER"),
            format!("https://{name}.example.com"),
        ),
        (format!("{prefix}_CLIENT_ID"), format!("{name}-client")),
        (
            format!("{prefix}_CLIENT_SECRET"),
            format!("{name}-secret-value"),
        ),
    ]
}

/// `vars` as the borrowed pairs [`config`] takes.
fn borrowed(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[test]
fn openid_providers_are_read_with_every_variable() {
    let vars = [
        ("OIDC_PROVIDERS", " corp , my-idp "),
        ("OIDC_CORP_ISSUER", "https://sso.corp.example/realms/staff/"),
        ("OIDC_CORP_CLIENT_ID", "corp-web"),
        ("OIDC_CORP_CLIENT_SECRET", "corp-secret-value"),
        ("OIDC_CORP_SCOPES", "email,read_user  groups"),
        ("OIDC_CORP_AUDIENCES", "corp-ios, corp-android,corp-web"),
        ("OIDC_CORP_TRUSTED_FOR_LINKING", "yes"),
        ("OIDC_MY_IDP_ISSUER", "http://127.0.0.1:9000"),
        ("OIDC_MY_IDP_CLIENT_ID", "idp-web"),
        ("OIDC_MY_IDP_CLIENT_SECRET", "idp-secret-value"),
    ];
    let c = config(&vars).unwrap();
    let [corp, idp] = &c.auth.openid[..] else {
        panic!("two providers: {:?}", c.auth.openid);
    };
    assert_eq!(corp.name.as_str(), "corp");
    assert_eq!(corp.issuer_url, "https://sso.corp.example/realms/staff");
    assert_eq!(corp.client_id, "corp-web");
    assert_eq!(corp.client_secret.expose(), "corp-secret-value");
    assert_eq!(corp.scopes, ["openid", "email", "read_user", "groups"]);
    assert_eq!(
        corp.other_audiences,
        ["corp-ios", "corp-android", "corp-web"]
    );
    assert_eq!(corp.audiences(), ["corp-web", "corp-ios", "corp-android"]);
    assert!(corp.trusted_for_linking);
    assert!(corp.other_issuers.is_empty() && corp.hosted_domain.is_none());

    assert_eq!(idp.name.as_str(), "my-idp");
    assert_eq!(idp.issuer_url, "http://127.0.0.1:9000");
    assert_eq!(idp.scopes, ["openid", "email", "profile"], "the default");
    assert!(idp.other_audiences.is_empty());
    assert!(!idp.trusted_for_linking, "not trusted unless said");

    let debug = format!("{c:?} {c:#?}");
    assert!(
        !debug.contains("corp-secret-value") && !debug.contains("idp-secret-value"),
        "{debug}"
    );

    // Without OIDC_PROVIDERS nothing is read, whatever OIDC_* says.
    let c = config(&vars[1..]).unwrap();
    assert!(c.auth.openid.is_empty());
    let c = config(&[("OIDC_PROVIDERS", " , ")]).unwrap();
    assert!(c.auth.openid.is_empty());
}

#[test]
fn each_missing_openid_variable_names_itself() {
    for missing in [
        "OIDC_CORP_ISSUER",
        "OIDC_CORP_CLIENT_ID",
        "OIDC_CORP_CLIENT_SECRET",
    ] {
        let mut vars = openid_vars("corp");
        vars.retain(|(k, _)| k != missing);
        vars.push(("OIDC_PROVIDERS".into(), "corp".into()));
        let e = only_error(&borrowed(&vars));
        assert_eq!(e.variable, missing);
        assert!(matches!(e.problem, ConfigProblem::Missing { .. }), "{e}");
        assert!(e.to_string().contains("OIDC_PROVIDERS"), "says why: {e}");
    }
    let errors = config(&[("OIDC_PROVIDERS", "corp")]).unwrap_err();
    assert_eq!(
        errors.variables().collect::<Vec<_>>(),
        [
            "OIDC_CORP_ISSUER",
            "OIDC_CORP_CLIENT_ID",
            "OIDC_CORP_CLIENT_SECRET"
        ]
    );
}

#[test]
fn built_in_duplicate_invalid_and_too_many_names_are_refused() {
    let mut corp = openid_vars("corp");
    for names in [
        "google",
        "apple",
        "facebook",
        "corp,google",
        "corp,corp",
        "corp, corp ",
        "Corp",
        "my_idp",
        "1corp",
        "-corp",
        "corp/x",
        "abcdefghijklmnopqrstuvwxyz0123456",
    ] {
        corp.retain(|(k, _)| k != "OIDC_PROVIDERS");
        corp.push(("OIDC_PROVIDERS".into(), names.into()));
        let e = only_error(&borrowed(&corp));
        assert_eq!(e.variable, "OIDC_PROVIDERS", "{names}");
        assert!(
            matches!(e.problem, ConfigProblem::Invalid { .. }),
            "{names}: {e}"
        );
    }

    // Sixteen at most.
    let names: Vec<String> = (1..=17).map(|i| format!("idp{i}")).collect();
    let mut vars: Vec<(String, String)> = names.iter().flat_map(|n| openid_vars(n)).collect();
    vars.push(("OIDC_PROVIDERS".into(), names[..16].join(",")));
    assert_eq!(config(&borrowed(&vars)).unwrap().auth.openid.len(), 16);
    vars.pop();
    vars.push(("OIDC_PROVIDERS".into(), names.join(",")));
    let e = only_error(&borrowed(&vars));
    assert_eq!(e.variable, "OIDC_PROVIDERS");
}

#[test]
fn invalid_openid_values_name_their_variable() {
    let cases: &[(&str, &str)] = &[
        ("OIDC_CORP_SCOPES", "openid \"email\""),
        ("OIDC_CORP_SCOPES", "openid em\\ail"),
        ("OIDC_CORP_SCOPES", "openid e\u{e9}mail"),
        ("OIDC_CORP_ISSUER", "http://sso.corp.example"),
        ("OIDC_CORP_ISSUER", "http://10.0.0.5:8080"),
        ("OIDC_CORP_ISSUER", "sso.corp.example"),
        ("OIDC_CORP_ISSUER", "ftp://sso.corp.example"),
        ("OIDC_CORP_ISSUER", "https://sso.corp.example/?realm=staff"),
        ("OIDC_CORP_ISSUER", "https://sso.corp.example/#x"),
        ("OIDC_CORP_CLIENT_ID", "has space"),
        ("OIDC_CORP_AUDIENCES", "corp-ios, has space"),
        ("OIDC_CORP_TRUSTED_FOR_LINKING", "maybe"),
    ];
    for (var, value) in cases {
        let mut vars = openid_vars("corp");
        vars.retain(|(k, _)| k != var);
        vars.push(((*var).into(), (*value).into()));
        vars.push(("OIDC_PROVIDERS".into(), "corp".into()));
        let e = only_error(&borrowed(&vars));
        assert_eq!(e.variable, *var, "{var}={value:?}");
        assert!(
            matches!(e.problem, ConfigProblem::Invalid { .. }),
            "{var}={value:?}"
        );
    }
    // https anywhere, and http to loopback (a test provider or a local IdP).
    for issuer in [
        "https://sso.corp.example",
        "https://sso.corp.example:8443/realms/staff",
        "http://127.0.0.1:9000",
        "http://localhost:8080/realms/dev",
        "http://[::1]:9000",
    ] {
        let mut vars = openid_vars("corp");
        vars.retain(|(k, _)| k != "OIDC_CORP_ISSUER");
        vars.push(("OIDC_CORP_ISSUER".into(), issuer.into()));
        vars.push(("OIDC_PROVIDERS".into(), "corp".into()));
        let c = config(&borrowed(&vars)).unwrap_or_else(|e| panic!("{issuer}: {e}"));
        assert_eq!(c.auth.openid[0].issuer_url, issuer);
    }
}

#[test]
fn a_dash_in_a_provider_name_is_an_underscore_in_its_variables() {
    let mut vars = openid_vars("my-idp");
    assert_eq!(vars[0].0, "OIDC_MY_IDP_ISSUER");
    vars.push(("OIDC_MY_IDP_TRUSTED_FOR_LINKING".into(), "true".into()));
    vars.push(("OIDC_MY_IDP_SCOPES".into(), "email".into()));
    vars.push(("OIDC_PROVIDERS".into(), "my-idp".into()));
    let c = config(&borrowed(&vars)).unwrap();
    let idp = &c.auth.openid[0];
    assert_eq!(idp.name.as_str(), "my-idp");
    assert_eq!(idp.client_id, "my-idp-client");
    assert_eq!(idp.scopes, ["openid", "email"]);
    assert!(idp.trusted_for_linking);

    // The name as written is not read.
    let errors = config(&[
        ("OIDC_PROVIDERS", "my-idp"),
        ("OIDC_MY-IDP_ISSUER", "https://idp.example.com"),
        ("OIDC_MY-IDP_CLIENT_ID", "id"),
        ("OIDC_MY-IDP_CLIENT_SECRET", "s"),
    ])
    .unwrap_err();
    assert_eq!(
        errors.variables().collect::<Vec<_>>(),
        [
            "OIDC_MY_IDP_ISSUER",
            "OIDC_MY_IDP_CLIENT_ID",
            "OIDC_MY_IDP_CLIENT_SECRET"
        ]
    );
}

#[test]
fn openid_secrets_never_show_in_errors() {
    // A secret next to a broken variable, and credentials in a refused issuer URL.
    let mut vars = openid_vars("corp");
    vars.retain(|(k, _)| k != "OIDC_CORP_ISSUER");
    vars.push((
        "OIDC_CORP_ISSUER".into(),
        "https://admin:leaky-issuer-pass@sso.corp.example".into(),
    ));
    vars.push(("OIDC_PROVIDERS".into(), "corp".into()));
    let errors = config(&borrowed(&vars)).unwrap_err();
    assert_eq!(errors.variables().collect::<Vec<_>>(), ["OIDC_CORP_ISSUER"]);
    let shown = format!("{errors} {errors:?}");
    assert!(!shown.contains("corp-secret-value"), "{shown}");
    assert!(!shown.contains("leaky-issuer-pass"), "{shown}");
}
