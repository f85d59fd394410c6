//! The SQLite spool stores visitor runs zstd-compressed (format 4): every way a payload
//! leaves the spool gives back the bytes as received, the file holds less than it was
//! given, a row that cannot be decoded takes no other payload with it, and a spool of
//! format 3 reads on after the upgrade.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use tributary_spool::{
    Compression, DB_FILE, PartialSettlement, Payload, Selection, Spool, SqliteConfig, SqliteSpool,
};

const LONG: Duration = Duration::from_secs(600);
const HEADER: &[u8] = br#""account_id":"12133785640","project_id":"21537940595","revision":"131""#;

/// `visitors` visitors numbered from `first`, shaped like the Python SDK's conversions.
fn payload(first: u64, visitors: u64) -> Payload {
    let run: Vec<String> = (first..first + visitors)
        .map(|n| {
            format!(
                r#"{{"snapshots":[{{"events":[{{"entity_id":"21549340108","uuid":"00000000-0000-4000-8000-{n:012x}","key":"purchase","timestamp":1795443245068,"revenue":4200,"tags":{{"revenue":4200,"category":"shoes"}}}}]}}],"attributes":[{{"entity_id":"21554750045","key":"country","type":"custom","value":"DE"}},{{"entity_id":"$opt_bot_filtering","key":"$opt_bot_filtering","type":"custom","value":true}}],"visitor_id":"user-{n}"}}"#
            )
        })
        .collect();
    Payload {
        route: "us".into(),
        header: Bytes::from_static(HEADER),
        visitors: Bytes::from(run.join(",")),
        visitor_count: u32::try_from(visitors).unwrap(),
    }
}

/// `(id, encoding, stored visitor bytes, bytes column)` of every pending row.
fn rows(dir: &Path) -> Vec<(i64, i64, i64, i64)> {
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    let mut s = conn
        .prepare("SELECT id, encoding, length(visitors), bytes FROM payloads ORDER BY id")
        .unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

async fn audit_balances(spool: &SqliteSpool) {
    let audit = spool.audit().await.unwrap();
    assert!(audit.is_balanced(), "{:?}", audit.problems);
}

#[tokio::test]
async fn payloads_are_stored_smaller_and_every_way_out_gives_the_bytes_as_received() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap();
    let sent = [payload(0, 10), payload(10, 10), payload(20, 10)];
    spool.append(sent.to_vec()).await.unwrap();

    let stored = rows(dir.path());
    assert_eq!(stored.len(), 3);
    for ((_, encoding, on_disk, bytes), p) in stored.iter().zip(&sent) {
        assert_eq!(*encoding, 1, "stored as one zstd frame");
        assert_eq!(
            *bytes,
            i64::try_from(p.stored_len()).unwrap(),
            "limits count bytes as received"
        );
        assert!(
            *on_disk * 3 < i64::try_from(p.visitors.len()).unwrap(),
            "{on_disk} bytes stored for {} received",
            p.visitors.len()
        );
    }
    let stats = spool.stats().await.unwrap();
    assert_eq!(
        stats.pending_bytes,
        sent.iter().map(|p| p.stored_len() as u64).sum::<u64>()
    );

    // Lease: each payload as appended.
    let leased = spool.lease(10, 1 << 20, LONG).await.unwrap();
    let got: Vec<&Payload> = leased.iter().map(|l| &l.payload).collect();
    assert_eq!(got, sent.iter().collect::<Vec<_>>());

    // Settle the first in parts (one refused, three kept back), dead-letter the second.
    spool
        .settle_parts(vec![PartialSettlement {
            receipt: leased[0].receipt.clone(),
            delivered_events: 6,
            dead: vec![(payload(3, 1), "upstream answered 400".into())],
            remainder: Some(payload(7, 3)),
            delay: Duration::ZERO,
        }])
        .await
        .unwrap();
    spool
        .dead_letter(&[leased[1].receipt.clone()], "refused whole")
        .await
        .unwrap();
    spool.ack(&[leased[2].receipt.clone()]).await.unwrap();
    assert!(
        rows(dir.path()).iter().all(|r| r.1 == 1),
        "the remainder is stored compressed too"
    );

    let rest = spool.lease(10, 1 << 20, LONG).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].payload, payload(7, 3));
    spool.ack(&[rest[0].receipt.clone()]).await.unwrap();

    let mut dead = spool.dead_letters(10).await.unwrap();
    dead.sort_by_key(|d| d.payload.visitor_count);
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].payload, payload(3, 1));
    assert_eq!(dead[1].payload, sent[1]);
    assert_eq!(dead[1].reason, "refused whole");

    // A retried dead letter is delivered as it was received.
    spool
        .retry_dead_letters(Selection::Ids(vec![dead[1].id.clone()]))
        .await
        .unwrap();
    let retried = spool.lease(10, 1 << 20, LONG).await.unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].payload, sent[1]);
    audit_balances(&spool).await;
}

