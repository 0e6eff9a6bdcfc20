//! The bench must notice a reflector that loses, duplicates or reorders messages.
//!
//! A tiny reflector written here speaks JOIN / SYNC / users / SEND / RECV over real
//! WebSockets and, on purpose, drops, duplicates or swaps messages on their way to the first
//! client of the session. The same server without a fault is the control: the bench must
//! find nothing wrong with it.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use refleet_bench::load::{self, Endpoint, LoadReport, LoadSpec};
use refleet_bench::wire;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// What the server does wrong to the session's first client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Never delivers the 5th SEND.
    Drop,
    /// Delivers the 5th SEND twice.
    Duplicate,
    /// Holds the 5th SEND back until after the next one from the same sender.
    Swap,
}

/// Messages reflected before the fault strikes.
const FAULT_AT: u64 = 5;

#[derive(Default)]
struct Session {
    seq: u32,
    clients: Vec<mpsc::UnboundedSender<String>>,
    sends: u64,
    /// Swap: the held frame and its sender.
    held: Option<(String, u32)>,
    swapped: bool,
}

impl Session {
    fn stamp(&mut self, id: &str, rest: &str) -> String {
        self.seq = self.seq.wrapping_add(1);
        format!(
            "{{\"id\":\"{id}\",\"action\":\"RECV\",\"args\":[0,{},{rest}]}}",
            self.seq
        )
    }

    fn broadcast(&mut self, frame: &str, fault: Fault, sender: Option<u32>) {
        for (i, c) in self.clients.iter().enumerate() {
            let victim = i == 0;
            let n = self.sends;
            match (fault, victim, sender) {
                (Fault::Drop, true, Some(_)) if n == FAULT_AT => {}
                (Fault::Duplicate, true, Some(_)) if n == FAULT_AT => {
                    let _ = c.send(frame.to_string());
                    let _ = c.send(frame.to_string());
                }
                (Fault::Swap, true, Some(s)) if !self.swapped => {
                    if n >= FAULT_AT && self.held.is_none() {
                        self.held = Some((frame.to_string(), s));
                    } else if let Some((h, _)) = self.held.take_if(|(_, hs)| *hs == s) {
                        let _ = c.send(frame.to_string());
                        let _ = c.send(h);
                        self.swapped = true;
                    } else {
                        let _ = c.send(frame.to_string());
                    }
                }
                _ => {
                    let _ = c.send(frame.to_string());
                }
            }
        }
    }
}

type Sessions = Arc<Mutex<HashMap<String, Session>>>;

async fn serve(fault: Fault) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sessions: Sessions = Arc::default();
    tokio::spawn(async move {
        // Bounded: a test run opens a handful of connections.
        for _ in 0..64 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(connection(tcp, sessions.clone(), fault));
        }
    });
    addr
}

async fn connection(tcp: tokio::net::TcpStream, sessions: Sessions, fault: Fault) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let mut session_id = String::new();
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(out) = out else { return };
                if ws.send(Message::Text(out.into())).await.is_err() {
                    return;
                }
            }
            item = ws.next() => {
                let Some(Ok(Message::Text(text))) = item else { return };
                let v: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                let mut all = sessions.lock().unwrap();
                match v["action"].as_str().unwrap_or("") {
                    "JOIN" => {
                        session_id = v["id"].as_str().unwrap().to_string();
                        let view = v["args"]["user"].as_str().unwrap().to_string();
                        let s = all.entry(session_id.clone()).or_insert_with(|| Session {
                            seq: 0xFFFF_FFF0,
                            ..Session::default()
                        });
                        let _ = tx.send(format!(
                            "{{\"id\":\"{session_id}\",\"action\":\"SYNC\",\"args\":{{\"url\":\"\",\"messages\":[],\"time\":0,\"seq\":{},\"tove\":\"t\",\"timeline\":\"x\"}}}}",
                            s.seq
                        ));
                        s.clients.push(tx.clone());
                        let n = s.clients.len();
                        let users = format!(
                            "{{\"what\":\"users\",\"active\":{n},\"total\":{n},\"joined\":[\"{view}\"],\"_size\":1}}"
                        );
                        let frame = s.stamp(&session_id, &users);
                        s.broadcast(&frame, fault, None);
                    }
                    "SEND" => {
                        let s = all.get_mut(&session_id).unwrap();
                        let payload = v["args"][2].as_str().unwrap();
                        let sender = wire::read_payload(payload).unwrap().sender;
                        s.sends += 1;
                        let rest = format!("\"{payload}\",0");
                        let frame = s.stamp(&session_id, &rest);
                        s.broadcast(&frame, fault, Some(sender));
                    }
                    _ => {}
                }
            }
        }
    }
}

async fn run_against(fault: Fault) -> LoadReport {
    let addr = serve(fault).await;
    let ep = Endpoint::resolve(&format!("ws://{addr}/reflector/"), None)
        .await
        .unwrap();
    let spec = LoadSpec {
        sessions: 1,
        clients: 3,
        rate: 40.0,
        payload_bytes: 64,
        duration: Duration::from_millis(800),
        tick_ms: 50,
        batch_interval: Duration::from_millis(5),
        drain_timeout: Duration::from_secs(1),
        join_timeout: Duration::from_secs(10),
        snapshot_every: 0,
        stall: false,
        read_buffer: 8192,
    };
    let report = tokio::time::timeout(Duration::from_secs(30), load::run(&ep, "t", &spec))
        .await
        .unwrap()
        .unwrap();
    println!("{fault:?}:\n{report}");
    assert!(report.sent > FAULT_AT * 2, "too few messages sent");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_server_is_reported_clean() {
    let r = run_against(Fault::None).await;
    assert!(r.is_clean(), "{r}");
    assert_eq!(r.deliveries, r.sent * 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_message_is_reported_as_lost() {
    let r = run_against(Fault::Drop).await;
    assert!(!r.is_clean());
    assert_eq!(r.faults.lost, 1, "{r}");
    assert_eq!(r.faults.seq_gaps, 1, "{r}");
    assert_eq!(r.faults.duplicated, 0);
    assert_eq!(r.faults.reordered, 0);
    assert!(!r.complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_message_is_reported_as_duplicated() {
    let r = run_against(Fault::Duplicate).await;
    assert!(!r.is_clean());
    assert_eq!(r.faults.duplicated, 1, "{r}");
    assert_eq!(r.faults.seq_backwards, 1, "{r}");
    assert_eq!(r.faults.lost, 0);
    assert_eq!(r.faults.reordered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_messages_are_reported_as_reordered() {
    let r = run_against(Fault::Swap).await;
    assert!(!r.is_clean());
    assert_eq!(r.faults.reordered, 1, "{r}");
    assert!(r.faults.seq_gaps >= 1 && r.faults.seq_backwards >= 1, "{r}");
    assert_eq!(r.faults.lost, 0);
    assert_eq!(r.faults.duplicated, 0);
}
