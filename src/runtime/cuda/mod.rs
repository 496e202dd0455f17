//! Safe wrappers over the CUDA stream/event shim (`shim.cpp`, compiled by `build.rs`).
//!
//! tch has no streams or events; the inference worker needs them to overlap the copy of
//! batch n+1 with the compute of batch n. The shim uses libtorch's device-generic c10 API,
//! so it builds against the PyPI wheel without CUDA headers. Every shim call returns an
//! error code instead of throwing; [`CudaError`] carries the first line of libtorch's
//! message (the full text goes to the debug log).
//!
//! Invariants: a [`Stream`] and an [`Event`] own their C++ objects and free them on drop;
//! a [`StreamGuard`] makes its stream current for the thread until dropped, so guards must
//! be dropped in reverse order of creation (enforced by borrowing the stream).

use std::ffi::{CStr, c_char, c_int, c_void};

use tch::Tensor;

unsafe extern "C" {
    fn hp_last_error() -> *const c_char;
    fn hp_stream_from_pool(device: c_int, high_priority: c_int, out: *mut *mut c_void) -> c_int;
    fn hp_stream_free(s: *mut c_void);
    fn hp_stream_synchronize(s: *mut c_void) -> c_int;
    fn hp_stream_guard_enter(s: *mut c_void, out: *mut *mut c_void) -> c_int;
    fn hp_stream_guard_exit(g: *mut c_void);
    fn hp_event_new(out: *mut *mut c_void) -> c_int;
    fn hp_event_free(e: *mut c_void);
    fn hp_event_record(e: *mut c_void, s: *mut c_void) -> c_int;
    fn hp_event_block(e: *mut c_void, s: *mut c_void) -> c_int;
    fn hp_event_synchronize(e: *mut c_void) -> c_int;
    fn hp_event_query(e: *mut c_void, done: *mut c_int) -> c_int;
    fn hp_copy_(dst: *mut c_void, src: *mut c_void, non_blocking: c_int) -> c_int;
    fn hp_record_stream(t: *mut c_void, s: *mut c_void) -> c_int;
    fn hp_mem_info(device: c_int, free: *mut usize, total: *mut usize) -> c_int;
    fn hp_peak_allocated(device: c_int, reset: c_int, peak: *mut usize) -> c_int;
    fn hp_empty_cache() -> c_int;
    fn hp_device_synchronize(device: c_int) -> c_int;
    fn hp_set_local_threads(n: c_int) -> c_int;
    fn hp_local_threads(omp: *mut c_int, mkl: *mut c_int);
}

/// A failed shim call: which call, and libtorch's first line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{call}: {message}")]
pub struct CudaError {
    pub call: &'static str,
    pub message: String,
}

fn check(rc: c_int, call: &'static str) -> Result<(), CudaError> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the shim keeps a NUL-terminated thread-local string alive until the next
    // failing call on this thread.
    let full = unsafe { CStr::from_ptr(hp_last_error()) }
        .to_string_lossy()
        .into_owned();
    tracing::debug!(call, error = %full, "CUDA shim error (full text)");
    Err(CudaError {
        call,
        message: crate::vocab::error::first_line(&full),
    })
}

/// A CUDA stream from libtorch's pool.
pub struct Stream {
    ptr: *mut c_void,
}

// SAFETY: a c10::Stream is a plain value (device, id); using it from another thread is
// what CUDA streams are for.
unsafe impl Send for Stream {}

impl Stream {
    pub fn from_pool(device: usize, high_priority: bool) -> Result<Stream, CudaError> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the shim allocates the stream object.
        check(
            unsafe { hp_stream_from_pool(device as c_int, high_priority as c_int, &mut ptr) },
            "stream from pool",
        )?;
        Ok(Stream { ptr })
    }

    /// Make this the thread's current stream until the guard is dropped.
    pub fn enter(&self) -> Result<StreamGuard<'_>, CudaError> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `self.ptr` is a live c10::Stream.
        check(
            unsafe { hp_stream_guard_enter(self.ptr, &mut ptr) },
            "stream guard",
        )?;
        Ok(StreamGuard { ptr, _stream: self })
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: live stream.
        check(
            unsafe { hp_stream_synchronize(self.ptr) },
            "stream synchronize",
        )
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: allocated by hp_stream_from_pool, freed once.
        unsafe { hp_stream_free(self.ptr) }
    }
}

/// The thread's current stream is `stream` while this lives.
pub struct StreamGuard<'a> {
    ptr: *mut c_void,
    _stream: &'a Stream,
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: allocated by hp_stream_guard_enter, freed once; restores the previous stream.
        unsafe { hp_stream_guard_exit(self.ptr) }
    }
}

/// A CUDA event.
pub struct Event {
    ptr: *mut c_void,
}

// SAFETY: c10::Event may be recorded on one thread and waited on from another; the
// completion thread only synchronises/queries it after the worker recorded it.
unsafe impl Send for Event {}

