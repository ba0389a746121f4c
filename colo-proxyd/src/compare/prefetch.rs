//! A cache prefetch hint for the bytes a comparison is about to read.
//!
//! The SVM's segment is compared with the PVM's bytes kept at the same offsets, which arrived
//! earlier and have usually left the CPU's nearest caches. Without a hint, the memcmp stalls on
//! each cache line in turn; asking for the lines first lets those misses overlap with the
//! comparator's bookkeeping, and asking for the PVM's bytes the SVM's next segment will meet
//! lets them arrive while this one is handled. `docs/benchmarks.md` has what each of the two
//! hints gained in `proxyd_bench`.

/// Size of a cache line on the CPUs the daemon runs on.
const CACHE_LINE: usize = 64;

/// Asks the CPU to start loading `data` into its caches; never waits, never faults. Every
/// line is asked for: measured, asking for the first few and leaving the rest to the CPU's own
/// prefetcher was no faster than no hint at all.
#[inline]
pub(super) fn prefetch(data: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for offset in (0..data.len()).step_by(CACHE_LINE) {
        // SAFETY: PREFETCHT0 is part of SSE, which every x86_64 CPU has; it is a hint that
        // reads nothing into the program and cannot fault, whatever the address (this one
        // lies inside `data` anyway).
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                data.as_ptr().wrapping_add(offset).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}