#[tokio::test]
async fn with_compression_off_rows_hold_the_bytes_as_received() {
    let dir = tempfile::tempdir().unwrap();
    let config = SqliteConfig {
        compression: Compression::None,
        ..SqliteConfig::default()
    };
    let spool = SqliteSpool::open(dir.path(), config).unwrap();
    let p = payload(0, 10);
    spool.append(vec![p.clone()]).await.unwrap();
    let (_, encoding, on_disk, _) = rows(dir.path())[0];
    assert_eq!(encoding, 0);
    assert_eq!(on_disk, i64::try_from(p.visitors.len()).unwrap());
    let leased = spool.lease(10, 1 << 20, LONG).await.unwrap();
    assert_eq!(leased[0].payload, p);
}

#[tokio::test]
async fn a_row_that_cannot_be_decoded_becomes_a_dead_letter_and_the_rest_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap();
    for first in [0, 10, 20] {
        spool.append(vec![payload(first, 10)]).await.unwrap();
    }
    let middle = rows(dir.path())[1].0;
    // Damage the middle row's frame in place, as a bad sector under it would.
    rusqlite::Connection::open(dir.path().join(DB_FILE))
        .unwrap()
        .execute(
            "UPDATE payloads SET visitors = substr(visitors, 1, 20) WHERE id = ?1",
            [middle],
        )
        .unwrap();

    let leased = spool.lease(10, 1 << 20, LONG).await.unwrap();
    let got: Vec<Payload> = leased.iter().map(|l| l.payload.clone()).collect();
    assert_eq!(got, [payload(0, 10), payload(20, 10)]);

    let dead = spool.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, middle.to_string());
    assert!(
        dead[0].reason.starts_with("unreadable in the spool: ")
            && dead[0].reason.contains("do not decompress"),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[0].payload.visitor_count, 10);
    assert!(
        dead[0].payload.visitors.is_empty(),
        "listed without the visitors it cannot decode"
    );
    let receipts: Vec<_> = leased.iter().map(|l| l.receipt.clone()).collect();
    spool.ack(&receipts).await.unwrap();
    audit_balances(&spool).await;
}

#[tokio::test]
async fn a_format_3_spool_is_upgraded_and_its_rows_read_back_as_stored() {
    let dir = tempfile::tempdir().unwrap();
    let before = payload(0, 10);
    {
        let plain = SqliteConfig {
            compression: Compression::None,
            ..SqliteConfig::default()
        };
        let spool = SqliteSpool::open(dir.path(), plain).unwrap();
        spool.append(vec![before.clone()]).await.unwrap();
        spool.close().await.unwrap();
    }
    // What format 3 looked like: no encoding column.
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.execute_batch(
        "ALTER TABLE payloads DROP COLUMN encoding;
         ALTER TABLE dead_letters DROP COLUMN encoding;
         PRAGMA user_version = 3;",
    )
    .unwrap();
    drop(conn);

    let spool = SqliteSpool::open(dir.path(), SqliteConfig::default()).unwrap();
    let after = payload(10, 10);
    spool.append(vec![after.clone()]).await.unwrap();
    let encodings: Vec<i64> = rows(dir.path()).iter().map(|r| r.1).collect();
    assert_eq!(encodings, [0, 1], "old row as it was, new row compressed");
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 4);
    let leased = spool.lease(10, 1 << 20, LONG).await.unwrap();
    let got: Vec<Payload> = leased.iter().map(|l| l.payload.clone()).collect();
    assert_eq!(got, [before, after]);
    audit_balances(&spool).await;
}
