use super::batch::*;
use super::*;
use crate::delivery::message::{Outcome, ReplyTo};
use fred::prelude::Value;

fn msg(to: &str) -> Box<Message> {
    Box::new(Message {
        id: 7,
        from: "alice".into(),
        to: to.into(),
        cid: "\"c1\"".into(),
        ts: 1,
        body: "{\"x\":1}".into(),
        msg_type: None,
        reply: ReplyTo::all_devices(0),
        received_us: 0,
        write: crate::delivery::message::StoreWrite {
            attempt: 1,
            to_mirror: false,
        },
        resent: false,
        sender_arrived_ms: 0,
        refused_earlier: None,
    })
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

#[test]
fn stream_ids_map_to_increasing_seqs_and_back() {
    let a = stream_id_to_seq("1700000000000-0").unwrap();
    let b = stream_id_to_seq("1700000000000-1").unwrap();
    let c = stream_id_to_seq("1700000000001-0").unwrap();
    assert!(a < b && b < c);
    assert_eq!(seq_to_stream_id(b), "1700000000000-1");
    assert_eq!(seq_time_ms(c), 1_700_000_000_001);
    assert_eq!(stream_id_to_seq("12"), None);
    assert_eq!(stream_id_to_seq("1-1048576"), None, "n beyond 20 bits");
    assert_eq!(stream_id_to_seq("x-1"), None);
}

/// A live entry's position (Redis away) sorts after what the mirror held and before any
/// entry Redis can store later in that millisecond or after it: the two never share one
/// (slow-second-device seed 15780009465165166133 showed a shared one: an ack of the live
/// entry named the stored one).
#[test]
fn live_positions_sit_where_redis_gives_none() {
    let held = stream_id_to_seq("1700000000000-3").unwrap();
    let live = live_seq_floor(held + 1);
    assert!(live > held);
    assert_eq!(seq_time_ms(live), 1_700_000_000_000);
    let same_ms = stream_id_to_seq("1700000000000-4").unwrap();
    let next_ms = stream_id_to_seq("1700000000001-0").unwrap();
    assert!(same_ms < live && live < next_ms);
    // The next live entry goes after it, not back to the floor.
    assert_eq!(live_seq_floor(live + 1), live + 1);
    // Past a live entry, a later millisecond's live entry starts at that floor again.
    let later = live_seq_floor(next_ms + 1);
    assert!(later > next_ms + 1 && seq_time_ms(later) == 1_700_000_000_001);
}

fn settings() -> RedisSettings {
    RedisSettings {
        url: "redis://127.0.0.1:1".into(),
        pool_size: 1,
        timeout: Duration::from_millis(10),
        key_prefix: "p:".into(),
        max_messages: 5,
        max_age_ms: 1000,
        node: "n1.5".into(),
        lease_ms: 900,
        room_history_max: 3,
        room_history_age_ms: 4000,
        tls_ca: None,
        watch_offline: false,
    }
}

fn delivered(from: &str, to: &str) -> Box<Report> {
    Box::new(Report {
        id: 7,
        from: from.into(),
        to: to.into(),
        cid: "\"c 1\"".into(),
        reply: ReplyTo::all_devices(0),
        outcome: Outcome::Delivered,
        received_us: 0,
    })
}

#[test]
fn batch_keys_and_args_follow_the_operations_in_order() {
    let batch = [
        StoreOp::Append(msg("bob")),
        StoreOp::Remove {
            user: "bob".into(),
            seq: stream_id_to_seq("5-1").unwrap(),
            report: None,
        },
        StoreOp::Remove {
            user: "bob".into(),
            seq: stream_id_to_seq("5-2").unwrap(),
            report: Some(delivered("alice", "bob")),
        },
        StoreOp::Presence {
            users: vec!["x".into(), "y".into()],
            ask: 3,
        },
        StoreOp::Probe,
        StoreOp::Resolve {
            to: "bob".into(),
            from: "alice".into(),
            writes: vec![("\"c0\"".into(), 4), ("\"c1\"".into(), 5)],
        },
    ];
    let ops: Vec<&StoreOp> = batch.iter().collect();
    let call = BatchCall::build(&settings(), 2, &ops, false);
    assert_eq!(
        call.keys,
        [
            "p:in:{u:bob}",
            "p:dd:3:{u:bob}:alice",
            "p:in:{u:bob}",
            "p:rcv:{u:bob}",
            "p:in:{u:bob}",
            "p:loc:{u:alice}",
            "p:rcv:{u:bob}",
            "p:loc:{u:x}",
            "p:loc:{u:y}",
            "p:in:{u:bob}",
            "p:dd:3:{u:bob}:alice",
        ]
    );
    // The writing shard follows the keys' count (and, in a cluster, the keys).
    assert_eq!(
        &call.args[..10],
        ["1000", "5", "86400000", "10000", "n1.5", "p:", "3", "4000", "0", "2"]
    );
    assert_eq!(
        &call.args[10..],
        [
            "A",
            "7",
            "\"c1\"",
            "7 1 5 4 alice\"c1\"{\"x\":1}",
            "1",
            "R",
            "5-1",
            "",
            "0",
            "D",
            "5-2",
            "alice",
            "7",
            "d 7 5 3 alicebob\"c 1\"",
            "Q",
            "2",
            "P",
            "V",
            "2",
            "\"c0\"",
            "4",
            "\"c1\"",
            "5"
        ]
    );
    // In a cluster the `delivered` is published after the answer, from the sender's slot:
    // the script only removes.
    // Declared keys must share a slot: the first is declared (it routes the call), all six
    // follow their count in the arguments.
    let call = BatchCall::build(&settings(), 2, &ops[..3], true);
    assert_eq!(call.keys, ["p:in:{u:bob}"]);
    assert_eq!(call.args[8], "6");
    assert_eq!(call.args[9], "p:in:{u:bob}");
    assert_eq!(call.args[14], "p:rcv:{u:bob}");
    assert_eq!(call.args[15], "2");
    assert_eq!(call.args[16], "A");
    assert_eq!(
        &call.args[21..],
        ["R", "5-1", "", "0", "R", "5-2", "alice", "7"]
    );
}

#[test]
fn pushes_from_other_nodes_parse_exactly_or_not_at_all() {
    // An entry, as the script publishes it: stream id, user length, user, packed message.
    let text = format!(
        "m 9-2 5 b b c{}",
        pack(7, 1, "al ce", "\"c\"", "{\"k\":\" \"}", None)
    );
    let Some(Push::Entry { user, seq, msg }) = parse_push(&text) else {
        panic!("an entry push parses");
    };
    assert_eq!(user, "b b c");
    assert_eq!(seq, stream_id_to_seq("9-2").unwrap());
    assert_eq!(
        (msg.id, &*msg.from, &*msg.body),
        (7, "al ce", "{\"k\":\" \"}")
    );
    // A delivered report round-trips through pack_delivered.
    let r = delivered("al ice", "b");
    let Some(Push::Delivered { id, from, to, cid }) = parse_push(&pack_delivered(&r)) else {
        panic!("a delivered push parses");
    };
    assert_eq!((id, &*from, &*to, &*cid), (7, "al ice", "b", "\"c 1\""));
    // Its reply goes to every device of the sender on the sender's home shard.
    let StoreReply::RemoteReport(report) = parse_push(&pack_delivered(&r)).unwrap().into_reply(4)
    else {
        panic!("a delivered push is a report");
    };
    assert_eq!(
        report.reply,
        ReplyTo::all_devices(crate::mesh::home_shard("al ice", 4))
    );
    // A load's read mark names its token and the user, whatever the user's name holds.
    let mark = parse_push(&pack_read_mark(42, "b b c")).expect("a read mark parses");
    assert_eq!(mark.user(), "b b c");
    assert!(matches!(
        mark.into_reply(4),
        StoreReply::ReadMarked { user, token: 42 } if user == "b b c"
    ));
    for bad in [
        "",
        "m",
        "k",
        "k x bob",
        "m 9-2 99 bob",
        "x 1 2",
        "d 1 9 9 ab",
        "m bad 1 b7 1 0 0 ",
    ] {
        assert_eq!(parse_push(bad), None, "{bad:?}");
    }
}

#[test]
fn script_answers_pair_with_their_operations() {
    let batch = [
        StoreOp::Append(msg("bob")),
        StoreOp::Append(msg("bob")),
        StoreOp::Append(msg("bob")),
        StoreOp::Append(msg("bob")),
        StoreOp::Append(msg("bob")),
        StoreOp::Remove {
            user: "bob".into(),
            seq: 1,
            report: None,
        },
        StoreOp::Probe,
    ];
    let value = Value::Array(vec![
        // Stored, nothing expired, no other node: the bare stream id.
        s("9-1"),
        Value::Array(vec![
            s("ok"),
            s("9-2"),
            Value::Integer(3),
            Value::Integer(2),
        ]),
        Value::Array(vec![s("dup"), s("42"), Value::Integer(4)]),
        // An answer of an earlier build: no trimmed count.
        Value::Array(vec![s("dup"), s("43")]),
        Value::Array(vec![s("full"), Value::Integer(1), Value::Integer(5)]),
        Value::Integer(1),
        Value::Integer(1),
    ]);
    let ops: Vec<&StoreOp> = batch.iter().collect();
    let answers = parse_batch(value, &ops).unwrap();
    let stored = |id: &str, pushed| {
        Ok(Appended::Stored {
            seq: stream_id_to_seq(id).unwrap(),
            pushed,
            offline: false,
        })
    };
    assert_eq!(
        answers[..4],
        [
            Answer::Appended {
                result: stored("9-1", 0),
                trimmed: 0
            },
            Answer::Appended {
                result: stored("9-2", 2),
                trimmed: 3
            },
            Answer::Appended {
                result: Ok(Appended::Duplicate { id: 42 }),
                trimmed: 4
            },
            Answer::Appended {
                result: Ok(Appended::Duplicate { id: 43 }),
                trimmed: 0
            },
        ]
    );
    assert!(matches!(
        answers[4],
        Answer::Appended {
            result: Err(StoreError::Full { count: 5, .. }),
            trimmed: 1
        }
    ));
    // What the batch reports to the shard's metrics: every trim, whatever the answer.
    assert_eq!(answers.iter().map(Answer::trimmed).sum::<u64>(), 8);
    assert_eq!(answers[5], Answer::Removed(true));
    assert_eq!(answers[6], Answer::Done);
}

#[test]
fn loads_split_the_batch_into_ordered_segments() {
    let load = |user: &str| StoreOp::Load {
        user: user.into(),
        token: 1,
        limit: 10,
    };
    let remove = || StoreOp::Remove {
        user: "bob".into(),
        seq: 1,
        report: None,
    };
    let batch = vec![
        StoreOp::Append(msg("bob")),
        remove(),
        load("bob"),
        load("carol"),
        StoreOp::Append(msg("carol")),
        StoreOp::Lease,
        StoreOp::Leave { user: "bob".into() },
        StoreOp::Probe,
    ];
    let single = |b: &[StoreOp]| plan(b, &vec![0; b.len()], false);
    let seg = |ops: &[usize]| Segment::Script(ops.to_vec());
    assert_eq!(
        single(&batch),
        [
            seg(&[0, 1]),
            Segment::Native(2),
            Segment::Native(3),
            seg(&[4]),
            Segment::Native(5),
            Segment::Native(6),
            seg(&[7])
        ]
    );
    assert_eq!(single(&[load("a")]), [Segment::Native(0)]);
    assert_eq!(single(&[remove(), remove()]), [seg(&[0, 1])]);
    assert!(single(&[]).is_empty());
    // A cluster: one call per server within a run, in batch order; presence is native.
    let batch = vec![
        StoreOp::Append(msg("bob")),
        StoreOp::Append(msg("carol")),
        remove(),
        load("dave"),
        StoreOp::Append(msg("carol")),
        StoreOp::Presence {
            users: vec!["x".into()],
            ask: 0,
        },
        StoreOp::Append(msg("bob")),
    ];
    assert_eq!(
        plan(&batch, &[0, 1, 0, 2, 1, 0, 0], true),
        [
            seg(&[0, 2]),
            seg(&[1]),
            Segment::Native(3),
            seg(&[4]),
            Segment::Native(5),
            seg(&[6])
        ]
    );
}

#[test]
fn a_load_reads_trimmed_count_and_entries() {
    let entry = Value::Array(vec![
        s("9-2"),
        Value::Array(vec![s("m"), s("7 1 5 4 alice\"c1\"{}")]),
    ]);
    let received = Value::Array(vec![s("alice"), s("77"), s("bob"), s("x"), s("carol")]);
    let Answer::Loaded(Loaded {
        entries,
        expired,
        received,
    }) = parse_load(
        Ok(Value::Integer(2)),
        Ok(Value::Array(vec![entry])),
        Ok(received),
    )
    .unwrap()
    else {
        panic!("a load answers Loaded");
    };
    assert_eq!(expired, 2);
    assert_eq!(entries[0].0, stream_id_to_seq("9-2").unwrap());
    assert_eq!(entries[0].1.from, "alice");
    assert_eq!(&*entries[0].1.body, "{}");
    // What the user received: a pair that does not read as (sender, id) is skipped.
    assert_eq!(received, vec![("alice".into(), 77)]);
    // An empty stream reads as no entries; an error or a foreign entry fails the load.
    assert!(matches!(
        parse_load(Ok(Value::Integer(0)), Ok(Value::Null), Ok(Value::Null)),
        Ok(Answer::Loaded(Loaded { ref entries, .. })) if entries.is_empty()
    ));
    assert!(parse_load(Err("boom".into()), Ok(Value::Null), Ok(Value::Null)).is_err());
    let foreign = Value::Array(vec![Value::Array(vec![
        s("9-3"),
        Value::Array(vec![s("m"), s("not packed")]),
    ])]);
    assert!(parse_load(Ok(Value::Integer(0)), Ok(foreign), Ok(Value::Null)).is_err());
}

#[test]
fn packed_messages_round_trip_whatever_they_hold() {
    let m = StoredMessage {
        id: u64::MAX,
        from: "a b\tc".into(),
        cid: "\"x y\"".into(),
        ts: 17,
        body: "{ \"t\" :\t[1, 2] }".into(),
        msg_type: None,
    };
    let packed =
        |m: &StoredMessage| pack(m.id, m.ts, &m.from, &m.cid, &m.body, m.msg_type.as_deref());
    assert_eq!(unpack(&packed(&m)), Some(m.clone()));
    let empty_body = StoredMessage {
        body: "".into(),
        ..m
    };
    assert_eq!(unpack(&packed(&empty_body)), Some(empty_body.clone()));
    // A backend message's type, whatever it holds; an entry of an older build has none.
    let typed = StoredMessage {
        msg_type: Some("sys tem 1".into()),
        ..empty_body
    };
    assert_eq!(unpack(&packed(&typed)), Some(typed.clone()));
    assert_eq!(unpack("1 2 1 1 ab").unwrap().msg_type, None);
    assert_eq!(unpack("T99 x1 2 1 1 ab"), None, "type length past the end");
    assert_eq!(unpack("1 2 99 1 ab"), None, "lengths past the end");
    assert_eq!(unpack("x 2 1 1 ab"), None);
    assert_eq!(unpack(""), None);
}

#[test]
fn a_malformed_answer_fails_the_whole_batch() {
    let op = StoreOp::Append(msg("bob"));
    let batch = [&op];
    assert!(parse_batch(Value::Integer(1), &batch).is_err());
    assert!(parse_batch(Value::Array(vec![]), &batch).is_err());
    let weird = Value::Array(vec![Value::Array(vec![s("what")])]);
    assert!(parse_batch(weird, &batch).is_err());
    let not_an_id = Value::Array(vec![s("ok")]);
    assert!(parse_batch(not_an_id, &batch).is_err());
}

#[test]
fn standalone_sentinel_cluster_and_tls_urls_are_taken_and_others_refused() {
    assert!(check_url("rediss://127.0.0.1:6380", None).is_ok());
    assert!(check_url("redis://127.0.0.1:6379", None).is_ok());
    assert!(check_url("redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001", None).is_ok());
    assert!(check_url(
        "redis-sentinel://127.0.0.1:26379/0?sentinelServiceName=m",
        None
    )
    .is_ok());
    assert!(check_url("not a url", None).is_err());
}

#[test]
fn cluster_errors_that_mean_a_moved_slot_ask_for_a_fresh_slot_map() {
    // As Redis 7.0 answers a script call that touched a key of a slot this primary lost.
    let non_local = "ERR Script attempted to access a non local key in a cluster node script: \
                     2c4d5ebe2a3c666cbd00bc6f116dbf663aeca0f7, on @user_script:2.";
    assert!(slot_map_is_stale(non_local));
    assert!(slot_map_is_stale("MOVED 3300 127.0.0.1:7301"));
    assert!(slot_map_is_stale(
        "TRYAGAIN Multiple keys request during rehashing of slot"
    ));
    assert!(!slot_map_is_stale("no answer within 5000 ms"));
    assert!(!slot_map_is_stale("not connected to Redis (reconnecting)"));
}

/// With the push webhook on, an append that found nobody holding a device answers
/// {'ok', id, trimmed, 0, 1}: stored, and a push is due.
#[test]
fn an_offline_append_answer_says_so() {
    let batch = [StoreOp::Append(msg("bob")), StoreOp::Append(msg("bob"))];
    let value = Value::Array(vec![
        Value::Array(vec![
            s("ok"),
            s("9-2"),
            Value::Integer(0),
            Value::Integer(0),
            Value::Integer(1),
        ]),
        s("9-3"),
    ]);
    let ops: Vec<&StoreOp> = batch.iter().collect();
    let answers = parse_batch(value, &ops).unwrap();
    let offline = |a: &Answer| match a {
        Answer::Appended {
            result: Ok(Appended::Stored { offline, .. }),
            ..
        } => *offline,
        other => panic!("{other:?}"),
    };
    assert!(offline(&answers[0]));
    assert!(!offline(&answers[1]));
}

/// Upkeep the open breaker held back goes out before anything newer, in its order, and a
/// batch it fills whole is refused without keeping the operations queued behind it from an
/// answer: they are taken and refused too (new sends once waited, unanswered, until Redis came
/// back), while the held upkeep keeps its place and order.
#[test]
fn held_back_upkeep_keeps_its_order_and_never_keeps_new_operations_unanswered() {
    // Even numbers are upkeep, odd ones sends.
    let upkeep = |op: &u32| op.is_multiple_of(2);
    let mut held: Vec<u32> = (0..3 * BATCH_OPS as u32).map(|i| 2 * i).collect();
    let before = held.clone();
    let queued: Vec<u32> = vec![1_000_001, 1_000_002, 1_000_003];
    let mut queue = queued.iter().copied();
    // A batch of held upkeep only (sent as it is when the breaker lets it through).
    let (batch, from_held) = next_batch(&mut held, &mut queue, BATCH_OPS, |_| false);
    assert_eq!((batch.len(), from_held), (BATCH_OPS, BATCH_OPS));
    assert_eq!(&batch[..], &before[..BATCH_OPS]);
    // Refused: the queued operations are answered (the sends) or held (the upkeep).
    let refused = refuse_batch(&mut held, batch, from_held, &mut queue, upkeep).unwrap();
    assert_eq!(refused, vec![1_000_001, 1_000_003]);
    let mut expected = before.clone();
    expected.push(1_000_002);
    assert_eq!(
        held, expected,
        "held upkeep back in front, in order; new upkeep after it"
    );
    // Nothing new and nothing queued: nothing to answer.
    let (batch, from_held) = next_batch(&mut held, std::iter::empty(), BATCH_OPS, |_| false);
    assert!(refuse_batch(&mut held, batch, from_held, std::iter::empty(), upkeep).is_none());
    assert_eq!(held, expected);
    // A batch with new operations in it: only those are answered or held.
    let mut small: Vec<u32> = vec![10, 12];
    let (batch, from_held) = next_batch(&mut small, [7, 14, 9].into_iter(), BATCH_OPS, |_| false);
    assert_eq!(batch, vec![10, 12, 7, 14, 9]);
    let refused = refuse_batch(&mut small, batch, from_held, [11].into_iter(), upkeep);
    assert_eq!(
        refused,
        Some(vec![7, 9]),
        "the queue is not read when the batch had new ops"
    );
    assert_eq!(small, vec![10, 12, 14]);
}

/// A batch holds at most the loads it is allowed; what follows the last of them stays queued,
/// in order, for the next batch.
#[test]
fn a_batch_ends_after_its_last_allowed_load() {
    // Multiples of 3 are loads.
    let is_load = |op: &usize| op.is_multiple_of(3);
    let max = LOADS_PER_BATCH_MIN;
    let mut queue = 0..10 * max;
    let (batch, _) = next_batch(&mut Vec::new(), &mut queue, max, is_load);
    let loads = batch.iter().filter(|op| is_load(op)).count();
    assert_eq!(loads, max);
    assert!(is_load(batch.last().unwrap()), "ends at its last load");
    assert_eq!(batch, (0..batch.len()).collect::<Vec<_>>());
    let (next, _) = next_batch(&mut Vec::new(), &mut queue, max, is_load);
    assert_eq!(next[0], batch.len(), "the rest stays queued, in order");
    // Without loads a batch fills up to BATCH_OPS.
    let (full, _) = next_batch(
        &mut Vec::new(),
        (0..2 * BATCH_OPS).map(|i| 3 * i + 1),
        max,
        is_load,
    );
    assert_eq!(full.len(), BATCH_OPS);
}

/// Loads per batch follow the entries loads bring back: few while they are big (and before any
/// came), up to a whole batch of them while they are small, and few again once they grow.
#[test]
fn loads_per_batch_follow_the_entries_loads_bring() {
    let mut sizes = LoadSizes::new();
    assert_eq!(
        sizes.loads_per_batch(),
        LOADS_PER_BATCH_MIN,
        "big until told otherwise"
    );
    for _ in 0..100 {
        sizes.loaded(2);
    }
    assert_eq!(
        sizes.loads_per_batch(),
        BATCH_OPS,
        "2-entry inboxes: a whole batch"
    );
    for _ in 0..100 {
        sizes.loaded(100);
    }
    assert_eq!(sizes.loads_per_batch(), LOAD_ENTRIES_PER_BATCH / 100);
    for _ in 0..100 {
        sizes.loaded(10_000);
    }
    assert_eq!(
        sizes.loads_per_batch(),
        LOADS_PER_BATCH_MIN,
        "never below the least"
    );
    // Empty inboxes (a storm of users with nothing waiting) count as one entry each.
    for _ in 0..200 {
        sizes.loaded(0);
    }
    assert_eq!(sizes.loads_per_batch(), BATCH_OPS);
}

#[test]
fn a_connection_task_that_keeps_ending_is_restarted_ever_slower_up_to_a_second() {
    let ms = Duration::from_millis;
    let quick = ms(5);
    let mut pause = Duration::ZERO;
    let mut waits = Vec::new();
    for _ in 0..7 {
        pause = restart_pause(pause, quick);
        waits.push(pause.as_millis());
    }
    assert_eq!(waits, [50, 100, 200, 400, 800, 1000, 1000]);
    // A task that ran a while is started again at once, and the next quick end starts over.
    assert_eq!(
        restart_pause(ms(1000), Duration::from_secs(11)),
        Duration::ZERO
    );
    assert_eq!(restart_pause(Duration::ZERO, quick), ms(50));
}
