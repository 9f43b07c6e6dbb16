//! Property tests of SSE cursors (`Last-Event-ID`, `last_event_id=`): any text is a
//! cursor or a reason, never a panic; a cursor reads back what it prints.

use proptest::prelude::*;
use upcoach_realtime::Cursor;

proptest! {
    // No regression files written into the tree: a failing input found here is kept as
    // an explicit test beside these.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_a_cursor_or_a_reason(text in any::<String>()) {
        if let Ok(cursor) = text.parse::<Cursor>() {
            prop_assert_eq!(cursor.to_string().parse::<Cursor>().unwrap(), cursor);
        }
    }

    #[test]
    fn cursor_like_text_is_a_cursor_or_a_reason(text in "[a-z0-9:=,_.-]{0,300}") {
        if let Ok(cursor) = text.parse::<Cursor>() {
            prop_assert_eq!(cursor.to_string().parse::<Cursor>().unwrap(), cursor);
        }
    }

    #[test]
    fn a_cursor_of_valid_rooms_reads_back(
        rooms in proptest::collection::btree_map("public:[a-z0-9]{1,12}", any::<u64>(), 0..20),
    ) {
        let text: Vec<String> = rooms.iter().map(|(room, seq)| format!("{room}={seq}")).collect();
        let cursor: Cursor = text.join(",").parse().unwrap();
        for (room, seq) in &rooms {
            prop_assert_eq!(cursor.get(room), Some(*seq));
        }
        prop_assert_eq!(cursor.to_string().parse::<Cursor>().unwrap(), cursor);
    }
}
