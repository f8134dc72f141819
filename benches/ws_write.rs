//! Criterion bench behind the write-path decision (docs/benchmarks.md §9): what putting one
//! batch on a connection costs in user space through tungstenite (the chosen stack), against
//! a hand-written unmasked server frame (header + payload, the alternative the performance
//! issue names), and against the kernel's cost of the `send` that follows either of them on
//! a real loopback TCP socket. A typical batch under load is ~400 bytes (16-byte header and
//! six records). The server has since moved its data frames to the second way
//! (`server::outbox`, with the header from `tickgate_proto::ws`; docs/benchmarks.md §18).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tickgate_proto::ws::{server_header, BINARY};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A typical batch message under load.
const BATCH_BYTES: usize = 16 + 6 * 64;

/// A socket stand-in that takes every byte (and counts them) and never has input.
#[derive(Default)]
struct Sink {
    written: u64,
}

impl Read for Sink {
    fn read(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written += buf.len() as u64;
        Ok(buf.len())
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let n = bufs.iter().map(|b| b.len()).sum::<usize>();
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn bench_ws_write(c: &mut Criterion) {
    let payload = Bytes::from(vec![7u8; BATCH_BYTES]);
    let mut g = c.benchmark_group("ws_write");
    g.throughput(Throughput::Elements(1));

    // The server's configuration (connection.rs `ws_config`): frames are buffered and
    // flushed once per writer wake-up.
    let mut cfg = WebSocketConfig::default();
    cfg.read_buffer_size = 1024;
    cfg.write_buffer_size = 64 * 1024;
    let mut ws = WebSocket::from_raw_socket(Sink::default(), Role::Server, Some(cfg));
    g.bench_function("tungstenite_frame_400B", |b| {
        b.iter(|| {
            ws.write(Message::Binary(black_box(payload.clone()))).unwrap();
            ws.flush().unwrap();
        })
    });
    assert!(ws.get_ref().written > 0);

    // The alternative: header and shared payload handed over as two slices (what a
    // vectored write would pass to the kernel), no copy into a frame buffer.
    let mut sink = Sink::default();
    g.bench_function("hand_written_frame_400B", |b| {
        b.iter(|| {
            let (h, n) = server_header(BINARY, black_box(payload.len()));
            let bufs = [std::io::IoSlice::new(&h[..n]), std::io::IoSlice::new(&payload)];
            let wrote = sink.write_vectored(black_box(&bufs)).unwrap();
            assert_eq!(wrote, n + BATCH_BYTES);
        })
    });
    assert!(sink.written > 0);

    // What follows either one: the kernel's send of the frame on a loopback TCP socket
    // (TCP_NODELAY, as the server sets it), with a thread reading the other end.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut tx = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    tx.set_nodelay(true).unwrap();
    let (mut rx, _) = listener.accept().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while matches!(rx.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut frame = vec![0u8; 0];
    let (h, n) = server_header(BINARY, payload.len());
    frame.extend_from_slice(&h[..n]);
    frame.extend_from_slice(&payload);
    g.bench_function("loopback_send_400B", |b| b.iter(|| tx.write_all(black_box(&frame)).unwrap()));
    g.finish();
    drop(tx);
    reader.join().unwrap();
}

criterion_group!(benches, bench_ws_write);
criterion_main!(benches);
