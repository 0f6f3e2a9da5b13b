//! Reading a client stream ahead of the work it feeds.
//!
//! An Enroll stream is written in groups, each made durable with an fsync. While a
//! group is being written, the client goes on sending; if nobody reads, its DATA frames
//! pile up unread in the HTTP/2 layer, and h2 counts each unread frame under 256 bytes
//! against a budget (half the connection window) meant to stop floods of tiny frames:
//! a stream of small messages (a short template, a client that splits messages at the
//! flow-control window) then gets the whole connection closed with GOAWAY
//! `too_many_data_frames` (seen with grpcio against a disk with 30 ms fsyncs). So the
//! stream is read by a task of its own as fast as messages arrive, into memory, up to
//! `limit_bytes` ahead of the writer; only then does reading wait (and flow control
//! hold the client back).

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::{Status, Streaming};

/// One message read ahead, holding its share of the read-ahead budget until dropped.
pub struct Ahead<T> {
    pub message: T,
    /// Encoded size (what it counts against the budget).
    pub bytes: usize,
    _budget: OwnedSemaphorePermit,
}

/// Read `stream` in a task of its own into the returned channel, at most `limit_bytes`
/// of messages ahead of whoever drops them. The channel ends after the stream's end or
/// its first error (sent as the last item); dropping the receiver stops the task.
pub fn read_ahead<T>(mut stream: Streaming<T>, limit_bytes: usize) -> mpsc::UnboundedReceiver<Result<Ahead<T>, Status>>
where
    T: prost::Message + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(limit_bytes.min(Semaphore::MAX_PERMITS)));
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = stream.message() => next,
                _ = tx.closed() => return,
            };
            let message = match next {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let bytes = message.encoded_len();
            let permits = bytes.clamp(1, limit_bytes) as u32;
            let Ok(budget) = budget.clone().acquire_many_owned(permits).await else {
                return;
            };
            let ahead = Ahead {
                message,
                bytes,
                _budget: budget,
            };
            if tx.send(Ok(ahead)).is_err() {
                return;
            }
        }
    });
    rx
}
