//! The Edgewise data contract, shared by the firmware, the agent and the cloud receiver.
//!
//! # Layout
//!
//! - [`senml`]: SenML (RFC 8428) labels and an encoder that writes a CBOR record pack into a
//!   caller's fixed buffer with no allocation: this is what sensor nodes publish.
//! - [`summary`] (feature `alloc`): [`Reading`] (and [`ReadingView`], the same borrowed),
//!   [`WindowSummary`] and its deterministic [`SummaryId`], plus the validation the receiver
//!   applies to every record.
//! - [`latest`] (feature `alloc`): [`LatestValue`], the newest text, boolean or data value of a
//!   stream that has no numbers to aggregate.
//! - [`batch`] (feature `alloc`): the versioned [`Batch`] the agent posts to `/v1/ingest`.
//!
//! Every wire type is CBOR encoded with `minicbor` (not `serde_cbor`, which is unmaintained,
//! RUSTSEC-2021-0127, and needs an allocator). Structs are CBOR maps keyed by small integers, so a
//! later version can add optional fields that older readers skip.
//!
//! Tested by unit tests and property tests (round trips) in each module.
#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod senml;

#[cfg(feature = "alloc")]
pub mod batch;
#[cfg(feature = "alloc")]
pub mod latest;
#[cfg(feature = "alloc")]
pub mod summary;

#[cfg(feature = "alloc")]
pub use batch::{BATCH_VERSION, Batch, BatchError, Gap};
#[cfg(feature = "alloc")]
pub use latest::{InvalidLatest, LatestValue, StateValue};
#[cfg(feature = "alloc")]
pub use summary::{
    InvalidSummary, Quantiles, Reading, ReadingView, Score, SummaryId, WindowSummary,
};
