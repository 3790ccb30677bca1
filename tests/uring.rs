//! The `/echo` frame path under both socket drivers (`io_driver = "glommio"` and `"uring"`,
//! docs/architecture.md, "Socket I/O on io_uring"), with what real sockets do to a driver:
//! a frame split over many reads, a frame over several receive buffers, a slow reader that
//! forces partial writes and stops the receive, many connections at once, close and ping,
//! peers that vanish. Every test runs once per driver, in one gateway each.
//! (`RINGGATE_IO_DRIVER=uring cargo test --test gateway` runs the whole gateway suite on it.)

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const DRIVERS: [&str; 2] = ["glommio", "uring"];

fn echo_gateway(driver: &str, extra: &[&str]) -> Gateway {
    let mut args = vec!["--echo-route", "true", "--io-driver", driver];
    args.extend_from_slice(extra);
    Gateway::start(&args)
}

/// An `/echo` connection whose client side has a receive buffer of `bytes`, upgraded.
fn echo_with_recv_buffer(gw: &Gateway, bytes: usize) -> RawWs {
    let stream = TcpStream::connect(gw.public).unwrap();
    socket2::SockRef::from(&stream)
        .set_recv_buffer_size(bytes)
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut up = stream.try_clone().unwrap();
    let head = "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    up.write_all(head.as_bytes()).unwrap();
    RawWs::after_upgrade(stream)
}

fn next_data_frame(raw: &mut RawWs) -> RawFrame {
    loop {
        let f = raw.recv().expect("a frame before the timeout");
        if f.opcode != 9 {
            return f;
        }
    }
}

