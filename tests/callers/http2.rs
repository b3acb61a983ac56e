//! HTTP/2 abuse from a raw client: floods of resets, of header blocks, and connections that
//! never get going. Each is refused on its connection while the broker serves the others.

use std::time::Duration;

use rustls::pki_types::ServerName;
use tokenbroker::server::Silence;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::harness::*;
use crate::mtls::{bare_h2, client_config, frame, graph_request, grpc_headers, open_h2};

const COLLECTOR: &str = "spiffe://example.org/ns/logs/sa/collector";

/// HTTP/2 error codes.
const PROTOCOL_ERROR: u32 = 1;
const CANCEL: u32 = 8;
const ENHANCE_YOUR_CALM: u32 = 11;

/// The next frame read: type, flags, payload.
async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(u8, u8, Vec<u8>)> {
    let mut header = [0u8; 9];
    r.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((header[3], header[4], payload))
}

/// Writes `flood` (batches of frames) to a fresh connection while reading what the broker
/// answers, then a PING; returns the error code of the GOAWAY the broker sends. Panics if
/// the broker answers the PING first: it let the whole flood through.
async fn goaway_for(h: &Harness, flood: Vec<Vec<u8>>) -> u32 {
    let conn = open_h2(h, &h.server_ca_pem, None).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(conn);
    let writer = tokio::spawn(async move {
        for batch in flood {
            // The broker closes the connection mid-flood: later writes fail.
            if wr.write_all(&batch).await.is_err() {
                return wr;
            }
        }
        let _ = wr.write_all(&frame(6, 0, 0, &[7; 8])).await;
        wr
    });
    let code = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let (kind, flags, payload) = read_frame(&mut rd)
                .await
                .expect("a GOAWAY before the connection closed");
            match kind {
                7 => return u32::from_be_bytes(payload[4..8].try_into().unwrap()),
                6 if flags & 1 == 1 => panic!("the whole flood was taken: PING answered"),
                _ => {}
            }
        }
    })
    .await
    .expect("an answer within the bound");
    drop(writer.await.unwrap());
    code
}

/// The streams `ids` opened with a call's HEADERS, each followed by `then(id)`, in batches.
fn opened_and(ids: impl Iterator<Item = u32>, then: impl Fn(u32) -> Vec<u8>) -> Vec<Vec<u8>> {
    let block = grpc_headers("/tokenbroker.v1.TokenBroker/GetToken");
    let ids: Vec<u32> = ids.collect();
    ids.chunks(100)
        .map(|chunk| {
            chunk
                .iter()
                .flat_map(|&id| {
                    let mut f = frame(1, 0x4, id, &block);
                    f.extend(then(id));
                    f
                })
                .collect()
        })
        .collect()
}

