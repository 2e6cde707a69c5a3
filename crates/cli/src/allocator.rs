//! The process's memory allocator.
//!
//! A training step allocates and frees the same few hundred tensor buffers, many of them
//! megabytes, on every pass. The system allocator hands large blocks back to the kernel when
//! they are freed, so every step faults its working set in again page by page and the kernel
//! zeroes it: on the real 0.5B model that was about 4 million page faults per SFT benchmark
//! run. mimalloc with purging turned off keeps freed memory mapped for the next step and
//! backs large regions with transparent huge pages; the faults drop to about 23 thousand and
//! the SFT step by about a quarter (README, "Speed against PyTorch").
//!
//! The price is that the process keeps its peak footprint until it exits: a server that has
//! run a job holds that job's memory for the next one. `MIMALLOC_PURGE_DELAY` (milliseconds;
//! mimalloc's default is 10) gives memory back again when set.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's option enum (the same index in its v2 and v3);
/// libmimalloc-sys does not name it.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Turns off purging of freed memory unless the user chose a delay.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: an option store, made before any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn purge_delay_is_the_option_we_set() {
        super::keep_freed_memory();
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reading an option.
            let delay = unsafe { libmimalloc_sys::mi_option_get(super::PURGE_DELAY) };
            assert_eq!(delay, -1);
        }
    }
}
