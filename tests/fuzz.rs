//! Bounded, seeded mutation fuzzing of the three parsers that read bytes from the internet: the
//! HTTP upgrade (`ws::upgrade::decide`), the frame decoder (`ws::frame::decode`) and the app
//! protocol (`proto::parse`, with `proto::check_body`). Each starts from its corpus in
//! `tests/fuzz/<target>/` and mutates (bit flips, interesting bytes, inserts, deletes, repeats,
//! splices of two entries). A run checks that nothing panics and that each parser keeps its
//! contract (see each target). Why not cargo-fuzz: it needs a nightly toolchain and libFuzzer,
//! which CI does not have; this runs on stable in every test run.
//!
//! `RINGGATE_FUZZ_ITERS=N` sets the mutations per target (default 200,000, under a second in a release build);
//! a longer run: `RINGGATE_FUZZ_ITERS=20000000 cargo test --release --test fuzz -- --nocapture`.
//! `RINGGATE_FUZZ_SEED=S` replays one run. A failing input is printed (and written to
//! `target/fuzz-failure-<target>`), to be added to the corpus once fixed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use ringgate::auth::Authenticator;
use ringgate::proto;
use ringgate::ws::{frame, upgrade};

/// splitmix64: seeded, so a failing run replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[u8] = b"\x00\xff\x7f\x80\x7e\x7d\"\\{}[]:,\r\n -0123456789eEuU%+=";

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz")
        .join(target);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    let inputs: Vec<Vec<u8>> = entries.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!inputs.is_empty(), "empty corpus {}", dir.display());
    inputs
}

/// One to four mutations of a corpus entry (sometimes spliced with another).
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut input = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(7) {
            0 if !input.is_empty() => {
                let i = at.min(input.len() - 1);
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = at.min(input.len() - 1);
                input[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => input.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
            3 if !input.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(input.len());
                input.drain(at.min(end)..end);
            }
            4 if !input.is_empty() => {
                // Repeat a chunk (deep nesting, many headers, long values).
                let start = at.min(input.len() - 1);
                let end = (start + 1 + rng.below(8)).min(input.len());
                let chunk = input[start..end].to_vec();
                for _ in 0..1 + rng.below(200) {
                    input.splice(start..start, chunk.iter().copied());
                }
            }
            5 => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            _ => input.truncate(at),
        }
    }
    input
}

/// Run `check` on every corpus entry, then on `iters` mutations; the first panic fails with its
/// input. Returns how many inputs each outcome label got.
fn fuzz(
    target: &str,
    seed: u64,
    iters: u64,
    corpus: &[Vec<u8>],
    check: impl Fn(&[u8]) -> &'static str,
) -> Result<std::collections::BTreeMap<&'static str, u64>, String> {
    let mut rng = Rng(seed);
    let mut outcomes = std::collections::BTreeMap::new();
    // (The default panic hook prints the one panic caught; it is not swapped out, since the
    // targets run on parallel test threads and the hook is process-wide.)
    let mut result = Ok(());
    for i in 0..corpus.len() as u64 + iters {
        let input = match corpus.get(i as usize) {
            Some(entry) => entry.clone(),
            None => mutate(&mut rng, corpus),
        };
        match catch_unwind(AssertUnwindSafe(|| check(&input))) {
            Ok(label) => *outcomes.entry(label).or_insert(0) += 1,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join(format!("target/fuzz-failure-{target}"));
                let _ = std::fs::write(&path, &input);
                result = Err(format!(
                    "{target}: input {i} (seed {seed}) panicked: {what}\ninput: {:?}\nwritten to {}",
                    String::from_utf8_lossy(&input),
                    path.display()
                ));
                break;
            }
        }
    }
    result.map(|()| outcomes)
}

fn settings() -> (u64, u64) {
    let iters = std::env::var("RINGGATE_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let seed = std::env::var("RINGGATE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_F022);
    (iters, seed)
}

fn run(target: &str, check: impl Fn(&[u8]) -> &'static str, must_see: &[&str]) {
    let (iters, seed) = settings();
    let outcomes =
        fuzz(target, seed, iters, &corpus(target), check).unwrap_or_else(|e| panic!("{e}"));
    println!("fuzz {target}: seed {seed}, {iters} mutations, outcomes {outcomes:?}");
    for label in must_see {
        assert!(
            outcomes.contains_key(label),
            "{target}: no input reached {label:?} ({outcomes:?}): the corpus or the mutations are too weak"
        );
    }
}

