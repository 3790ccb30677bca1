//! Giving memory back to the OS after a wave of connections went idle or away.
//!
//! ringgate's binaries use mimalloc. mimalloc purges free pages lazily, on later allocator
//! activity of the same thread; an idle shard (most sockets parked, nothing happening) makes
//! none, so the memory of tasks and buffers its parked connections released would stay
//! resident. Shards call [`release_free_memory`] from their tick, at most once per
//! [`RELEASE_EVERY_MS`] and only after connections parked or closed. Measured effect at 19,000
//! idle connections in one shard: 1,232 -> 642 B RSS per connection (README, Performance).

/// Minimum time between two collections on one shard.
pub const RELEASE_EVERY_MS: u64 = 1_000;

/// Return this thread's free mimalloc pages to the OS (a no-op for other allocators' memory).
pub fn release_free_memory() {
    // SAFETY: mi_collect has no preconditions; it only walks this thread's own heap.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// mimalloc's `mi_option_purge_delay` (its C enum's 16th option; not named by libmimalloc-sys).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc keeps freed memory committed before giving it back: 1 ms instead of its
/// default (1,000 ms in mimalloc v3, the version libmimalloc-sys builds). Measured at 19,000
/// idle connections on one shard (uring, anonymous memory per connection, docs/performance.md
/// "Smaller per-connection tables"): default 349-358 B, 5 ms 324-335 B, 1 ms 312 B, 0 ms
/// 262-264 B. The cost, `bench/before_after.sh` with and without:
/// 1 ms 1.02x gateway CPU per message at send 100 x 16 and 1.00x at echo; 0 ms 1.04x and 1.08x.
pub const PURGE_DELAY_MS: libc::c_long = 1;

/// Set mimalloc's purge delay to [`PURGE_DELAY_MS`] unless the environment chose one
/// (`MIMALLOC_PURGE_DELAY`, read by mimalloc itself). Called first thing in `main`.
pub fn shorten_purge_delay() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads options atomically at each use.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) }
    }
}

/// mimalloc's purge delay now, in ms.
pub fn purge_delay_ms() -> libc::c_long {
    // SAFETY: reads one integer option.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
}

/// Whether the heap may be backed by transparent huge pages (`huge_pages`, off by default).
/// mimalloc asks the kernel for them (`MADV_HUGEPAGE`) on the regions it maps, so each 2 MiB
/// of heap a shard touches at all becomes resident whole: measured at 19,000 idle connections
/// on one shard, ~35 MiB RSS with them against ~23 MiB without (~590 -> ~415 B per
/// connection; docs/performance.md, "Huge pages"), for ~3% less CPU per message on a busy 1:1
/// path. Off: the process opts out with `PR_SET_THP_DISABLE`, which the kernel honours
/// whatever mimalloc asks and whatever the host's THP setting (`always` included). Called
/// first thing in `main` (off) and again by `serve` with the config, before the shards
/// allocate their tables.
pub fn allow_huge_pages(allowed: bool) -> std::io::Result<()> {
    let disable = libc::c_ulong::from(!allowed);
    let zero: libc::c_ulong = 0;
    // SAFETY: PR_SET_THP_DISABLE takes a flag and three arguments that must be zero (passed
    // as full-width longs: prctl is variadic); it changes only this process's memory policy.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, disable, zero, zero, zero) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    /// The option number is mimalloc's purge delay: its default is 1,000 ms (v3), and setting it
    /// through that number reads back (a wrong number would change some other option).
    #[test]
    fn the_purge_delay_is_set_through_the_right_option() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            panic!("unset MIMALLOC_PURGE_DELAY to run this test (it checks mimalloc's default)");
        }
        assert_eq!(
            super::purge_delay_ms(),
            1_000,
            "mimalloc v3's default purge delay"
        );
        super::shorten_purge_delay();
        assert_eq!(super::purge_delay_ms(), super::PURGE_DELAY_MS);
    }
}
