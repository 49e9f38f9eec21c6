//! Standard output in batches: every line the process prints (events and diagnostics) is appended
//! to one in-memory buffer that a background thread writes to file descriptor 1 a moment later,
//! in order, many lines per `write` system call.
//!
//! One `write` per line cost a system call for each of the five lines a message produces (and, on
//! a pipe to a log collector, a wake-up of the collector per line): under the e2e benchmark's load
//! `parley serve` made 3,386 `write` calls in 6 s, 485 with this (BENCHMARKS.md). Lines reach stdout
//! at most [`GATHER`] after they were emitted; [`flush`]
//! writes what is pending at once, and `parley` calls it before it exits and when it panics. A
//! process killed with SIGKILL loses at most the lines of its last [`GATHER`].
//!
//! When stdout cannot keep up (a reader that does not read), the buffer is bounded: past
//! [`MAX_PENDING`] bytes the emitting thread writes the pending lines itself and so waits for the
//! reader, as an unbuffered stdout would make it.

use std::{
    io::Write,
    sync::{Condvar, Mutex, OnceLock},
    thread,
    time::Duration,
};

/// How long the writer thread waits after the first pending line for more to join it. It bounds
/// the thread's wake-ups (each a context switch, dear on a small VM) to 1/GATHER per second: at
/// 2 ms, a steady 100 messages per second woke it for nearly every line, and `parley serve` spent
/// 15-25 % more CPU per message than at 20 ms (BENCHMARKS.md).
pub const GATHER: Duration = Duration::from_millis(20);
/// Pending bytes past which the emitting thread writes them itself.
pub const MAX_PENDING: usize = 4 << 20;

struct Batcher {
    pending: Mutex<Vec<u8>>,
    wake: Condvar,
    /// Held while taking and writing a batch, so that batches reach stdout in the order taken;
    /// with the buffer last written, swapped for the pending one at the next batch so that
    /// neither is reallocated as lines are appended.
    out: Mutex<(Box<dyn Write + Send>, Vec<u8>)>,
}

/// The capacity a buffer keeps after it was written (a burst can grow it up to [`MAX_PENDING`]).
const KEPT_CAPACITY: usize = 256 << 10;

impl Batcher {
    fn append(&self, bytes: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let was_empty = pending.is_empty();
        pending.extend_from_slice(bytes);
        let overfull = pending.len() > MAX_PENDING;
        drop(pending);
        if overfull {
            self.write_pending();
        } else if was_empty {
            self.wake.notify_one();
        }
    }

    /// Takes what is pending and writes it; returns whether there was anything.
    fn write_pending(&self) -> bool {
        let mut guard = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let (out, batch) = &mut *guard;
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.is_empty() {
                return false;
            }
            std::mem::swap(&mut *pending, batch);
        }
        // Nowhere to report a failed write to stdout; the lines are dropped as `println!` would panic.
        let _ = out.write_all(batch);
        let _ = out.flush();
        batch.clear();
        batch.shrink_to(KEPT_CAPACITY);
        true
    }

    fn run(&self) {
        loop {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            while pending.is_empty() {
                pending = self.wake.wait(pending).unwrap_or_else(|p| p.into_inner());
            }
            drop(pending);
            thread::sleep(GATHER);
            self.write_pending();
        }
    }
}

fn batcher() -> &'static Batcher {
    static BATCHER: OnceLock<&'static Batcher> = OnceLock::new();
    BATCHER.get_or_init(|| {
        let batcher: &'static Batcher = Box::leak(Box::new(Batcher {
            pending: Mutex::new(Vec::with_capacity(64 << 10)),
            wake: Condvar::new(),
            out: Mutex::new((Box::new(std::io::stdout()), Vec::with_capacity(64 << 10))),
        }));
        let started = thread::Builder::new().name("stdout-lines".into()).spawn(move || batcher.run());
        if started.is_err() {
            // No thread: every line is written as it comes (see `Lines::write`).
            UNBATCHED.set(()).ok();
        }
        batcher
    })
}

static UNBATCHED: OnceLock<()> = OnceLock::new();

/// Appends complete lines to the batched stdout. Each `write` call is kept whole: give it whole lines.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lines;

impl Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let batcher = batcher();
        batcher.append(bytes);
        if UNBATCHED.get().is_some() {
            batcher.write_pending();
        }
        Ok(bytes.len())
    }

    /// Does not wait for the writer thread: lines are written within [`GATHER`]; see [`flush`].
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes every pending line now. Call it before the process exits.
pub fn flush() {
    batcher().write_pending();
}

/// Installs a panic hook that flushes the pending lines before the previous hook reports the panic.
pub fn flush_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush();
        previous(info);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A writer that records what reached it and how many writes it took.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Recorder {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let mut inner = self.0.lock().unwrap();
            inner.0.extend_from_slice(bytes);
            inner.1 += 1;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn leaked(out: Recorder) -> &'static Batcher {
        let batcher: &'static Batcher = Box::leak(Box::new(Batcher {
            pending: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            out: Mutex::new((Box::new(out), Vec::new())),
        }));
        thread::spawn(move || batcher.run());
        batcher
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_in_few_writes() {
        let out = Recorder::default();
        let batcher = leaked(out.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                thread::spawn(move || (0..250).for_each(|i| batcher.append(format!("t{t} line {i}\n").as_bytes())))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        batcher.write_pending();
        let (bytes, writes) = out.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        for t in 0..4 {
            let own: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with(&format!("t{t} "))).collect();
            let expected: Vec<String> = (0..250).map(|i| format!("t{t} line {i}")).collect();
            assert_eq!(own, expected, "thread {t}'s lines in order and whole");
        }
        assert!(writes < 1000, "{writes} writes for 1000 lines");
    }

    #[test]
    fn a_lone_line_is_written_without_a_flush() {
        let out = Recorder::default();
        let batcher = leaked(out.clone());
        batcher.append(b"{\"event\":\"alone\"}\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.0.lock().unwrap().0.is_empty() && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(out.0.lock().unwrap().0, b"{\"event\":\"alone\"}\n");
    }

    #[test]
    fn an_overfull_buffer_is_written_by_the_emitter() {
        let out = Recorder::default();
        // No writer thread: only the emitter's own write can empty the buffer.
        let batcher: &'static Batcher = Box::leak(Box::new(Batcher {
            pending: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            out: Mutex::new((Box::new(out.clone()), Vec::new())),
        }));
        let line = vec![b'x'; 1 << 20];
        for _ in 0..5 {
            batcher.append(&line);
        }
        assert_eq!(out.0.lock().unwrap().0.len(), 5 << 20);
        assert!(batcher.pending.lock().unwrap().is_empty());
    }
}
