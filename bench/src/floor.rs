//! `floor`: what the kernel alone costs for a room fan-out on this host, without ringgate.
//!
//! N loopback TCP connections; writer threads (like a gateway's shards) write one small
//! frame to each server-side socket with plain `write(2)`, one reader thread (like a load
//! generator) waits on all client sides with epoll until every socket got its frame. A round
//! is timed from the first write to the last byte read. Nothing here parses or routes: it is
//! the floor under `fanout` for the same member count on the same machine.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

#[derive(Args, Debug)]
pub struct FloorArgs {
    /// Connections (each uses two descriptors of this process)
    #[arg(long, default_value_t = 9_000)]
    pub sockets: usize,
    /// Rounds: one frame to every connection each
    #[arg(long, default_value_t = 40)]
    pub rounds: usize,
    /// Bytes per frame (`fanout` reports its members' as `frame_bytes`: about 185 for its
    /// 40-byte body, as the room frame carries room, offset, id, from, cid and ts)
    #[arg(long, default_value_t = 80)]
    pub bytes: usize,
    /// Writer threads, each writing to its share of the connections
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// Pause between rounds, milliseconds
    #[arg(long, default_value_t = 100)]
    pub pause_ms: u64,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
    /// Writers submit each round's sends through an io_uring (one per writer, registered
    /// files, the gateway's ring flags) instead of one `write(2)` per socket
    #[arg(long)]
    pub uring: bool,
}

pub fn run(args: FloorArgs) -> Result<(), String> {
    if args.sockets == 0 || args.rounds == 0 || args.bytes == 0 || args.writers == 0 {
        return Err("--sockets, --rounds, --bytes and --writers must be at least 1".into());
    }
    let limit = crate::net::raise_nofile_limit();
    crate::net::check_fd_budget(2 * args.sockets, limit, args.writers + 1)?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut clients = Vec::with_capacity(args.sockets);
    let mut servers = Vec::with_capacity(args.sockets);
    for _ in 0..args.sockets {
        let c = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        let (s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        c.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        clients.push(c);
        servers.push(s);
    }
    // The reader: every client side, until each got `bytes` bytes; then the round's end.
    let (done_tx, done_rx) = mpsc::channel::<Instant>();
    let (bytes, rounds) = (args.bytes, args.rounds);
    let reader = std::thread::spawn(move || read_rounds(clients, bytes, rounds, done_tx));
    let start = Arc::new(Barrier::new(args.writers + 1));
    let (wrote_tx, wrote_rx) = mpsc::channel::<Instant>();
    let per = args.sockets.div_ceil(args.writers);
    let mut writers = Vec::new();
    for part in chunks(servers, per) {
        let (start, wrote_tx) = (start.clone(), wrote_tx.clone());
        let uring = args.uring;
        writers.push(std::thread::spawn(move || {
            let frame = vec![b'x'; bytes];
            let mut part = part;
            let mut ring = uring.then(|| UringWriter::new(&part));
            let mut cpu = 0.0;
            for _ in 0..rounds {
                start.wait();
                let cpu0 = crate::sys::thread_cpu_secs();
                match ring.as_mut() {
                    Some(ring) => ring.send_to_all(&frame),
                    None => {
                        for s in &mut part {
                            s.write_all(&frame).expect("write to a loopback socket");
                        }
                    }
                }
                cpu += crate::sys::thread_cpu_secs() - cpu0;
                let _ = wrote_tx.send(Instant::now());
            }
            // Closed by the caller once the reader is done (a FIN must not race the reads).
            (part, cpu)
        }));
    }
    let cpu0 = crate::sys::self_cpu_secs();
    let mut reader = Some(reader);
    let mut reader_error = || match reader.take().map(|r| r.join()) {
        Some(Ok(Err(e))) => e,
        _ => "the reader stopped".to_string(),
    };
    let mut all_written = Histogram::<u64>::new(3).expect("histogram");
    let mut last_read = Histogram::<u64>::new(3).expect("histogram");
    for _ in 0..args.rounds {
        std::thread::sleep(Duration::from_millis(args.pause_ms));
        let t0 = Instant::now();
        start.wait();
        let mut written = t0;
        for _ in 0..args.writers {
            written = written.max(wrote_rx.recv().map_err(|_| "a writer stopped")?);
        }
        let Ok(read) = done_rx.recv() else {
            return Err(reader_error());
        };
        all_written.record((written - t0).as_micros() as u64).ok();
        last_read.record((read - t0).as_micros() as u64).ok();
    }
    let cpu = crate::sys::self_cpu_secs() - cpu0;
    let mut sockets = Vec::new();
    let mut writers_cpu = 0.0;
    for w in writers {
        let (part, cpu) = w.join().map_err(|_| "a writer panicked")?;
        sockets.push(part);
        writers_cpu += cpu;
    }
    let mut reader_cpu = 0.0;
    if let Some(reader) = reader {
        reader_cpu = reader.join().map_err(|_| "the reader panicked")??;
    }
    drop(sockets);
    let deliveries = (args.sockets * args.rounds) as f64;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let cpu_us = cpu * 1e6 / deliveries;
    // The two ends apart: the writers stand for the gateway's shards, the reader for the
    // load generator (`fanout` reports `gateway_` and `generator_cpu_us_per_delivery`).
    let writer_cpu_us = writers_cpu * 1e6 / deliveries;
    let reader_cpu_us = reader_cpu * 1e6 / deliveries;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "sockets": args.sockets, "rounds": args.rounds, "bytes": args.bytes,
                "writers": args.writers,
                "written_ms": {"p50": ms(&all_written, 0.5), "p99": ms(&all_written, 0.99)},
                "last_read_ms": {"p50": ms(&last_read, 0.5), "p99": ms(&last_read, 0.99)},
                "cpu_us_per_delivery": cpu_us,
                "writer_cpu_us_per_delivery": writer_cpu_us,
                "reader_cpu_us_per_delivery": reader_cpu_us,
            })
        );
    } else {
        println!(
            "floor: {} sockets x {} rounds, {} B frames, {} writer(s), 1 reader",
            args.sockets, args.rounds, args.bytes, args.writers
        );
        println!(
            "  all written   p50 {:.1} ms  p99 {:.1} ms",
            ms(&all_written, 0.5),
            ms(&all_written, 0.99)
        );
        println!(
            "  last read     p50 {:.1} ms  p99 {:.1} ms",
            ms(&last_read, 0.5),
            ms(&last_read, 0.99)
        );
        println!(
            "  cpu           {cpu_us:.2} us per delivery (writers {writer_cpu_us:.2} + reader \
             {reader_cpu_us:.2}, kernel included)"
        );
    }
    Ok(())
}

