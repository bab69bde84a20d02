//! The items of one mapper call, or its results: one (the common case,
//! without an allocation) or several (a batch).

use crate::error::Error;

/// One value, or several in input order.
#[derive(Debug)]
pub enum Batch<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Batch<T> {
    /// One value without a vector when there is one.
    pub(crate) fn from_vec(mut values: Vec<T>) -> Self {
        match (values.len(), values.pop()) {
            (1, Some(value)) => Batch::One(value),
            (_, last) => {
                values.extend(last);
                Batch::Many(values)
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Batch::One(_) => 1,
            Batch::Many(values) => values.len(),
        }
    }

    /// `items` (the first is item `first`) as at most `pieces` calls of about
    /// the same size, handed to `each` in order with their first index. One
    /// piece goes as it is, without an allocation.
    pub(crate) fn split(self, first: usize, pieces: usize, mut each: impl FnMut(usize, Batch<T>)) {
        let mut rest = match self {
            Batch::Many(items) if pieces > 1 && items.len() > 1 => items,
            items => return each(first, items),
        };
        let size = rest.len().div_ceil(pieces.min(rest.len()));
        let mut at = first;
        while !rest.is_empty() {
            let tail = rest.split_off(size.min(rest.len()));
            let piece = std::mem::replace(&mut rest, tail);
            let len = piece.len();
            each(at, Batch::from_vec(piece));
            at += len;
        }
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, T> {
        match self {
            Batch::One(value) => std::slice::from_ref(value).iter(),
            Batch::Many(values) => values.iter(),
        }
    }

    pub(crate) fn last(&self) -> Option<&T> {
        match self {
            Batch::One(value) => Some(value),
            Batch::Many(values) => values.last(),
        }
    }
}

impl<T> IntoIterator for Batch<T> {
    type Item = T;
    type IntoIter = BatchIter<T>;

    fn into_iter(self) -> BatchIter<T> {
        match self {
            Batch::One(value) => BatchIter::One(Some(value)),
            Batch::Many(values) => BatchIter::Many(values.into_iter()),
        }
    }
}

/// The values of a [`Batch`], in order.
#[derive(Debug)]
pub enum BatchIter<T> {
    One(Option<T>),
    Many(std::vec::IntoIter<T>),
}

impl<T> Iterator for BatchIter<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match self {
            BatchIter::One(value) => value.take(),
            BatchIter::Many(values) => values.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = match self {
            BatchIter::One(value) => usize::from(value.is_some()),
            BatchIter::Many(values) => values.len(),
        };
        (left, Some(left))
    }
}

impl<T> ExactSizeIterator for BatchIter<T> {}

/// The results of one call, in input order: one per item mapped, cut short
/// after the first failure (the items after it are never mapped).
pub(crate) type Results<U> = Batch<Result<U, Error>>;
