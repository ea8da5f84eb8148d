//! glibc's allocator, set before any thread exists (`main`, and the benchmarks' daemon): two
//! arenas, not one per thread up to eight per CPU (what a thread freed stayed in its arena;
//! one arena made changes wait on the kernel read's threads), and blocks over 128 KiB mapped
//! alone and free memory above it returned, instead of thresholds that grow to the largest
//! block freed; and [`release`], which the IPVS engine calls around and during each full sync
//! and after each read ([docs/sync.md](../docs/sync.md#where-the-bytes-go)).
#![allow(unsafe_code, reason = "mallopt and malloc_trim are libc calls")]

/// Call first in `main`: glibc takes these only before its arenas exist.
pub fn tune() {
    // SAFETY: mallopt sets allocator state from two integers; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}

/// Returns the free pages of every arena to the kernel, those between live blocks too (the
/// trim threshold returns only a heap's top): what a full sync freed would otherwise stay
/// in RSS, in the arena of the thread that freed it.
pub fn release() {
    // SAFETY: malloc_trim takes an integer and locks each arena itself; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}
