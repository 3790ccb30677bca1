//! Fixed-capacity FIFO of send timestamps, one per echo connection.
//! Replies come back in order on a connection, so the oldest timestamp is
//! always the one a reply answers. Allocated once; never grows.

pub struct LatRing {
    buf: Box<[u64]>,
    head: u32,
    len: u32,
}

impl LatRing {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0 && capacity <= u32::MAX as usize);
        LatRing {
            buf: vec![0; capacity].into_boxed_slice(),
            head: 0,
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_full(&self) -> bool {
        self.len() == self.capacity()
    }

    /// Record a send instant; false (and nothing recorded) when full.
    pub fn push(&mut self, ts: u64) -> bool {
        if self.is_full() {
            return false;
        }
        let cap = self.buf.len();
        let idx = (self.head as usize + self.len as usize) % cap;
        self.buf[idx] = ts;
        self.len += 1;
        true
    }

    /// Oldest outstanding send instant.
    pub fn pop(&mut self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let v = self.buf[self.head as usize];
        self.head = ((self.head as usize + 1) % self.buf.len()) as u32;
        self.len -= 1;
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::LatRing;

    #[test]
    fn fifo_order_and_wraparound() {
        let mut r = LatRing::new(3);
        assert_eq!(r.pop(), None);
        assert!(r.push(1) && r.push(2) && r.push(3));
        assert!(r.is_full());
        assert!(!r.push(4), "full ring rejects");
        assert_eq!(r.pop(), Some(1));
        assert!(r.push(4));
        assert_eq!(r.pop(), Some(2));
        assert_eq!(r.pop(), Some(3));
        assert!(r.push(5) && r.push(6));
        assert_eq!(r.len(), 3);
        assert_eq!(r.pop(), Some(4));
        assert_eq!(r.pop(), Some(5));
        assert_eq!(r.pop(), Some(6));
        assert_eq!(r.pop(), None);
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn capacity_one_matches_model() {
        let mut r = LatRing::new(1);
        let mut model = std::collections::VecDeque::new();
        for i in 0..100u64 {
            if i % 3 == 2 {
                assert_eq!(r.pop(), model.pop_front());
            } else {
                let ok = r.push(i);
                if ok {
                    model.push_back(i);
                }
                assert_eq!(ok, model.len() <= 1 && model.back() == Some(&i));
            }
        }
    }

    #[test]
    fn random_ops_match_vecdeque() {
        let mut r = LatRing::new(7);
        let mut model = std::collections::VecDeque::new();
        let mut x = 0x1234_5678_9abc_def0u64;
        for i in 0..10_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(2) {
                let pushed = r.push(i);
                assert_eq!(pushed, model.len() < 7);
                if pushed {
                    model.push_back(i);
                }
            } else {
                assert_eq!(r.pop(), model.pop_front());
            }
            assert_eq!(r.len(), model.len());
        }
    }
}
