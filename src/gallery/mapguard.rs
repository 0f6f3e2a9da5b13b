//! A mapped segment whose file is truncated under the process must be an error for
//! that gallery, not a SIGBUS that kills the server.
//!
//! Every segment mapping is registered here. The first registration installs a SIGBUS
//! handler. When a read faults inside a registered mapping (its page lies past the
//! file's new end), the handler marks the mapping faulted, counts the fault, maps one
//! page of zeros over the faulting page and returns, so the read completes with zeros.
//! Whoever read the mapping then checks [`faults`] and the mapping's flag (the engine
//! does after every search; the GPU upload and `check` verify checksums, which zeros
//! fail) and turns the result into an error naming the file; nothing computed from the
//! zeros is served. A fault outside every registered mapping goes to the handler that
//! was installed before (Rust's own, or the default action), as if we were not here.
//!
//! The flag is set before the zero page is mapped, so any thread that read a zero page
//! sees the flag when it checks afterwards. Linux only; elsewhere mappings are not
//! guarded and a truncated file still raises SIGBUS.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

const SLOTS: usize = 8192;

struct Slot {
    taken: AtomicBool,
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    taken: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static FAULTS: AtomicU64 = AtomicU64::new(0);

/// A registered mapping; unregisters itself when dropped (before the mapping goes).
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
}

impl Guard {
    /// Whether a read of this mapping faulted (its file was truncated under us).
    pub fn faulted(&self) -> bool {
        self.slot.is_some_and(|i| TABLE[i].faulted.load(Ordering::SeqCst))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let s = &TABLE[i];
            s.start.store(0, Ordering::SeqCst);
            s.len.store(0, Ordering::SeqCst);
            s.faulted.store(false, Ordering::SeqCst);
            s.taken.store(false, Ordering::SeqCst);
        }
    }
}

/// Faults caught so far in this process (a cheap check after a search: nonzero only
/// after some file was truncated under us).
pub fn faults() -> u64 {
    FAULTS.load(Ordering::SeqCst)
}

/// Guard the mapping `[start, start + len)`.
pub fn register(start: *const u8, len: usize) -> Guard {
    if len == 0 || !handler::install() {
        return Guard { slot: None };
    }
    for (i, s) in TABLE.iter().enumerate() {
        if s.taken
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            s.faulted.store(false, Ordering::SeqCst);
            s.len.store(len, Ordering::SeqCst);
            s.start.store(start as usize, Ordering::SeqCst);
            return Guard { slot: Some(i) };
        }
    }
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            mappings = SLOTS,
            "more mapped segments than the SIGBUS guard holds; the rest are unguarded"
        )
    });
    Guard { slot: None }
}

#[cfg(target_os = "linux")]
mod handler {
    use super::{FAULTS, Ordering, TABLE};
    use std::sync::OnceLock;
    use std::sync::atomic::AtomicUsize;

    static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
    static PAGE: AtomicUsize = AtomicUsize::new(4096);

    /// Install the handler once; false if the system refused.
    pub fn install() -> bool {
        static INSTALLED: OnceLock<bool> = OnceLock::new();
        *INSTALLED.get_or_init(|| {
            // SAFETY: plain libc calls with zero-initialised structs, done once.
            unsafe {
                let page = libc::sysconf(libc::_SC_PAGESIZE);
                if page > 0 {
                    PAGE.store(page as usize, Ordering::SeqCst);
                }
                let mut old: libc::sigaction = std::mem::zeroed();
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_sigbus as *const () as usize;
                new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut new.sa_mask);
                if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                    return false;
                }
                let _ = PREVIOUS.set(old);
                libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) == 0
            }
        })
    }

    /// Only async-signal-safe work here: atomics and one mmap(2).
    extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
        let addr = unsafe { (*info).si_addr() } as usize;
        let page = PAGE.load(Ordering::SeqCst);
        for s in TABLE.iter() {
            let (start, len) = (s.start.load(Ordering::SeqCst), s.len.load(Ordering::SeqCst));
            if start != 0 && addr >= start && addr < start + len {
                s.faulted.store(true, Ordering::SeqCst);
                FAULTS.fetch_add(1, Ordering::SeqCst);
                let at = addr & !(page - 1);
                // SAFETY: replaces one page inside a mapping this process owns (the
                // segment's read-only map) with anonymous zeros; the segment is never
                // read for an answer again (its fault flag is set).
                let p = unsafe {
                    libc::mmap(
                        at as *mut libc::c_void,
                        page,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if p != libc::MAP_FAILED {
                    return;
                }
                break;
            }
        }
        // Not ours (or we could not patch it): behave as if this handler did not exist.
        // SAFETY: calling the handler that was installed before, as the kernel would.
        unsafe {
            match PREVIOUS.get() {
                Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
                    if old.sa_flags & libc::SA_SIGINFO != 0 {
                        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                            std::mem::transmute(old.sa_sigaction);
                        f(sig, info, ctx);
                    } else {
                        let f: extern "C" fn(libc::c_int) = std::mem::transmute(old.sa_sigaction);
                        f(sig);
                    }
                }
                _ => {
                    // Restore the default action; returning re-runs the access, which
                    // now terminates the process as SIGBUS always did.
                    let mut dfl: libc::sigaction = std::mem::zeroed();
                    dfl.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod handler {
    pub fn install() -> bool {
        false
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_read_past_a_truncated_file_reads_zeros_and_is_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 * 4096]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: test file, truncated on purpose below.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let guard = register(map.as_ptr(), map.len());
        assert!(!guard.faulted());
        assert_eq!(map[2 * 4096 + 5], 7);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let before = faults();
        // The first page is still in the file; the third is past its end.
        assert_eq!(std::hint::black_box(&map[..])[10], 7);
        assert_eq!(std::hint::black_box(&map[..])[2 * 4096 + 5], 0);
        assert!(guard.faulted());
        assert!(faults() > before);
        drop(guard);
    }
}
