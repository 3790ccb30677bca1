//! A connection's outbound bytes, in one pointer.
//!
//! Most connections are idle, and an idle connection holds no output buffer (it is given back
//! once flushed). A `Vec` still costs its three words in every connection's slab slot; this
//! costs one: 16 bytes less per connection. Reading (`len`, the bytes) needs no buffer;
//! writing makes one (`buf`), and the shard lends its spare one to the socket it polls so the
//! per-message path allocates neither.

use std::ops::Deref;

#[derive(Debug, Default)]
// The box is the point: one pointer in the slot, the `Vec`'s words only while it exists.
#[allow(clippy::box_collection)]
pub struct OutBuf(Option<Box<Vec<u8>>>);

impl OutBuf {
    /// Room for `capacity` bytes, allocated now (the shard's spare buffer).
    pub fn with_capacity(capacity: usize) -> Self {
        OutBuf(Some(Box::new(Vec::with_capacity(capacity))))
    }

    /// The buffer to write into, made if there is none.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        self.0.get_or_insert_with(Default::default)
    }

    pub fn capacity(&self) -> usize {
        self.0.as_ref().map_or(0, |v| v.capacity())
    }

    /// The first `n` bytes went out.
    pub fn consume(&mut self, n: usize) {
        if let Some(v) = self.0.as_mut() {
            v.drain(..n);
        }
    }

    /// Forget the bytes, keep the buffer.
    pub fn clear(&mut self) {
        if let Some(v) = self.0.as_mut() {
            v.clear();
        }
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.0.map_or_else(Vec::new, |v| *v)
    }
}

impl From<Vec<u8>> for OutBuf {
    fn from(bytes: Vec<u8>) -> Self {
        OutBuf(Some(Box::new(bytes)))
    }
}

impl Deref for OutBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_no_buffer_until_written_and_reads_like_the_bytes_it_holds() {
        assert_eq!(std::mem::size_of::<OutBuf>(), 8);
        let mut out = OutBuf::default();
        assert!(out.is_empty() && out.capacity() == 0 && out.0.is_none());
        out.consume(0);
        out.clear();
        assert!(out.0.is_none(), "reading and clearing make no buffer");
        out.buf().extend_from_slice(b"hello world");
        assert_eq!(&out[..], b"hello world");
        out.consume(6);
        assert_eq!(&out[..], b"world");
        let capacity = out.capacity();
        out.clear();
        assert!(
            out.is_empty() && out.capacity() == capacity,
            "the buffer stays"
        );
        assert_eq!(OutBuf::from(b"ab".to_vec()).into_vec(), b"ab");
        assert_eq!(OutBuf::default().into_vec(), Vec::<u8>::new());
        assert!(OutBuf::with_capacity(64).capacity() >= 64);
    }
}
