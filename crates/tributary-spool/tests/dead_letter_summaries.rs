//! `Spool::dead_letter_summaries` on a real SQLite spool: the same dead letters as
//! `dead_letters`, without bodies, reasons cut to the documented maximum, and `stats`
//! counting their bytes.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use tributary_spool::{DeadLetterSummary, Payload, Receipt, Spool, SqliteConfig, SqliteSpool};

fn payload(n: usize) -> Payload {
    Payload {
        route: if n.is_multiple_of(2) { "eu" } else { "us" }.into(),
        header: Bytes::from_static(br#""account_id":"1","project_id":"2","revision":"3""#),
        visitors: Bytes::from(format!(
            r#"{{"visitor_id":"v{n}","pad":"{}"}}"#,
            "x".repeat(n * 100)
        )),
        visitor_count: 1,
    }
}

#[tokio::test]
async fn summaries_match_the_dead_letters_without_bodies_and_cut_long_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap();
    spool.append((1..=3).map(payload).collect()).await.unwrap();
    let leased = spool
        .lease(10, usize::MAX, Duration::from_secs(600))
        .await
        .unwrap();
    let receipts: Vec<Receipt> = leased.iter().map(|l| l.receipt.clone()).collect();
    // Multi-byte characters: the cut is by characters, never inside one.
    let long_reason = "é".repeat(DeadLetterSummary::MAX_REASON_CHARS + 50);
    spool.dead_letter(&receipts, &long_reason).await.unwrap();

    let full = spool.dead_letters(10).await.unwrap();
    let summaries = spool
        .dead_letter_summaries(10)
        .await
        .unwrap()
        .expect("a SQLite spool lists its dead letters");
    assert_eq!(summaries.len(), 3);
    for (s, d) in summaries.iter().zip(&full) {
        assert_eq!(s.id, d.id);
        assert_eq!(s.route.as_str(), d.payload.route.as_str());
        assert_eq!(s.visitor_count, d.payload.visitor_count);
        assert_eq!(s.stored_len, d.payload.stored_len());
        assert_eq!(s.appended_at_ms, d.appended_at_ms);
        assert_eq!(s.dead_at_ms, d.dead_at_ms);
        assert_eq!(
            d.reason, long_reason,
            "the dead letter keeps the whole reason"
        );
        assert_eq!(
            s.reason.chars().count(),
            DeadLetterSummary::MAX_REASON_CHARS
        );
        assert!(long_reason.starts_with(&s.reason));
    }
    assert_eq!(
        spool.dead_letter_summaries(2).await.unwrap().unwrap().len(),
        2
    );

    let stats = spool.stats().await.unwrap();
    let bytes: usize = summaries.iter().map(|s| s.stored_len).sum();
    assert_eq!(stats.dead_bytes, bytes as u64);
    assert_eq!(stats.pending_bytes, 0);
    assert_eq!(
        spool.release_unhanded().await.unwrap(),
        0,
        "SQLite holds no stash"
    );
    spool.close().await.unwrap();
}
