//! Pages that hold long-lived key material, kept out of core dumps and swap.
//!
//! Owns: `KeyPage<T>`, a box of its own page-aligned pages, marked
//! `MADV_DONTDUMP` (never written to a core, whoever takes it) and `mlock`ed
//! where the limit allows (never swapped). The keyring's KEKs and derived
//! keys and the receipt key live in them; a subject's data key, alive for one
//! request, does not (two system calls per request would be its price), and
//! relies on zeroize-on-drop and the zeroizing global allocator instead.
//!
//! Neither call is critical to correctness: where the kernel refuses (an
//! `RLIMIT_MEMLOCK` of zero, a platform without `MADV_DONTDUMP`), the value is
//! still wiped on drop, and `protection()` says what holds.
//!
//! This is the one module with `unsafe` code: allocating, advising and freeing
//! raw pages is outside what safe Rust can say. Each block says why it holds.

#![allow(unsafe_code)]

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

const PAGE: usize = 4096;

static PAGES: AtomicUsize = AtomicUsize::new(0);
static NOT_DUMP_EXCLUDED: AtomicUsize = AtomicUsize::new(0);
static NOT_LOCKED: AtomicUsize = AtomicUsize::new(0);

/// What the key pages of this process have, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protection {
    /// Key pages alive now.
    pub pages: usize,
    /// Pages the kernel refused to exclude from core dumps (ever).
    pub not_dump_excluded: usize,
    /// Pages the kernel refused to lock in memory (ever).
    pub not_locked: usize,
}

pub fn protection() -> Protection {
    Protection {
        pages: PAGES.load(Ordering::Relaxed),
        not_dump_excluded: NOT_DUMP_EXCLUDED.load(Ordering::Relaxed),
        not_locked: NOT_LOCKED.load(Ordering::Relaxed),
    }
}

/// A `T` alone on its own pages, excluded from core dumps and locked in RAM.
/// Dropping it drops `T` (whose own `Drop` wipes it), then unlocks and frees
/// the pages (which the zeroizing allocator wipes once more).
pub struct KeyPage<T> {
    ptr: NonNull<T>,
    layout: Layout,
}

// SAFETY: a KeyPage owns its T exclusively, like a Box<T>; it is Send/Sync
// exactly when T is.
unsafe impl<T: Send> Send for KeyPage<T> {}
unsafe impl<T: Sync> Sync for KeyPage<T> {}

impl<T> KeyPage<T> {
    pub fn new(value: T) -> Self {
        let size = std::mem::size_of::<T>().max(1).div_ceil(PAGE) * PAGE;
        let align = std::mem::align_of::<T>().max(PAGE);
        let layout = Layout::from_size_align(size, align).expect("page layout");
        // SAFETY: `layout` has a non-zero size. The result is checked for null.
        let raw = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<T>()) else {
            handle_alloc_error(layout)
        };
        // SAFETY: `ptr` is freshly allocated, aligned for T and large enough.
        unsafe { ptr.as_ptr().write(value) };
        // SAFETY: [raw, raw + size) is exactly the allocation made above,
        // page-aligned and a whole number of pages, so advising and locking it
        // touches no memory but ours.
        unsafe {
            if rustix::mm::madvise(raw.cast(), size, rustix::mm::Advice::LinuxDontDump).is_err() {
                NOT_DUMP_EXCLUDED.fetch_add(1, Ordering::Relaxed);
            }
            if rustix::mm::mlock(raw.cast(), size).is_err() {
                NOT_LOCKED.fetch_add(1, Ordering::Relaxed);
            }
        }
        PAGES.fetch_add(1, Ordering::Relaxed);
        KeyPage { ptr, layout }
    }
}

impl<T> Deref for KeyPage<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `ptr` holds an initialised T for the KeyPage's whole life.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for KeyPage<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for KeyPage<T> {
    fn drop(&mut self) {
        let raw = self.ptr.as_ptr().cast::<u8>();
        // SAFETY: the T was written in `new` and is dropped once, here; the
        // pages are then the allocation of `new`, with its layout. Unlocking
        // a range that was never locked is harmless (its error is ignored).
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            let _ = rustix::mm::munlock(raw.cast(), self.layout.size());
            // Back to normal dumping before the allocator reuses the pages.
            let _ = rustix::mm::madvise(raw.cast(), self.layout.size(), rustix::mm::Advice::LinuxDoDump);
            dealloc(raw, self.layout);
        }
        PAGES.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_page_is_page_aligned_holds_its_value_and_is_excluded_from_dumps() {
        let k = KeyPage::new([7u8; 32]);
        assert_eq!(k.as_ptr() as usize % PAGE, 0);
        assert_eq!(*k, [7u8; 32]);
        // Other tests make and drop key pages meanwhile, so the process-wide
        // counters prove nothing here: the kernel's flags of this page do.
        // MADV_DONTDUMP is available on every Linux since 3.4.
        let flags = vm_flags_at(k.as_ptr() as usize).expect("the page is mapped");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "VmFlags:{flags}");
        assert!(protection().pages >= 1);
        drop(k);
    }

    /// The `VmFlags` of the mapping that holds `addr` (`/proc/self/smaps`).
    fn vm_flags_at(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_once(' ').and_then(|(r, _)| r.split_once('-'));
            if let Some((a, b)) = range {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                    inside = a <= addr && addr < b;
                    continue;
                }
            }
            if let Some(f) = line.strip_prefix("VmFlags:").filter(|_| inside) {
                return Some(f.to_owned());
            }
        }
        None
    }

    #[test]
    fn a_key_page_drops_its_value() {
        struct Flag<'a>(&'a std::cell::Cell<bool>);
        impl Drop for Flag<'_> {
            fn drop(&mut self) {
                self.0.set(true);
            }
        }
        let dropped = std::cell::Cell::new(false);
        drop(KeyPage::new(Flag(&dropped)));
        assert!(dropped.get());
    }
}
