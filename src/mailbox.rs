//! The worker's mailbox: everything that asks the pool's one background task for something
//! arrives here, as one enum, in order.
//!
//! Pool handles hold the strong senders: when the last handle is dropped the mailbox closes and
//! the worker ends. Everything else (connection slots through the registry, the call path)
//! holds a weak one, so that it never keeps the worker alive. Whether the pool should leave
//! Idle is not a message but a state (a watch), since the slots wait on it too.

use std::net::SocketAddr;

use crate::addr::EndpointAddr;

use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::resolve::AddressSink;

/// A request to the worker.
#[derive(Debug)]
pub(crate) enum Mail {
    /// `close()`: stop every connection and end; answer with every failure seen.
    Close(oneshot::Sender<Vec<Error>>),
    /// A connection was lost or refused: resolve again soon (rate-limited by the worker).
    Reresolve,
    /// Every connection of this address was full when a call picked one: open another.
    Grow(EndpointAddr),
    /// The whole new address set of a pool whose addresses are pushed
    /// ([`Push`](crate::resolve::Push)); applied as a resolver's answer is.
    Addresses(Vec<SocketAddr>),
}

/// The strong sender, held by pool handles.
pub(crate) type Mailbox = mpsc::UnboundedSender<Mail>;

/// The worker's end.
pub(crate) type Inbox = mpsc::UnboundedReceiver<Mail>;

/// A sender that does not keep the worker alive.
#[derive(Debug, Clone)]
pub(crate) struct WeakMailbox(mpsc::WeakUnboundedSender<Mail>);

impl WeakMailbox {
    pub(crate) fn new(mailbox: &Mailbox) -> Self {
        Self(mailbox.downgrade())
    }

    /// Posts `mail`, unless the worker is gone (then nobody needs it); returns whether the
    /// worker was there.
    pub(crate) fn post(&self, mail: Mail) -> bool {
        match self.0.upgrade() {
            Some(mailbox) => mailbox.send(mail).is_ok(),
            None => false,
        }
    }
}

/// A pushed address set reaches the worker as mail.
impl AddressSink for WeakMailbox {
    fn send(&self, addresses: Vec<SocketAddr>) -> bool {
        self.post(Mail::Addresses(addresses))
    }
}

/// A new mailbox: the strong sender and the worker's end.
pub(crate) fn mailbox() -> (Mailbox, Inbox) {
    mpsc::unbounded_channel()
}