/// The client's stream ids: odd, from 1.
fn stream_ids(n: u32) -> impl Iterator<Item = u32> {
    (0..n).map(|i| 2 * i + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resetting_each_stream_it_opens_is_sent_goaway_while_others_are_served() {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    // Rapid reset (CVE-2023-44487): each call opened and cancelled at once, 5,000 times.
    let flood = opened_and(stream_ids(5000), |id| {
        frame(3, 0, id, &CANCEL.to_be_bytes())
    });
    assert_eq!(goaway_for(&h, flood).await, ENHANCE_YOUR_CALM);
    // Another connection is served meanwhile and after.
    let leaf = h.ca.client(&[COLLECTOR]);
    h.get(Some(&leaf), None, "contoso", &[GRAPH]).await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_making_the_broker_reset_stream_after_stream_is_sent_goaway() {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    // "MadeYouReset": each call opened saying it has no content (content-length 0), then
    // sending a message, a stream error the broker answers with RST_STREAM, 5,000 times.
    let mut block = grpc_headers("/tokenbroker.v1.TokenBroker/GetToken");
    block.extend([0, 14]);
    block.extend(b"content-length");
    block.extend([1, b'0']);
    let flood = stream_ids(5000)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|chunk| {
            let calls = chunk.iter().map(|&id| {
                let mut f = frame(1, 0x4, id, &block);
                f.extend(frame(0, 0x1, id, &[0; 5]));
                f
            });
            calls.flatten().collect()
        })
        .collect();
    assert_eq!(goaway_for(&h, flood).await, ENHANCE_YOUR_CALM);
    let leaf = h.ca.client(&[COLLECTOR]);
    h.get(Some(&leaf), None, "contoso", &[GRAPH]).await.unwrap();
    h.stop().await;
}

/// A header block fragment of complete header fields (literals of a new name, without
/// indexing) of exactly `len` bytes (at least 8).
fn padding_fields(len: usize) -> Vec<u8> {
    // A field of a value of `v` bytes (under 128) takes 8 + v.
    let field = |v: usize| {
        let mut f = vec![0, 5];
        f.extend(b"x-pad");
        f.push(v as u8);
        f.extend(std::iter::repeat_n(b'a', v));
        f
    };
    let mut block = Vec::new();
    while len - block.len() > 8 + 127 {
        block.extend(field(100));
    }
    block.extend(field(len - block.len() - 8));
    assert_eq!(block.len(), len);
    block
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_continued_without_end_is_refused_before_it_is_buffered() {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    // CONTINUATION flood: a call's HEADERS without END_HEADERS, then CONTINUATION frames of
    // 16 KiB (the largest frame the broker takes), never ending the block: 16 MiB in all.
    let mut first = grpc_headers("/tokenbroker.v1.TokenBroker/GetToken");
    first.extend(padding_fields(16 * 1024 - first.len()));
    let mut flood = vec![frame(1, 0, 1, &first)];
    let more = frame(9, 0, 1, &padding_fields(16 * 1024));
    flood.extend(std::iter::repeat_n(more, 1024));
    // The block is refused (not buffered to its end, where the PING would be a protocol
    // error amid it).
    let code = goaway_for(&h, flood).await;
    assert_eq!(
        code, ENHANCE_YOUR_CALM,
        "not {PROTOCOL_ERROR}: taken to its end"
    );
    let leaf = h.ca.client(&[COLLECTOR]);
    h.get(Some(&leaf), None, "contoso", &[GRAPH]).await.unwrap();
    h.stop().await;
}

/// Bounds short enough for a test: the preface within 1 s, a PING after 1 s of silence,
/// answered within 1 s.
fn impatient() -> Silence {
    Silence {
        preface: Duration::from_secs(1),
        ping_after: Duration::from_secs(1),
        ping_timeout: Duration::from_secs(1),
    }
}

/// Reads what the broker sends until it closes the connection (an end of stream, or an
/// error as it closes without TLS's close_notify); panics if it is still open after 20 s.
async fn until_closed(r: &mut (impl AsyncRead + Unpin)) {
    tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 1024];
        while let Ok(1..) = r.read(&mut buf).await {}
    })
    .await
    .expect("the broker closes the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_the_http2_preface_is_closed() {
    let h = Harness::start(Options {
        silence: Some(impatient()),
        ..Default::default()
    })
    .await;
    // A finished TLS handshake, then nothing: the connection costs the broker a task, its
    // buffers and a file descriptor for as long as it is held.
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client_config(&h.server_ca_pem, None))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    // What the broker sends is its SETTINGS; then it closes.
    until_closed(&mut tls).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_has_not_sent_its_preface_does_not_hold_up_shutdown() {
    // The preface bound and the drain bound far off: only shutdown itself can end it.
    let h = Harness::start(Options {
        server: "shutdown_grace_secs = 300",
        silence: Some(Silence {
            preface: Duration::from_secs(300),
            ..impatient()
        }),
        ..Default::default()
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client_config(&h.server_ca_pem, None))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    // It has no call to finish: shutdown closes it rather than waiting for a preface
    // (hyper's graceful shutdown waits for the handshake before it closes).
    tokio::time::timeout(Duration::from_secs(20), h.stop())
        .await
        .expect("shutdown not held up by a connection without its preface");
    until_closed(&mut tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_its_settings_and_nothing_else_is_pinged_then_closed() {
    let h = Harness::start(Options {
        silence: Some(impatient()),
        ..Default::default()
    })
    .await;
    let conn = open_h2(&h, &h.server_ca_pem, None).await.unwrap();
    let (mut rd, _wr) = tokio::io::split(conn);
    // A PING (type 6, not an ACK), never answered: then the connection is closed.
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (kind, flags, _) = read_frame(&mut rd).await.expect("a PING first");
            if kind == 6 && flags & 1 == 0 {
                break;
            }
        }
    })
    .await
    .expect("a PING within the bound");
    until_closed(&mut rd).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_answering_pings_keeps_its_idle_connection() {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        silence: Some(impatient()),
        ..Default::default()
    })
    .await;
    let leaf = h.ca.client(&[COLLECTOR]);
    // hyper's client: it answers PINGs, and its connection is never opened again behind
    // the test's back (tonic's channel would reconnect).
    let mut send = bare_h2(&h, &leaf).await;
    let body = graph_request();
    let call = || {
        http::Request::post("https://localhost/tokenbroker.v1.TokenBroker/GetToken")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body.clone())
            .unwrap()
    };
    assert_eq!(send.send_request(call()).await.unwrap().status(), 200);
    // Silent for longer than a PING's wait and its answer's bound: the client's HTTP/2
    // stack answers, and the connection still serves.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!send.is_closed());
    assert_eq!(send.send_request(call()).await.unwrap().status(), 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_bound_wait_until_one_closes() {
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        server: "max_connections = 2",
        ..Default::default()
    })
    .await;
    let leaf = h.ca.client(&[COLLECTOR]);
    let call = || {
        http::Request::post("https://localhost/tokenbroker.v1.TokenBroker/GetToken")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(graph_request())
            .unwrap()
    };
    let mut first = bare_h2(&h, &leaf).await;
    let mut second = bare_h2(&h, &leaf).await;
    for send in [&mut first, &mut second] {
        let answer = tokio::time::timeout(Duration::from_secs(20), send.send_request(call()))
            .await
            .expect("served")
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    // A third connection waits: its call is not answered while two are open.
    let mut third = bare_h2(&h, &leaf).await;
    let mut waiting = Box::pin(third.send_request(call()));
    assert!(
        tokio::time::timeout(Duration::from_secs(2), &mut waiting)
            .await
            .is_err(),
        "a third connection served past max_connections = 2"
    );
    // One closes: the third is served.
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert_eq!(answer.status(), 200);
    drop(second);
    h.stop().await;
}
