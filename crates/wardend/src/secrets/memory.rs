//! Locked, non-dumpable, zeroize-on-drop memory for keys and secret values.
//!
//! Why a pool instead of `mlock` on each heap allocation: `mlock` and `madvise` work on whole
//! pages and are not reference-counted, so unlocking one small buffer would unlock its
//! neighbours on the same page, and marking scattered heap pages splits the process's memory
//! map into thousands of areas (the kernel caps them at `vm.max_map_count`). Instead, buffers
//! come from a few dedicated anonymous mappings that are locked (`mlock`), excluded from core
//! dumps (`MADV_DONTDUMP`) and wiped in forked children (`MADV_WIPEONFORK`) once, when mapped.
//! Small buffers share slabs of one size class; a buffer larger than the biggest class gets a
//! mapping of its own. Freed slots are zeroized and reused; slabs are never returned to the
//! kernel (the pool stays at its high-water mark, which is the size of the unsealed store).
//!
//! If the kernel refuses to lock (no `CAP_IPC_LOCK` and `RLIMIT_MEMLOCK` too small) the memory
//! is still used, and [`all_memory_locked`] says so; the store reports it when unsealing.
//!
//! This is the only file of the secrets module with `unsafe` code.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use zeroize::Zeroize;

/// Smallest size class is `1 << MIN_SHIFT` bytes, the largest `1 << MAX_SHIFT`.
const MIN_SHIFT: u32 = 5;
const MAX_SHIFT: u32 = 14;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// Size of one slab mapping (a multiple of every page size Linux uses for anonymous memory).
const SLAB: usize = 64 * 1024;

/// Free slots per size class, as addresses (plain integers, so the pool is `Send`).
struct Pool {
    free: [Vec<usize>; CLASSES],
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: [const { Vec::new() }; CLASSES],
});
static LOCK_FAILED: AtomicBool = AtomicBool::new(false);

/// The allocation failed: the kernel refused to map memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfMemory;

/// Whether every mapping made so far could be locked into RAM.
pub fn all_memory_locked() -> bool {
    !LOCK_FAILED.load(Ordering::Relaxed)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Maps `len` bytes (a multiple of the page size) of private anonymous memory, then locks it
/// and marks it non-dumpable and wiped-on-fork. Returns the address.
fn map_locked(len: usize) -> Result<NonNull<u8>, OutOfMemory> {
    // SAFETY: an anonymous private mapping at an address the kernel chooses touches no memory
    // this program already uses; the result is checked for MAP_FAILED before use.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(OutOfMemory);
    }
    // SAFETY: [addr, addr+len) is the mapping just created, owned by this module alone.
    // madvise and mlock only change its attributes; failures are tolerated and recorded.
    unsafe {
        libc::madvise(addr, len, libc::MADV_DONTDUMP);
        libc::madvise(addr, len, libc::MADV_WIPEONFORK);
        if libc::mlock(addr, len) != 0 {
            LOCK_FAILED.store(true, Ordering::Relaxed);
        }
    }
    NonNull::new(addr.cast::<u8>()).ok_or(OutOfMemory)
}

/// Capacity and size class (or `None`: a mapping of its own) for a buffer of `len` bytes.
fn class_for(len: usize) -> (usize, Option<usize>) {
    let need = len.max(1);
    for class in 0..CLASSES {
        let size = 1usize << (MIN_SHIFT as usize + class);
        if need <= size {
            return (size, Some(class));
        }
    }
    let page = page_size();
    (need.div_ceil(page) * page, None)
}

/// A fixed-length byte buffer in locked, non-dumpable memory, zeroized when dropped.
///
/// It never prints its contents (`Debug` shows `<redacted>`), is not `Clone` (a copy is an
/// explicit [`SecretBytes::from_slice`]), and hands out borrowed slices only.
pub struct SecretBytes {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    class: Option<usize>,
}

// SAFETY: SecretBytes owns its buffer exclusively (like Box<[u8]>); moving it to another thread
// moves that ownership, and shared references only allow reads.
unsafe impl Send for SecretBytes {}
// SAFETY: &SecretBytes only gives out &[u8]; there is no interior mutability.
unsafe impl Sync for SecretBytes {}

impl SecretBytes {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Result<Self, OutOfMemory> {
        let (cap, class) = class_for(len);
        let ptr = match class {
            Some(c) => {
                let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
                if pool.free[c].is_empty() {
                    let slab = map_locked(SLAB)?;
                    let base = slab.as_ptr() as usize;
                    // Hand out the slab from its start: push in reverse so pop() is ascending.
                    pool.free[c].extend((0..SLAB / cap).rev().map(|i| base + i * cap));
                }
                let addr = pool.free[c].pop().ok_or(OutOfMemory)?;
                NonNull::new(addr as *mut u8).ok_or(OutOfMemory)?
            }
            None => map_locked(cap)?,
        };
        // Slots are zeroized when freed and fresh mappings are zero-filled by the kernel.
        Ok(SecretBytes {
            ptr,
            len,
            cap,
            class,
        })
    }

    /// A locked copy of `data`.
    pub fn from_slice(data: &[u8]) -> Result<Self, OutOfMemory> {
        let mut s = Self::zeroed(data.len())?;
        s.as_mut_slice().copy_from_slice(data);
        Ok(s)
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to `cap >= len` bytes owned by self and initialized (zeroed or
        // written), and no &mut exists while &self is borrowed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        // SAFETY: the whole capacity belongs to this buffer; zeroize uses volatile writes so the
        // wipe is not optimized away.
        let all = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) };
        all.zeroize();
        match self.class {
            Some(c) => {
                let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
                pool.free[c].push(self.ptr.as_ptr() as usize);
            }
            None => {
                // SAFETY: this mapping was created by map_locked for this buffer alone and
                // nothing refers to it after drop.
                unsafe {
                    libc::munmap(self.ptr.as_ptr().cast(), self.cap);
                }
            }
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBytes(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_of_every_size_round_trip_and_never_overlap() {
        let sizes = [0usize, 1, 31, 32, 33, 100, 4096, 16384, 16385, 200_000];
        let bufs: Vec<SecretBytes> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| SecretBytes::from_slice(&vec![i as u8 + 1; n]).unwrap())
            .collect();
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(b.len(), sizes[i]);
            assert!(b.as_slice().iter().all(|&x| x == i as u8 + 1));
        }
    }

    #[test]
    fn a_freed_slot_comes_back_zeroed() {
        let a = SecretBytes::from_slice(&[0xAA; 40]).unwrap();
        drop(a);
        let b = SecretBytes::zeroed(40).unwrap();
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }

    /// The VmFlags line of the mapping that holds `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = (a..b).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.to_owned();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn buffers_are_locked_and_left_out_of_core_dumps() {
        for n in [16, 100_000] {
            let b = SecretBytes::from_slice(&vec![1; n]).unwrap();
            let flags = vm_flags(b.as_slice().as_ptr() as usize);
            let flags: Vec<&str> = flags.split_whitespace().collect();
            assert!(
                flags.contains(&"dd"),
                "not excluded from core dumps: {flags:?}"
            );
            if all_memory_locked() {
                assert!(flags.contains(&"lo"), "not locked: {flags:?}");
            }
        }
    }

    #[test]
    fn debug_never_shows_the_bytes() {
        let a = SecretBytes::from_slice(b"hunter2").unwrap();
        let s = format!("{a:?}");
        assert!(!s.contains("hunter2") && s.contains("redacted"));
    }
}
