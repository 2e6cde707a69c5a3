//! The process's memory allocator.
//!
//! A training step allocates and frees the same few hundred tensor buffers, many of them
//! megabytes, on every pass. The system allocator hands large blocks back to the kernel when
//! they are freed, so every step faulted its working set in again page by page and the kernel
//! zeroed it: about 4 million page faults in a three-step SFT benchmark of the real 0.5B
//! model. mimalloc with purging turned off keeps freed memory mapped for the next step; the
//! faults drop to about 23 thousand and the SFT step by about 30% (README, "Speed
//! against PyTorch").
//!
//! Transparent huge pages are turned off: they doubled the 0.5B model's load time (5.4 s →
//! 12.5 s, the kernel clearing and compacting 2 MiB pages) and added 180 MiB of peak memory
//! without a step-time gain we could measure.
//!
//! The price is that the process keeps its peak footprint until it exits: a server that has
//! run a job holds that job's memory for the next one. mimalloc's own variables override both
//! choices: `MIMALLOC_PURGE_DELAY` (milliseconds; mimalloc's default is 10) gives memory back,
//! `MIMALLOC_ALLOW_THP=1` allows huge pages.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Indices in mimalloc v3's option enum (libmimalloc-sys builds v3 and names neither).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Purging off and huge pages off, unless the user chose otherwise.
pub fn keep_freed_memory() {
    for (option, variable, value) in [
        (PURGE_DELAY, "MIMALLOC_PURGE_DELAY", -1),
        (ALLOW_THP, "MIMALLOC_ALLOW_THP", 0),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: an option store, made before any other thread exists.
            unsafe { libmimalloc_sys::mi_option_set(option, value) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ALLOW_THP, PURGE_DELAY};

    fn option(index: libmimalloc_sys::mi_option_t) -> std::ffi::c_long {
        // SAFETY: reading an option.
        unsafe { libmimalloc_sys::mi_option_get(index) }
    }

    /// The indices name the options we mean, and a user's choice wins: a child process
    /// started with mimalloc's own variables still reads their values at our indices after
    /// `keep_freed_memory`.
    #[test]
    fn the_indices_are_purge_delay_and_allow_thp_and_the_users_values_win() {
        if std::env::var_os("SAFEPROBE_ALLOCATOR_CHILD").is_some() {
            super::keep_freed_memory();
            assert_eq!((option(PURGE_DELAY), option(ALLOW_THP)), (1234, 7));
            return;
        }
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "allocator::tests::the_indices_are_purge_delay_and_allow_thp_and_the_users_values_win",
            ])
            .env("SAFEPROBE_ALLOCATOR_CHILD", "1")
            .env("MIMALLOC_PURGE_DELAY", "1234")
            .env("MIMALLOC_ALLOW_THP", "7")
            .output()
            .unwrap();
        assert!(
            child.status.success(),
            "{}",
            String::from_utf8_lossy(&child.stdout)
        );
    }

    #[test]
    fn without_the_users_variables_ours_are_set() {
        super::keep_freed_memory();
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(option(PURGE_DELAY), -1);
        }
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
            assert_eq!(option(ALLOW_THP), 0);
        }
    }
}
