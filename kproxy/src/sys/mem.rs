//! The C library's allocator.

/// Returns free heap memory to the system: glibc keeps what a large sync allocated and freed
/// (plans, parsed manifests) in its arenas otherwise, and it would count as the agent's RSS.
/// Does nothing with other C libraries.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
