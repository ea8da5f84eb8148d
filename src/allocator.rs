//! glibc's allocator, set before any thread exists (`main`, the benchmarks' daemon, `bench
//! change`): two arenas, not one per thread up to eight per CPU (what a thread freed stayed in
//! its arena; one arena made changes wait on the kernel read's threads), and blocks over 128
//! KiB mapped alone and free memory above it returned, instead of thresholds that grow to the
//! largest block freed; and [`release`], which the IPVS engine calls around and during each full sync
//! and after each read ([docs/sync.md](../docs/sync.md#where-the-bytes-go)). The global
//! allocator is glibc's, with its blocks of 2 MiB or more on transparent huge pages.
#![allow(
    unsafe_code,
    reason = "mallopt, malloc_trim and madvise are libc calls; a global allocator is unsafe"
)]

use std::alloc::{GlobalAlloc, Layout, System};

/// The glibc tunables the image runs the daemon with (`ENV` in the Containerfile), and the
/// benchmarks theirs: glibc's heaps on transparent huge pages where THP is `madvise`, as they
/// are where it is `always`. A change touches a dozen small blocks (a Service's entry, its
/// ports, its slice, the mirror's real servers), each on its own 4 KiB page at scale, a TLB
/// miss each. On 2 MiB pages one change at 100,000 Services costs 5–8 % less CPU time (at
/// 10,000 up to 5 %, within the noise), for 2 MiB more peak RSS at 10,000 (docs/sync.md). Only
/// the environment sets them, before the process starts; the calls here cannot.
pub const GLIBC_TUNABLES: &str = "glibc.malloc.hugetlb=1";

/// glibc's allocator, with the blocks of [`HUGE`] or more advised onto transparent huge pages.
#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

/// From this size a block may hold a whole 2 MiB page: the big tables of the model, the
/// mirror and the plan, which a change touches at random, a TLB miss per page on 4 KiB pages.
const HUGE: usize = 2 << 20;

/// `System`, and `madvise(MADV_HUGEPAGE)` on each block of [`HUGE`] or more. Such a block is
/// its own mapping (over the mmap threshold that [`tune`] sets; untuned, glibc could carve it
/// from its heap, and the advice would take in its neighbours' pages), so the advice reaches
/// no other block and ends with it; only the 2 MiB pages wholly inside it can be huge, and only
/// those touched are resident, so the room a vector has not used yet stays unmapped (but for
/// the partly used page). Where transparent huge pages are `never`, the advice is ignored.
#[derive(Debug)]
struct Allocator;

/// Advises the pages of the block at `ptr` onto huge pages: all of its mapping, from the
/// page of its header to the end of what it may use, so that it stays one mapping, which
/// glibc's `realloc` grows with `mremap` (a range over two mappings would make it copy, the
/// old and the new block resident at once).
fn advise(ptr: *mut u8, size: usize) {
    if ptr.is_null() || size < HUGE {
        return;
    }
    // SAFETY: `ptr` is a live block of glibc's malloc, just handed out.
    let usable = unsafe { libc::malloc_usable_size(ptr.cast()) };
    let start = ptr as usize & !4095;
    let end = ptr as usize + usable;
    // SAFETY: the range lies in the pages of that block, which are mapped; the advice changes
    // how they are backed, never their contents. A failure (THP compiled out) leaves them as
    // they were.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
    }
}

// SAFETY: every call is System's, whose contract the caller keeps; the advice changes no
// byte and no block's bounds.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller keeps GlobalAlloc's contract, passed on as it is.
        let ptr = unsafe { System.alloc(layout) };
        advise(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        advise(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as in `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let ptr = unsafe { System.realloc(ptr, layout, new_size) };
        advise(ptr, new_size);
        ptr
    }
}

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

#[cfg(test)]
mod tests {
    /// The image runs the daemon with the tunables the benchmarks measure.
    #[test]
    fn the_image_sets_the_tunables_the_benchmarks_measure() {
        let containerfile = include_str!("../Containerfile");
        let line = format!("ENV GLIBC_TUNABLES={}", super::GLIBC_TUNABLES);
        assert!(
            containerfile.lines().any(|l| l == line),
            "the Containerfile has no line {line:?}"
        );
    }
}