/// The upgrade decision: any bytes give a decision; an accepted head lies within the input
/// and its response is a 101; a refusal is a complete HTTP response.
#[test]
fn fuzz_the_http_upgrade() {
    let dev = Authenticator::new(None);
    let jwt = Authenticator::new(Some("fuzz-secret-0123456789"));
    let origins = ["https://app.example".to_string()];
    run(
        "upgrade",
        |input| {
            let mut last = "incomplete";
            for (auth, origins) in [(&dev, &[][..]), (&jwt, &origins[..])] {
                let policy = upgrade::Policy {
                    auth,
                    allowed_origins: origins,
                    echo_route: true,
                    demo: auth.dev_mode(),
                    draining: false,
                    at_capacity: false,
                    retry_after_s: 1,
                    too_fast_retry_s: 0,
                };
                last = match upgrade::decide(input, &policy) {
                    upgrade::Decision::Incomplete => "incomplete",
                    upgrade::Decision::Upgrade(a) => {
                        assert!(a.head_len <= input.len());
                        assert!(a.response.starts_with(b"HTTP/1.1 101 "));
                        "upgrade"
                    }
                    upgrade::Decision::Refuse(r, response) => {
                        let head = format!("HTTP/1.1 {} ", r.status().0);
                        assert!(response.starts_with(head.as_bytes()));
                        assert!(response.windows(4).any(|w| w == b"\r\n\r\n"));
                        "refused"
                    }
                    upgrade::Decision::Serve(response) => {
                        assert!(response.starts_with(b"HTTP/1.1 "));
                        "served"
                    }
                    upgrade::Decision::RefuseInBand {
                        refusal, accepted, ..
                    } => {
                        assert!(accepted.auth_in_frame, "only auth=frame is told in-band");
                        assert!(accepted.response.starts_with(b"HTTP/1.1 101 "));
                        assert_eq!(refusal, upgrade::Refusal::Forbidden, "the only one here");
                        "refused in-band"
                    }
                };
            }
            last
        },
        &["upgrade", "refused", "refused in-band", "incomplete"],
    );
}

/// The frame decoder: a decoded frame consumed at most the input and at least its header; a
/// bad frame's declared length is at least what a header takes.
#[test]
fn fuzz_the_frame_decoder() {
    run(
        "frame",
        |input| {
            let mut buf = input.to_vec();
            let mut pos = 0;
            let mut last = "needs more";
            while pos < buf.len() {
                match frame::decode(&mut buf[pos..], 1024) {
                    Ok(None) => return last,
                    Ok(Some((f, used))) => {
                        assert!(used >= 2 + f.payload.len() && pos + used <= input.len());
                        pos += used;
                        last = "frame";
                    }
                    Err(bad) => {
                        assert!(matches!(bad.violation.code, 1002 | 1009));
                        assert!(bad.frame_len.is_none_or(|n| n >= 2));
                        return "bad frame";
                    }
                }
            }
            last
        },
        &["frame", "bad frame", "needs more"],
    );
}

/// The app protocol: any bytes give a frame or an error; a parsed `send` or `publish` has a
/// body that is I-JSON and parses as JSON.
#[test]
fn fuzz_the_app_protocol() {
    run(
        "proto",
        |input| match proto::parse(input) {
            Ok(proto::ClientFrame::Send(s)) => {
                assert!(proto::check_body(&s.body).is_ok());
                assert!(serde_json::from_str::<serde_json::Value>(&s.body).is_ok());
                "send"
            }
            Ok(proto::ClientFrame::Publish { body, .. }) => {
                assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());
                "publish"
            }
            Ok(_) => "other op",
            Err(_) => "error",
        },
        &["send", "publish", "other op", "error"],
    );
}

/// The harness finds a planted crash reachable by mutation, and reports its input.
#[test]
fn the_fuzzer_finds_a_planted_crash() {
    let corpus = vec![b"{\"op\":\"ping\"}".to_vec()];
    let planted = |input: &[u8]| {
        if input.first() == Some(&b'[') && input.len() > 4 {
            panic!("planted");
        }
        "fine"
    };
    let err = fuzz("planted", 1, 200_000, &corpus, planted).unwrap_err();
    assert!(err.contains("planted") && err.contains("input"), "{err}");
}
