//! [`ReadingArena`]: the numeric readings a batch keeps, without a `String` per reading.
//!
//! The decoder lends a reading's stream name only for the duration of its callback (a SenML name
//! is base name + name, joined in a scratch buffer), so whoever keeps the reading until its batch
//! is committed must copy the name. Rather than an owned [`edgewise_protocol::Reading`] (two
//! allocations: stream and unit), the arena appends stream and unit to one `String` and keeps a
//! small `Copy` entry with their byte ranges. Both buffers are cleared per batch and keep their
//! capacity, so once they have grown to the size of a batch, keeping a reading allocates nothing.
//! Readings come back out as [`ReadingView`]s borrowing the arena.
//!
//! Pure; tested by the unit tests below.

use edgewise_protocol::ReadingView;

/// The readings of one batch, in the order they were pushed.
#[derive(Debug, Default)]
pub struct ReadingArena {
    /// The stream and unit of every reading, back to back.
    text: String,
    entries: Vec<Entry>,
}

/// One reading, with its stream and unit as byte ranges of [`ReadingArena::text`].
#[derive(Debug, Clone, Copy)]
struct Entry {
    stream: Span,
    time_ms: i64,
    value: f64,
    unit: Option<Span>,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

impl ReadingArena {
    /// Copies `r`'s stream and unit into the arena and appends the reading.
    pub fn push(&mut self, r: ReadingView<'_>) {
        let stream = self.append(r.stream);
        let unit = r.unit.map(|u| self.append(u));
        self.entries.push(Entry {
            stream,
            time_ms: r.time_ms,
            value: r.value,
            unit,
        });
    }

    fn append(&mut self, s: &str) -> Span {
        let start = self.text.len();
        self.text.push_str(s);
        Span {
            start,
            end: self.text.len(),
        }
    }

    /// Keeps the first `len` readings (forgetting their successors' text too).
    pub fn truncate(&mut self, len: usize) {
        if let Some(first_gone) = self.entries.get(len) {
            self.text.truncate(first_gone.stream.start);
            self.entries.truncate(len);
        }
    }

    /// Forgets every reading; the buffers keep their capacity for the next batch.
    pub fn clear(&mut self) {
        self.text.clear();
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The readings, in the order they were pushed.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = ReadingView<'_>> {
        self.entries.iter().map(|e| ReadingView {
            stream: &self.text[e.stream.start..e.stream.end],
            time_ms: e.time_ms,
            value: e.value,
            unit: e.unit.map(|u| &self.text[u.start..u.end]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgewise_protocol::Reading;

    fn reading(stream: &str, time_ms: i64, unit: Option<&str>) -> Reading {
        Reading {
            stream: stream.into(),
            time_ms,
            value: time_ms as f64 / 2.0,
            unit: unit.map(Into::into),
        }
    }

    fn contents(arena: &ReadingArena) -> Vec<Reading> {
        arena
            .iter()
            .map(|r| Reading {
                stream: r.stream.into(),
                time_ms: r.time_ms,
                value: r.value,
                unit: r.unit.map(Into::into),
            })
            .collect()
    }

    #[test]
    fn readings_come_back_as_pushed_and_truncate_forgets_the_later_ones() {
        let rs = [
            reading("n1/temperature", 1, Some("Cel")),
            reading("n2/humidity", 2, None),
            reading("n1/temperature", 3, Some("")),
            reading("ünïcode/x", 4, Some("%RH")),
        ];
        let mut arena = ReadingArena::default();
        for r in &rs {
            arena.push(r.as_view());
        }
        assert_eq!(arena.len(), 4);
        assert_eq!(contents(&arena), rs);
        arena.truncate(2);
        assert_eq!(contents(&arena), rs[..2]);
        // Text of the forgotten readings is gone too: what is pushed next reads back intact.
        arena.push(rs[3].as_view());
        assert_eq!(
            contents(&arena),
            [rs[0].clone(), rs[1].clone(), rs[3].clone()]
        );
        arena.truncate(5);
        assert_eq!(arena.len(), 3);
        arena.clear();
        assert!(arena.is_empty());
        arena.push(rs[1].as_view());
        assert_eq!(contents(&arena), rs[1..2]);
    }

    #[test]
    fn a_cleared_arena_reuses_its_buffers() {
        let mut arena = ReadingArena::default();
        let fill = |arena: &mut ReadingArena| {
            for i in 0..100 {
                arena.push(reading(&format!("node-{i}/temperature"), i, Some("Cel")).as_view());
            }
        };
        fill(&mut arena);
        let (text, entries) = (arena.text.as_ptr(), arena.entries.as_ptr());
        arena.clear();
        fill(&mut arena);
        assert_eq!(
            (arena.text.as_ptr(), arena.entries.as_ptr()),
            (text, entries)
        );
    }
}
