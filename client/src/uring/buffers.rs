//! Request buffers: one per tag, in one anonymous mapping made at start-up,
//! followed by the queue's head slots.

use std::io;
use std::ptr::NonNull;

use crate::engine::Tag;

/// One buffer per tag, in one anonymous mapping allocated at start-up.
/// After the tag buffers, the same mapping holds [`HEAD_SLOTS`] head slots
/// per connection (for up to [`HEAD_CONNS`] connections): a vectored
/// zero-copy send from the registered mapping takes its frame heads from
/// there (see `send`), since every byte of such a send must lie in one
/// registered buffer. The head slots belong to the queue thread alone.
///
/// Ownership protocol: a tag's buffer belongs either to the frontend (no IO
/// in flight: it fills or drains it) or to the queue thread and the kernel
/// (from submission until the engine completes the request). The tag itself
/// is the token passed between them.
pub struct TagBuffers {
    base: NonNull<u8>,
    /// The whole mapping: tag buffers, then head slots.
    len: usize,
    tag_size: usize,
    depth: u16,
}

// SAFETY: the mapping is plain memory that lives as long as the value; who
// may touch which tag's bytes is governed by the ownership protocol above,
// which hands a tag to one thread at a time through channels (which order
// the memory accesses).
unsafe impl Send for TagBuffers {}
// SAFETY: as for Send: shared references only give out raw pointers, and
// the unsafe accessors require the caller to own the tag.
unsafe impl Sync for TagBuffers {}

/// Bytes of one head slot: the heads of a whole send chain (at most
/// `MAX_CHAIN` frames of a few dozen bytes each) fit with room to spare; a
/// chain whose heads do not is sent without one.
pub(super) const HEAD_SLOT: usize = 4096;
/// Head slots per connection: a slot is held until its send's zero-copy
/// notification, so this many vectored sends may await theirs at once.
pub(super) const HEAD_SLOTS: usize = 4;
/// Connections of a queue that have head slots (later ones send without).
pub(super) const HEAD_CONNS: usize = 64;
const HEAD_AREA: usize = HEAD_SLOT * HEAD_SLOTS * HEAD_CONNS;

impl TagBuffers {
    /// `depth` buffers of `tag_size` bytes each (and the head slots).
    pub fn new(depth: u16, tag_size: u32) -> io::Result<TagBuffers> {
        let tag_size = tag_size as usize;
        let len = usize::from(depth)
            .checked_mul(tag_size)
            .filter(|len| *len > 0)
            .and_then(|len| len.checked_add(HEAD_AREA))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad buffer geometry"))?;
        // SAFETY: an anonymous private mapping with no address hint touches no
        // existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "mmap returned null"))?;
        Ok(TagBuffers {
            base,
            len,
            tag_size,
            depth,
        })
    }

    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// Asks the kernel not to back the buffers with huge pages. Where only
    /// a few pages of each tag are ever touched (kernel buffer mode stages
    /// small payloads here), a huge page would make 2 MiB resident for each
    /// 4 KiB: 64 MiB per queue at the default depth, enough to drive a
    /// 2 GiB guest with 16 devices out of memory.
    pub(super) fn small_pages(&self) {
        // SAFETY: advice on exactly our own mapping; it changes no contents.
        let rc =
            unsafe { libc::madvise(self.base.as_ptr().cast(), self.len, libc::MADV_NOHUGEPAGE) };
        if rc != 0 {
            tracing::debug!("madvise(MADV_NOHUGEPAGE): {}", io::Error::last_os_error());
        }
    }

    /// Start of `tag`'s buffer.
    pub fn tag_ptr(&self, tag: Tag) -> *mut u8 {
        assert!(tag < self.depth, "tag {tag} beyond depth {}", self.depth);
        // SAFETY: tag < depth, so the offset stays inside the mapping.
        unsafe { self.base.as_ptr().add(usize::from(tag) * self.tag_size) }
    }

    /// Start of `len` bytes at `offset` in `tag`'s buffer.
    ///
    /// # Panics
    /// If the range is not inside the buffer.
    pub fn slice_ptr(&self, tag: Tag, offset: u32, len: u32) -> *mut u8 {
        let end = offset as usize + len as usize;
        assert!(end <= self.tag_size, "{offset}+{len} beyond the tag buffer");
        // SAFETY: offset <= end <= tag_size: inside this tag's buffer.
        unsafe { self.tag_ptr(tag).add(offset as usize) }
    }

    /// The CRC-32C of `len` bytes at `offset` in `tag`'s buffer (a write's
    /// payload, for data digests).
    ///
    /// # Panics
    /// If the range is not inside the buffer.
    pub fn crc32c(&self, tag: Tag, offset: u32, len: u32) -> u32 {
        let at = self.slice_ptr(tag, offset, len);
        // SAFETY: the range is inside the mapping (slice_ptr checked it) and
        // is only read here; the bytes of a write's payload are not written
        // while the request is in flight (kernel sends only read them).
        let bytes = unsafe { std::slice::from_raw_parts(at.cast_const(), len as usize) };
        crc32c::crc32c(bytes)
    }

    /// The whole of `tag`'s buffer.
    ///
    /// # Safety
    /// The caller owns `tag` (see the type's docs): no IO on it is in flight
    /// and no other reference to its bytes exists while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn tag_slice(&self, tag: Tag) -> &mut [u8] {
        // SAFETY: the pointer and length stay inside the mapping; exclusive
        // access is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.tag_ptr(tag), self.tag_size) }
    }

    /// Head slot `slot` of connection `conn`, if it has one.
    pub(super) fn head_slot(&self, conn: usize, slot: usize) -> Option<*mut u8> {
        if conn >= HEAD_CONNS || slot >= HEAD_SLOTS {
            return None;
        }
        let at = self.len - HEAD_AREA + (conn * HEAD_SLOTS + slot) * HEAD_SLOT;
        // SAFETY: conn and slot are in range, so the slot lies inside the
        // head area at the end of the mapping.
        Some(unsafe { self.base.as_ptr().add(at) })
    }

    /// The whole mapping, tag buffers and head slots, as one iovec: what a
    /// vectored zero-copy send registers.
    pub(super) fn whole(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.base.as_ptr().cast(),
            iov_len: self.len,
        }
    }

    pub(super) fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.depth)
            .map(|tag| libc::iovec {
                iov_base: self.tag_ptr(tag).cast(),
                iov_len: self.tag_size,
            })
            .collect()
    }
}

impl Drop for TagBuffers {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly what mmap returned; nothing refers to
        // the mapping any more (the rings that registered it are gone first).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_slots_follow_the_tag_buffers_and_do_not_overlap() {
        let buffers = TagBuffers::new(4, 8192).expect("buffers");
        let tags_end = buffers.tag_ptr(3) as usize + 8192;
        let whole = buffers.whole();
        let end = whole.iov_base as usize + whole.iov_len;
        let mut slots = Vec::new();
        for conn in 0..HEAD_CONNS {
            for slot in 0..HEAD_SLOTS {
                let at = buffers.head_slot(conn, slot).expect("slot") as usize;
                assert!(
                    at >= tags_end && at + HEAD_SLOT <= end,
                    "inside the head area"
                );
                slots.push(at);
            }
        }
        slots.sort_unstable();
        assert!(slots.windows(2).all(|w| w[1] - w[0] >= HEAD_SLOT));
        assert_eq!(buffers.head_slot(HEAD_CONNS, 0), None);
        assert_eq!(buffers.head_slot(0, HEAD_SLOTS), None);
    }
}
