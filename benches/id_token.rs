//! Id-token verification with a warm JWKS cache vs bare `jsonwebtoken::decode` of the
//! same RS256 token with the same key, in the same run.
//!
//! Our path adds the pinned-algorithm header check, the key lookup and every claim
//! check (issuer, audience, azp, exp/nbf/iat by the clock, sub, nonce in constant time);
//! the bare one checks the signature and `exp` only.
//!
//! `cargo bench --bench id_token`

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{ready, runtime};
use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use upcoach_auth::oidc::{IdTokenRules, IdTokenVerifier, JwksCache};
use upcoach_core::SystemClock;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/upcoach-auth/tests/fixtures");

/// Serves the fixture key set over HTTP on a thread of its own.
fn key_server() -> String {
    let jwks = std::fs::read(format!("{FIXTURES}/provider.jwks.json")).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: max-age=3600\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                jwks.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&jwks);
        }
    });
    format!("http://{addr}/certs")
}

fn id_token_verify(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://accounts.google.com", "aud": "web-client", "sub": "10769150350006150715113082367",
        "email": "jan@example.test", "email_verified": true, "iat": now, "exp": now + 3600, "nonce": "n-0S6_WzA2Mj",
    });
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("provider-key-1".into());
    let der = std::fs::read(format!("{FIXTURES}/provider.der")).unwrap();
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_der(&der)).unwrap();

    let keys = JwksCache::new(key_server(), oauth2::reqwest::Client::new());
    let verifier = IdTokenVerifier::new(
        IdTokenRules::rs256(
            ["https://accounts.google.com", "accounts.google.com"],
            ["web-client"],
        ),
        Arc::new(keys),
        Arc::new(SystemClock),
    );
    // Warm the cache: the one fetch happens here.
    rt.block_on(verifier.verify(&token, Some("n-0S6_WzA2Mj")))
        .unwrap();

    let jwks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{FIXTURES}/provider.jwks.json")).unwrap())
            .unwrap();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwks["keys"][0].clone()).unwrap();
    let bare_key = DecodingKey::from_jwk(&jwk).unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&["web-client"]);

    let mut group = c.benchmark_group("id_token_verify");
    group.bench_function("bare_jsonwebtoken_decode", |b| {
        b.iter(|| {
            jsonwebtoken::decode::<serde_json::Value>(&token, &bare_key, &validation).unwrap()
        })
    });
    group.bench_function("upcoach_id_token_verifier", |b| {
        b.iter(|| ready(verifier.verify(&token, Some("n-0S6_WzA2Mj"))).unwrap())
    });
    group.finish();
}

criterion_group!(benches, id_token_verify);
criterion_main!(benches);
