//! Property: however the server's byte stream is cut into writes (including
//! in the middle of multi-byte UTF-8 characters and of `\r\n`), every reply
//! reaches the call that owns its id and every event reaches subscribers
//! intact and in order.

use colo_qmp::{ConnectOptions, QmpClient};
use colo_testkit::fake_qmp::{Fake, event, greeting, return_reply};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, Clone)]
enum Item {
    /// Reply to the n-th command (in the order the client issued them).
    Reply(usize),
    Event {
        name: String,
        data: Value,
        seconds: i64,
        micros: i64,
    },
}

fn event_strategy() -> impl Strategy<Value = Item> {
    (
        "[A-Z_]{1,12}",
        prop_oneof![
            Just(Value::Null),
            "\\PC{0,24}".prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ("\\PC{0,8}", "\\PC{0,16}")
                .prop_map(|(k, v)| json!({ k: v, "nested": [1, {"x": null}] })),
        ],
        0i64..4_000_000_000,
        0i64..1_000_000,
    )
        .prop_map(|(name, data, seconds, micros)| Item::Event {
            name,
            data,
            seconds,
            micros,
        })
}

/// Commands, a shuffled interleaving of their replies with events, and the
/// write sizes the fake uses.
fn scenario() -> impl Strategy<Value = (usize, Vec<Item>, Vec<usize>)> {
    (1usize..6, prop::collection::vec(event_strategy(), 0..12)).prop_flat_map(|(n, events)| {
        let mut items: Vec<Item> = (0..n).map(Item::Reply).collect();
        items.extend(events);
        (
            Just(n),
            Just(items).prop_shuffle(),
            // Mostly small writes (cutting inside tokens and characters),
            // sometimes large ones that carry several whole lines at once.
            prop::collection::vec(prop_oneof![3 => 1usize..48, 1 => 48usize..1500], 1..32),
        )
    })
}

/// The payload QEMU "returns" for command `i`: unicode and escapes so chunk
/// boundaries land inside multi-byte characters and escape sequences.
fn payload(i: usize) -> Value {
    json!({"n": i, "text": format!("réponse-{i}-\u{1F600}-\"q\"-\\-\n"), "list": vec![i; i]})
}

fn wire_line(item: &Item, ids: &[Value]) -> Vec<u8> {
    let v = match item {
        Item::Reply(i) => return_reply(&ids[*i], payload(*i)),
        Item::Event {
            name,
            data,
            seconds,
            micros,
        } => event(
            name,
            *seconds,
            *micros,
            Some(data.clone()).filter(|d| !d.is_null()),
        ),
    };
    let mut line = v.to_string().into_bytes();
    line.extend_from_slice(b"\r\n");
    line
}

async fn run(n: usize, items: Vec<Item>, chunks: Vec<usize>) {
    let (client_side, server_side) = tokio::io::duplex(64 * 1024);
    let mut fake = Fake::new(server_side);
    let opts = ConnectOptions {
        command_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(10),
        ..ConnectOptions::default()
    };
    let connecting = tokio::spawn(QmpClient::connect_stream(
        client_side,
        "chunks".into(),
        opts,
    ));
    fake.handshake(&["oob"]).await;
    let client = connecting.await.unwrap().unwrap();
    let mut events = client.subscribe();

    let calls: Vec<_> = (0..n)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { c.execute_raw(&format!("cmd-{i}"), None).await })
        })
        .collect();
    // Commands may reach the fake in any order; map them back by name.
    let mut ids_by_cmd = HashMap::new();
    for _ in 0..n {
        let cmd = fake.recv_cmd().await;
        let name = cmd["execute"].as_str().unwrap().to_owned();
        ids_by_cmd.insert(name, cmd["id"].clone());
    }
    let ids: Vec<Value> = (0..n)
        .map(|i| ids_by_cmd[&format!("cmd-{i}")].clone())
        .collect();

    // A sentinel event after everything else: once it has been delivered,
    // every earlier line has been dispatched, so a lost item fails the case
    // at once instead of after a long timeout (which would make shrinking
    // crawl).
    let sentinel = Item::Event {
        name: "SENTINEL".into(),
        data: Value::Null,
        seconds: 0,
        micros: 0,
    };
    let stream: Vec<u8> = items.iter().flat_map(|it| wire_line(it, &ids)).collect();
    let mut server = fake;
    let mut rest = &stream[..];
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let size = (*sizes.next().unwrap()).min(rest.len());
        server.send_raw(&rest[..size]).await;
        rest = &rest[size..];
        tokio::task::yield_now().await;
    }
    // Written on its own so that damage to the items above cannot take the
    // sentinel with it.
    tokio::task::yield_now().await;
    server.send_raw(&wire_line(&sentinel, &ids)).await;

    let mut received = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(2), events.recv())
            .await
            .expect("sentinel event lost")
            .expect("stream ended early");
        if ev.name == "SENTINEL" {
            break;
        }
        received.push(ev);
    }
    let expected: Vec<_> = items
        .iter()
        .filter_map(|it| match it {
            Item::Event {
                name,
                data,
                seconds,
                micros,
            } => Some((name.clone(), data.clone(), *seconds, *micros)),
            Item::Reply(_) => None,
        })
        .collect();
    let got: Vec<_> = received
        .into_iter()
        .map(|e| {
            (
                e.name,
                e.data,
                e.timestamp.seconds,
                e.timestamp.microseconds,
            )
        })
        .collect();
    assert_eq!(got, expected);
    for (i, call) in calls.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(1), call)
            .await
            .expect("reply lost")
            .unwrap()
            .unwrap();
        assert_eq!(got, payload(i), "reply {i}");
    }
    assert!(events.try_recv().is_none(), "unexpected extra event");
    assert!(client.is_connected());
    // Close the server side; the stream must then end cleanly.
    drop(server);
    let end = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap();
    assert!(end.is_none());
}

proptest! {
    // Shrinking is bounded so a real failure reports in seconds, not minutes
    // (a lost item costs a 2 s wait per shrink step).
    #![proptest_config(ProptestConfig { cases: 128, max_shrink_time: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn split_stream_delivers_everything_in_order((n, items, chunks) in scenario()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(n, items, chunks));
    }
}

#[test]
fn greeting_itself_split_byte_by_byte() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client_side, server_side) = tokio::io::duplex(16);
        let mut fake = Fake::new(server_side);
        let connecting = tokio::spawn(QmpClient::connect_stream(
            client_side,
            "bytes".into(),
            ConnectOptions::default(),
        ));
        let mut line = greeting(&["oob"]).to_string().into_bytes();
        line.extend_from_slice(b"\r\n");
        for b in line {
            fake.send_raw(&[b]).await;
        }
        let caps = fake.expect("qmp_capabilities").await;
        for b in format!("{{\"return\": {{}}, \"id\": {}}}\r\n", caps["id"]).bytes() {
            fake.send_raw(&[b]).await;
        }
        let client = connecting.await.unwrap().unwrap();
        assert!(client.oob_enabled());
        assert_eq!(client.greeting().version.major, 10);
    });
}
