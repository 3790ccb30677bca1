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