impl Event {
    pub fn new() -> Result<Event, CudaError> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check(unsafe { hp_event_new(&mut ptr) }, "event new")?;
        Ok(Event { ptr })
    }

    /// Record the event at the current end of `stream`'s queue.
    pub fn record(&mut self, stream: &Stream) -> Result<(), CudaError> {
        // SAFETY: both live.
        check(
            unsafe { hp_event_record(self.ptr, stream.ptr) },
            "event record",
        )
    }

    /// Make `stream` wait (on the device) until this event has completed.
    pub fn block(&self, stream: &Stream) -> Result<(), CudaError> {
        // SAFETY: both live.
        check(
            unsafe { hp_event_block(self.ptr, stream.ptr) },
            "event block",
        )
    }

    /// Wait on the host until the event has completed.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: live event.
        check(
            unsafe { hp_event_synchronize(self.ptr) },
            "event synchronize",
        )
    }

    /// Wait on the host until the event has completed, without spinning a core.
    ///
    /// c10 creates events without the blocking-sync flag, and with fewer GPU contexts
    /// than cores the runtime's `cudaEventSynchronize` busy-waits: the completion thread
    /// would burn a core the decode and encode pools need. Polling with a short sleep
    /// costs at most the sleep (capped at 200 us) per batch, far below a batch's compute.
    pub fn wait(&self) -> Result<(), CudaError> {
        let mut nap = std::time::Duration::from_micros(20);
        while !self.query()? {
            std::thread::sleep(nap);
            nap = (nap * 2).min(std::time::Duration::from_micros(200));
        }
        Ok(())
    }

    pub fn query(&self) -> Result<bool, CudaError> {
        let mut done = 0;
        // SAFETY: live event, out-pointer to a local.
        check(
            unsafe { hp_event_query(self.ptr, &mut done) },
            "event query",
        )?;
        Ok(done != 0)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: allocated by hp_event_new, freed once.
        unsafe { hp_event_free(self.ptr) }
    }
}

/// `dst.copy_(src, non_blocking)` on the current stream.
pub fn copy_(dst: &mut Tensor, src: &Tensor, non_blocking: bool) -> Result<(), CudaError> {
    // SAFETY: both are live at::Tensor handles; copy_ does not retain the pointers.
    check(
        unsafe {
            hp_copy_(
                dst.as_mut_ptr() as *mut c_void,
                src.as_ptr() as *mut c_void,
                non_blocking as c_int,
            )
        },
        "copy",
    )
}

/// Mark `t`'s memory as in use on `stream` (see the shim).
pub fn record_stream(t: &Tensor, stream: &Stream) -> Result<(), CudaError> {
    // SAFETY: live tensor and stream; record_stream only updates allocator bookkeeping.
    check(
        unsafe { hp_record_stream(t.as_ptr() as *mut c_void, stream.ptr) },
        "record stream",
    )
}

/// (free, total) bytes of device memory.
pub fn mem_info(device: usize) -> Result<(usize, usize), CudaError> {
    let (mut f, mut t) = (0, 0);
    // SAFETY: out-pointers to locals.
    check(
        unsafe { hp_mem_info(device as c_int, &mut f, &mut t) },
        "memory info",
    )?;
    Ok((f, t))
}

/// Peak bytes allocated by libtorch on `device` (optionally resetting the peak first).
pub fn peak_allocated(device: usize, reset: bool) -> Result<usize, CudaError> {
    let mut p = 0;
    // SAFETY: out-pointer to a local.
    check(
        unsafe { hp_peak_allocated(device as c_int, reset as c_int, &mut p) },
        "peak allocated",
    )?;
    Ok(p)
}

/// Wait until everything queued on `device` (every stream) has finished.
pub fn device_synchronize(device: usize) -> Result<(), CudaError> {
    // SAFETY: plain value argument.
    check(
        unsafe { hp_device_synchronize(device as c_int) },
        "device synchronize",
    )
}

/// Set libtorch's CPU intra-op threads for the calling thread only (OpenMP's per-thread
/// count), leaving every other thread's and the process default alone. Returns the count
/// now in effect, or `None` when libtorch has no OpenMP.
pub fn set_local_threads(n: usize) -> Option<usize> {
    // Makes libtorch adopt its process default in this thread now, so that its first
    // parallel operation does not replace the count set below.
    let _ = tch::get_num_threads();
    // SAFETY: plain value argument; the shim checks that OpenMP is present.
    let r = unsafe { hp_set_local_threads(n as c_int) };
    (r > 0).then_some(r as usize)
}

/// The calling thread's OpenMP and MKL thread counts (`None` where libtorch has neither).
pub fn local_threads() -> (Option<usize>, Option<usize>) {
    let (mut omp, mut mkl) = (0, 0);
    // SAFETY: two valid out-pointers.
    unsafe { hp_local_threads(&mut omp, &mut mkl) };
    (
        (omp > 0).then_some(omp as usize),
        (mkl > 0).then_some(mkl as usize),
    )
}

/// Return cached, unused device memory to the driver.
pub fn empty_cache() -> Result<(), CudaError> {
    // SAFETY: no arguments.
    check(unsafe { hp_empty_cache() }, "empty cache")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_threads_stay_in_their_thread() {
        let default = std::thread::spawn(tch::get_num_threads).join().unwrap() as usize;
        let want = default + 1;
        let seen = std::thread::spawn(move || {
            let set = set_local_threads(want);
            // A parallel operation must not put the process default back.
            let x = Tensor::ones([1, 3, 64, 64], (tch::Kind::Float, tch::Device::Cpu));
            let w = Tensor::ones([4, 3, 3, 3], (tch::Kind::Float, tch::Device::Cpu));
            let _ = x.conv2d(&w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
            let m = Tensor::ones([64, 256], (tch::Kind::Float, tch::Device::Cpu));
            let _ = m.matmul(&m.tr());
            (set, tch::get_num_threads() as usize, local_threads())
        })
        .join()
        .unwrap();
        // OpenMP (convolutions) and, where libtorch has MKL, MKL (matrix products).
        let mkl = local_threads().1.map(|_| want);
        assert_eq!(seen, (Some(want), want, (Some(want), mkl)));
        // Other threads, new ones included, keep the process default.
        let other = std::thread::spawn(tch::get_num_threads).join().unwrap() as usize;
        assert_eq!(other, default);
    }
}
