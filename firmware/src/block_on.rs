//! [`block_on`]: run a future to completion by polling it in a loop, for code whose I/O never
//! waits (the in-memory transport of the tests and of the MCU self-test). A board uses a real
//! executor (embassy) instead.
//!
//! Invariant: a future that returns `Pending` is polled again at once, so a future that waits
//! on real I/O would spin; use this only with transports that are always ready.

use core::future::Future;
use core::pin::pin;
use core::task::{Context, Poll, Waker};

pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}