/// A writer's io_uring: its sockets registered, one send per socket per round, submitted in
/// as few `io_uring_enter`s as the ring's size allows, every completion reaped.
struct UringWriter {
    ring: io_uring::IoUring,
    sockets: usize,
}

impl UringWriter {
    const ENTRIES: u32 = 4096;

    fn new(part: &[TcpStream]) -> UringWriter {
        use std::os::fd::AsRawFd;
        let ring = io_uring::IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(Self::ENTRIES * 2)
            .build(Self::ENTRIES)
            .expect("io_uring (kernel >= 6.1)");
        let fds: Vec<i32> = part.iter().map(|s| s.as_raw_fd()).collect();
        ring.submitter()
            .register_files(&fds)
            .expect("register the sockets");
        UringWriter {
            ring,
            sockets: part.len(),
        }
    }

    fn send_to_all(&mut self, frame: &[u8]) {
        let mut pushed = 0;
        let mut done = 0;
        while done < self.sockets {
            while pushed < self.sockets {
                let send = io_uring::opcode::Send::new(
                    io_uring::types::Fixed(pushed as u32),
                    frame.as_ptr(),
                    frame.len() as u32,
                )
                .flags(libc::MSG_NOSIGNAL)
                .build();
                // SAFETY: the frame and the registered sockets outlive the round.
                if unsafe { self.ring.submission().push(&send) }.is_err() {
                    break;
                }
                pushed += 1;
            }
            self.ring.submit_and_wait(1).expect("io_uring_enter");
            for cqe in self.ring.completion() {
                assert_eq!(cqe.result(), frame.len() as i32, "a whole send");
                done += 1;
            }
        }
    }
}

fn chunks(mut all: Vec<TcpStream>, per: usize) -> Vec<Vec<TcpStream>> {
    let mut parts = Vec::new();
    while !all.is_empty() {
        let rest = all.split_off(per.min(all.len()));
        parts.push(all);
        all = rest;
    }
    parts
}

fn read_rounds(
    clients: Vec<TcpStream>,
    bytes: usize,
    rounds: usize,
    done: mpsc::Sender<Instant>,
) -> Result<f64, String> {
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut streams: Vec<mio::net::TcpStream> = Vec::with_capacity(clients.len());
    for (i, c) in clients.into_iter().enumerate() {
        c.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut s = mio::net::TcpStream::from_std(c);
        poll.registry()
            .register(&mut s, Token(i), Interest::READABLE)
            .map_err(|e| e.to_string())?;
        streams.push(s);
    }
    let n = streams.len();
    let mut got = vec![0usize; n];
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; 64 * 1024];
    let target = |round: usize| (round + 1) * bytes;
    // Its CPU from the first round on (registering the sockets is set-up, not reading).
    let cpu0 = crate::sys::thread_cpu_secs();
    for round in 0..rounds {
        // Nothing of this round is sent before the previous one was reported done.
        let mut complete = 0usize;
        while complete < n {
            poll.poll(&mut events, Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            if events.is_empty() {
                return Err(format!(
                    "round {round}: {complete} of {n} sockets got their frame"
                ));
            }
            for ev in &events {
                let i = ev.token().0;
                loop {
                    match streams[i].read(&mut buf) {
                        Ok(0) => return Err("a connection closed".into()),
                        Ok(k) => {
                            let before = got[i];
                            got[i] += k;
                            if before < target(round) && got[i] >= target(round) {
                                complete += 1;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.to_string()),
                    }
                }
            }
        }
        let _ = done.send(Instant::now());
    }
    Ok(crate::sys::thread_cpu_secs() - cpu0)
}
