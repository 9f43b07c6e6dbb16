//! Property tests of the SQL digest normaliser: any text, never a panic, a bounded
//! digest, and normalising a digest again changes nothing.

use proptest::prelude::*;
use upcoach_perf::slow::normalize_sql;

proptest! {
    // No regression files written into the tree: a failing input found here is kept as
    // an explicit test beside these.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_text_normalises_without_panic(sql in any::<String>()) {
        let digest = normalize_sql(&sql);
        prop_assert!(digest.len() <= sql.len() + 2 * 2048);
    }

    #[test]
    fn sql_like_text_normalises_to_a_fixed_point(
        sql in "(select|SELECT|from|where|and|in|=|<|>|\\(|\\)|,|;|'[a-z0-9 ']{0,8}'|\"[a-z]{0,5}\"|[0-9.]{1,6}|\\$[0-9]|[a-z_]{1,8}|--[a-z ]{0,6}\n|/\\*[a-z ]{0,6}\\*/| |\n|\t){0,60}",
    ) {
        let once = normalize_sql(&sql);
        prop_assert_eq!(normalize_sql(&once), once.clone(), "from {:?}", sql);
    }
}
