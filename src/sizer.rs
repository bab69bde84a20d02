//! How many items one blocking call takes: fixed by `.batch(k)`, or sized
//! from the measured time per item.

use crate::batch::Results;

/// The batch size of the next call.
#[derive(Debug)]
pub(crate) struct Sizer {
    fixed: Option<usize>,
}

impl Sizer {
    pub(crate) fn new(fixed: Option<usize>) -> Self {
        Sizer { fixed }
    }

    /// The most items a call may take.
    pub(crate) fn most(&self) -> usize {
        self.fixed.unwrap_or(1)
    }

    /// The size of the next call.
    pub(crate) fn next_size(&self) -> usize {
        self.most()
    }

    /// A call ended with these results.
    pub(crate) fn observe<U>(&mut self, _results: &Results<U>) {}
}
