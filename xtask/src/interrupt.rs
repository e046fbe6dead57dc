//! Ctrl-C (SIGINT) and SIGTERM as a request to stop: the handler only records it, and the
//! long waits of [`crate::harness::Harness`] and
//! [`crate::topology::ChildGuard::wait_with_output_interruptible`] notice it and return an error,
//! so that the normal drop guards tear everything down.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn record(_signal: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Installs the SIGINT and SIGTERM handlers. Until this is called, [`requested`] stays false.
pub fn install() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(record),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }
            .with_context(|| format!("installing the {signal} handler"))?;
    }
    Ok(())
}

/// Whether Ctrl-C (or SIGTERM) arrived since [`install`].
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Fails with "interrupted" once Ctrl-C arrived.
pub fn check() -> Result<()> {
    if requested() {
        bail!("interrupted (Ctrl-C)");
    }
    Ok(())
}
