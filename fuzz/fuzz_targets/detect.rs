//! Protocol detection on a connection's first bytes: `classify` never panics, its decisions
//! are final as more bytes arrive, it always decides within `MAX_DETECT_BYTES`, and the async
//! reader keeps every byte its reads brought but reads no further than the read that decided,
//! whatever way the client splits its bytes.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use portcullis_proxy::detect::{Detected, MAX_DETECT_BYTES, classify, detect};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::runtime::Runtime;

/// One runtime for every input: building one per input would dominate the run.
static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime")
});

/// A client that sends its bytes in the given chunks, then half-closes.
struct Chunked<'a> {
    chunks: Vec<&'a [u8]>,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(chunk) = self.chunks.first_mut() else {
            return Poll::Ready(Ok(()));
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..n]);
        *chunk = &chunk[n..];
        if chunk.is_empty() {
            self.chunks.remove(0);
        }
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk sizes (1 to 16, cycling); the rest is what the client sends.
    let Some((&split, sent)) = data.split_first() else {
        return;
    };
    let mut decided: Option<Detected> = None;
    // Finality past MAX_DETECT_BYTES too: the read that decides may bring more than that.
    for end in 0..=sent.len().min(4 * MAX_DETECT_BYTES) {
        let now = classify(&sent[..end]);
        if let Some(before) = decided {
            assert_eq!(now, Some(before), "decision changed at byte {end}");
        }
        decided = now;
    }
    if sent.len() >= MAX_DETECT_BYTES {
        assert!(
            decided.is_some(),
            "undecided after {MAX_DETECT_BYTES} bytes"
        );
    }
    // Non-empty chunks only: an empty read means the client closed.
    let sizes = [split % 16 + 1, split / 16 + 1];
    let mut chunks = Vec::new();
    // Where each chunk ends: a read takes one whole chunk, as the reader's buffer is larger.
    let mut ends = vec![0];
    let mut rest = sent;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(rest.len().min(usize::from(*size)));
        chunks.push(chunk);
        ends.push(sent.len() - tail.len());
        rest = tail;
    }
    let mut client = Chunked { chunks };
    let (detected, read) = RUNTIME
        .block_on(detect(&mut client, Duration::from_secs(1)))
        .expect("an in-memory client never fails");
    let last = ends.iter().position(|&e| e == read.len());
    let last = last.unwrap_or_else(|| panic!("read {} bytes, not whole reads", read.len()));
    if last > 0 {
        let before = ends[last - 1];
        assert!(
            before < MAX_DETECT_BYTES && classify(&sent[..before]).is_none(),
            "read on after {before} bytes had decided"
        );
    }
    assert!(
        sent.starts_with(&read),
        "replay bytes differ from what was sent"
    );
    assert_eq!(detected, classify(&read).unwrap_or(Detected::Opaque));
    if let Some(d) = decided {
        assert_eq!(detected, d, "async detection disagrees with classify");
    }
});
