//! Property tests: the parsers of configuration and identifiers take any text and answer
//! with a value or an error, never a panic, and read back what they print.

use proptest::prelude::*;
use upcoach_core::config::ServiceUrl;
use upcoach_core::event::parse_window;
use upcoach_core::{Role, UserId};

const SCHEMES: &[&str] = &["redis", "unix", "redis+unix", "redis+cluster", "postgres"];

proptest! {
    // No regression files written into the tree: a failing input found here is kept as
    // an explicit test beside these.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_a_service_url_or_a_reason(text in any::<String>()) {
        if let Ok(url) = ServiceUrl::parse(&text, SCHEMES) {
            // Whatever parsed prints without its password and, for a cluster, has seeds.
            if let Some(password) = url.url().password().filter(|p| p.len() > 3) {
                prop_assert!(!url.to_string().contains(password));
            }
            if url.is_cluster() {
                prop_assert!(!url.cluster_seeds().unwrap().is_empty());
            }
        }
    }

    #[test]
    fn cluster_urls_of_any_seeds_parse_or_refuse(
        hosts in proptest::collection::vec(("[a-z0-9.:\\[\\]@%,/?&=]{0,20}", any::<u16>()), 1..6),
    ) {
        let first = format!("{}:{}", hosts[0].0, hosts[0].1);
        let rest: Vec<String> = hosts[1..].iter().map(|(h, p)| format!("addr={h}:{p}")).collect();
        let text = format!("redis+cluster://{first}?{}", rest.join("&"));
        if let Ok(url) = ServiceUrl::parse(&text, SCHEMES) {
            let seeds = url.cluster_seeds().unwrap();
            prop_assert_eq!(seeds.len(), hosts.len());
            // Every seed carries the URL's own credentials, never ones from an addr=.
            for seed in &seeds {
                prop_assert_eq!(seed.url().password(), url.url().password());
                prop_assert_eq!(seed.url().username(), url.url().username());
                prop_assert!(seed.url().port() != Some(0));
            }
        }
    }

    #[test]
    fn any_text_is_a_window_or_none(text in any::<String>()) {
        if let Some(window) = parse_window(&text) {
            prop_assert!(window.as_secs() <= 30 * 86_400);
        }
    }

    #[test]
    fn ids_and_roles_read_back_what_they_print(text in any::<String>()) {
        if let Ok(id) = text.parse::<UserId>() {
            prop_assert_eq!(id.to_string().parse::<UserId>().unwrap(), id);
        }
        if let Ok(role) = text.parse::<Role>() {
            prop_assert_eq!(role.to_string().parse::<Role>().unwrap(), role);
        }
    }
}
