use super::*;

#[test]
fn literals_become_placeholders() {
    let cases = [
        ("SELECT pg_sleep(0.3)", "SELECT pg_sleep(?)"),
        ("SELECT pg_sleep(0.05)", "SELECT pg_sleep(?)"),
        (
            "select  *\n from users where id = $1",
            "select * from users where id = ?",
        ),
        (
            "SELECT 'it''s', E'a\\'b', $tag$x $ y$tag$, $$z$$",
            "SELECT ?",
        ),
        (
            "SELECT * FROM t WHERE id IN (1, 2,3, 4)",
            "SELECT * FROM t WHERE id IN (?)",
        ),
        (
            "SELECT a.b, t2.c FROM t1 a -- comment\n JOIN t2 ON t2.id = a.id /* x */",
            "SELECT a.b, t2.c FROM t1 a JOIN t2 ON t2.id = a.id",
        ),
        (
            "SELECT $1::uuid[], x::text FROM \"Weird Table\"",
            "SELECT ?::uuid[], x::text FROM \"Weird Table\"",
        ),
        (
            "INSERT INTO t (a, b) VALUES ('x', 12.5e3)",
            "INSERT INTO t (a, b) VALUES (?)",
        ),
        ("SELECT 'unterminated", "SELECT ?"),
        // A backslash is an escape only in E'' strings: 'C:\' ends the literal.
        (
            "SELECT * FROM f WHERE p = 'C:\\' AND owner = 'alice'",
            "SELECT * FROM f WHERE p = ? AND owner = ?",
        ),
        ("SELECT E'a\\' still inside' AS x", "SELECT ? AS x"),
        ("SELECT ünïcode FROM t", "SELECT ünïcode FROM t"),
        ("", ""),
    ];
    for (sql, want) in cases {
        assert_eq!(normalize_sql(sql), want, "{sql:?}");
    }
}

#[test]
fn normalization_is_bounded_and_never_panics_on_odd_input() {
    let long = "SELECT ".to_owned() + &"x, ".repeat(100_000);
    assert!(normalize_sql(&long).len() <= 8192);
    for odd in [
        "'", "$", "$a", "$a$", "--", "/*", "E'", "\"", "::", "é'é", "\u{0}",
    ] {
        let _ = normalize_sql(odd);
    }
}

#[test]
fn only_statements_at_or_above_the_threshold_are_kept() {
    let log = SlowQueryLog::new(Duration::from_millis(100), 10);
    log.observe("SELECT pg_sleep(0.3)", Duration::from_millis(300));
    log.observe("SELECT pg_sleep(0.05)", Duration::from_millis(50));
    log.observe("SELECT pg_sleep(0.25)", Duration::from_millis(250));
    let digests = log.digests();
    assert_eq!(digests.len(), 1);
    assert_eq!(digests[0].digest, "SELECT pg_sleep(?)");
    assert_eq!(digests[0].count, 2);
    assert!((digests[0].max_ms - 300.0).abs() < 0.01);
    assert!(log.sample("SELECT pg_sleep(?)").is_some());
}

#[test]
fn the_table_of_digests_is_bounded() {
    let log = SlowQueryLog::new(Duration::ZERO, 3);
    for table in ["a", "b", "c", "d", "e"] {
        log.observe(&format!("SELECT * FROM {table}"), Duration::from_millis(1));
    }
    assert_eq!(log.digests().len(), 3);
    assert_eq!(log.evicted(), 2);
}