#[test]
fn a_frame_split_over_many_reads_is_echoed_whole() {
    for driver in DRIVERS {
        let gw = echo_gateway(driver, &[]);
        let mut raw = RawWs::connect(gw.public, "/echo");
        raw.stream.set_nodelay(true).unwrap();
        let payload: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let bytes = masked_frame(true, 2, &payload);
        // One byte per write, with pauses: the server sees many tiny receives.
        for (i, b) in bytes.iter().enumerate() {
            raw.stream.write_all(&[*b]).unwrap();
            if i % 16 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let f = next_data_frame(&mut raw);
        assert_eq!((f.opcode, f.payload), (2, payload), "{driver}");
    }
}

#[test]
fn large_frames_over_several_receive_buffers_and_pipelined_frames_are_echoed() {
    for driver in DRIVERS {
        let gw = echo_gateway(driver, &[]);
        let mut raw = RawWs::connect(gw.public, "/echo");
        // 65,536 bytes: 17 of the uring driver's 4 KiB receive buffers, in one write.
        let big: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        raw.send_frame(true, 2, &big);
        let f = next_data_frame(&mut raw);
        assert_eq!(f.payload.len(), big.len(), "{driver}");
        assert!(
            f.payload == big,
            "{driver}: the large frame came back changed"
        );
        // 200 small frames in one write: many frames in one receive.
        let mut burst = Vec::new();
        for i in 0..200u32 {
            burst.extend(masked_frame(true, 1, format!("m{i}").as_bytes()));
        }
        raw.stream.write_all(&burst).unwrap();
        for i in 0..200u32 {
            let f = next_data_frame(&mut raw);
            assert_eq!(f.payload, format!("m{i}").as_bytes(), "{driver}");
        }
    }
}

/// The client writes 2 MiB of frames without reading: the server's output to it exceeds its
/// bound, sends complete partially, the uring driver stops receiving; once the client reads,
/// everything comes back in order.
#[test]
fn a_slow_reader_gets_every_echo_in_order() {
    for driver in DRIVERS {
        let gw = echo_gateway(driver, &["--max-outbound", "65536", "--max-frame", "65536"]);
        // A small receive buffer on the client: the server's sends come back short.
        let mut raw = echo_with_recv_buffer(&gw, 32768);
        let mut writer = raw.stream.try_clone().unwrap();
        const N: usize = 32;
        let sender = std::thread::spawn(move || {
            for i in 0..N {
                writer
                    .write_all(&masked_frame(true, 2, &vec![i as u8; 65_000]))
                    .unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        for i in 0..N {
            let f = next_data_frame(&mut raw);
            assert_eq!(
                (f.payload.len(), f.payload[0], f.payload[64_999]),
                (65_000, i as u8, i as u8),
                "{driver}: echo {i}"
            );
        }
        sender.join().unwrap();
    }
}

#[test]
fn many_connections_at_once_each_get_their_own_echoes() {
    // The uring driver also without its batch wait, and with a long one (a busy shard's wait
    // gathering up to 10 ms of completions must still answer each, in order).
    let runs: [(&str, &[&str]); 4] = [
        ("glommio", &[]),
        ("uring", &[]),
        ("uring", &["--uring-batch-wait-us", "0"]),
        ("uring", &["--uring-batch-wait-us", "10000"]),
    ];
    for (driver, extra) in runs {
        // 300 connections from one address at once: the per-address rate is not under test.
        let gw = echo_gateway(driver, &[&["--ip-connect-rate", "0"], extra].concat());
        let driver = format!("{driver} {extra:?}");
        let mut conns: Vec<RawWs> = (0..300)
            .map(|_| RawWs::connect(gw.public, "/echo"))
            .collect();
        for round in 0..3 {
            // Three frames in flight per connection: busy turns.
            for (i, c) in conns.iter_mut().enumerate() {
                for k in 0..3 {
                    c.send_frame(true, 1, format!("{i}:{round}:{k}").as_bytes());
                }
            }
            for (i, c) in conns.iter_mut().enumerate() {
                for k in 0..3 {
                    let f = next_data_frame(c);
                    assert_eq!(f.payload, format!("{i}:{round}:{k}").as_bytes(), "{driver}");
                }
            }
        }
        assert_eq!(gw.metric_sum("ringgate_connections_open"), 300, "{driver}");
        drop(conns);
        assert!(
            eventually(Duration::from_secs(10), || gw
                .metric_sum("ringgate_connections_open")
                == 0),
            "{driver}: every dropped client's connection closed"
        );
    }
}

#[test]
fn ping_is_answered_and_close_is_returned_then_tcp_closes() {
    for driver in DRIVERS {
        let gw = echo_gateway(driver, &[]);
        let mut raw = RawWs::connect(gw.public, "/echo");
        raw.send_frame(true, 9, b"are you there");
        let f = raw.recv().unwrap();
        assert_eq!((f.opcode, f.payload), (10, b"are you there".to_vec()));
        raw.send_frame(true, 8, &1000u16.to_be_bytes());
        let f = raw.recv().unwrap();
        assert_eq!(f.close_code(), Some(1000), "{driver}");
        // The server closes TCP after its close frame: EOF, not the 10 s read timeout.
        let mut rest = [0u8; 16];
        assert_eq!(raw.stream.read(&mut rest).unwrap_or(0), 0, "{driver}");
    }
}

#[test]
fn peers_that_vanish_mid_frame_or_reset_free_their_connections() {
    for driver in DRIVERS {
        let gw = echo_gateway(driver, &[]);
        let mut mid_frame = RawWs::connect(gw.public, "/echo");
        let bytes = masked_frame(true, 2, &[7u8; 1000]);
        mid_frame.stream.write_all(&bytes[..500]).unwrap();
        let reset = RawWs::connect(gw.public, "/echo");
        socket2::SockRef::from(&reset.stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        let handshaking = TcpStream::connect(gw.public).unwrap();
        assert!(eventually(Duration::from_secs(5), || gw
            .metric_sum("ringgate_connections_open")
            == 2));
        drop(mid_frame);
        drop(reset); // RST
        drop(handshaking);
        assert!(
            eventually(Duration::from_secs(10), || gw
                .metric_sum("ringgate_connections_open")
                == 0),
            "{driver}: closed connections freed"
        );
        // The gateway still serves.
        let mut raw = RawWs::connect(gw.public, "/echo");
        raw.send_frame(true, 1, b"still here");
        assert_eq!(next_data_frame(&mut raw).payload, b"still here");
    }
}

/// Slow readers hold receive buffers (their output is over its bound, so they stop taking
/// input) until the uring driver's provided buffer ring is empty and receives end with
/// ENOBUFS. The driver must neither spin on re-arming into the empty ring nor drop a socket
/// for good: the holders copy their buffers out (so a new connection is still served), the
/// starved receives are armed again as buffers come back, and once the clients read, every
/// echo arrives, in order. A ring of 16 buffers (64 KiB), one shard, 8 slow readers that
/// may each hold 16.
#[test]
fn a_receive_buffer_ring_run_dry_by_slow_readers_stalls_nobody_and_loses_nothing() {
    const READERS: usize = 4;
    // 16 MB per reader: more than the kernel buffers between the server and a client that
    // does not read (the server's send buffer alone grows to 4 MiB here).
    const FRAMES: usize = 1024;
    const FRAME: usize = 16_000;
    let byte = |reader: usize, frame: usize| (reader * 31 + frame) as u8;
    for driver in DRIVERS {
        let gw = Gateway::start_shards(
            1,
            &[
                "--echo-route",
                "true",
                "--io-driver",
                driver,
                "--uring-recv-buffers",
                "16",
                "--max-outbound",
                "65536",
                "--max-frame",
                "65536",
                "--ip-connect-rate",
                "0",
            ],
        );
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for r in 0..READERS {
            // A small receive buffer: the echoes back up into the server sooner. Not below
            // loopback's segment size (64 KiB): TCP would drop segments and back off for
            // seconds.
            let raw = echo_with_recv_buffer(&gw, 65536);
            let mut writer = raw.stream.try_clone().unwrap();
            writers.push(std::thread::spawn(move || {
                for f in 0..FRAMES {
                    let frame = masked_frame(true, 2, &vec![byte(r, f); FRAME]);
                    if writer.write_all(&frame).is_err() {
                        return;
                    }
                }
            }));
            readers.push(raw);
        }
        // Wait until the server takes no more input: every writer is blocked, so every
        // socket's receive is stopped (16 buffers' worth unread) or starved (ENOBUFS).
        let mut last = u64::MAX;
        assert!(
            eventually(Duration::from_secs(30), || {
                std::thread::sleep(Duration::from_millis(500));
                let now = gw.metric_sum("ringgate_bytes_in_total");
                std::mem::replace(&mut last, now) == now
            }),
            "{driver}: the server never stopped taking input"
        );
        assert!(
            writers.iter().all(|w| !w.is_finished()),
            "{driver}: a writer finished: the server never held its input back"
        );
        if driver == "uring" {
            assert!(
                gw.metric_sum("ringgate_recv_buffers_exhausted_total") > 0,
                "the slow readers never emptied the receive buffer ring"
            );
            // Nothing moves now (no client reads): an empty ring must not be re-armed into
            // over and over.
            let before = gw.metric_sum("ringgate_recv_buffers_exhausted_total");
            let cpu_before = process_cpu_ms(gw.child.id());
            std::thread::sleep(Duration::from_secs(1));
            let after = gw.metric_sum("ringgate_recv_buffers_exhausted_total");
            let cpu = process_cpu_ms(gw.child.id()) - cpu_before;
            assert!(
                after - before < 50,
                "receives re-armed into an empty ring: {} ENOBUFS in 1 s",
                after - before
            );
            assert!(cpu < 500, "the gateway spun: {cpu} ms of CPU in 1 s");
        }
        // Meanwhile a new connection is served.
        let mut fresh = RawWs::connect(gw.public, "/echo");
        fresh.send_frame(true, 1, b"not starved");
        assert_eq!(
            next_data_frame(&mut fresh).payload,
            b"not starved",
            "{driver}"
        );
        for (r, raw) in readers.iter_mut().enumerate() {
            for f in 0..FRAMES {
                let got = next_data_frame(raw);
                assert!(
                    got.payload.len() == FRAME && got.payload.iter().all(|b| *b == byte(r, f)),
                    "{driver}: reader {r}, echo {f}: {} bytes, first {:?}",
                    got.payload.len(),
                    got.payload.first()
                );
            }
        }
        for w in writers {
            w.join().unwrap();
        }
    }
}

/// CPU time (user + system) of process `pid` so far, in ms.
fn process_cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    ticks * 1000 / hz
}
