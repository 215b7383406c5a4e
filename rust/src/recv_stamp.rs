//! Kernel receive timestamps: the mock's arrival log, and the client's token times.
//!
//! A request's arrival, stamped in the handler, includes however long the mock's own thread
//! waited for a core; on a machine where the load generator and the mock share cores, that
//! wait is charged to the client's pacing. With `SO_TIMESTAMPNS` the kernel stamps each
//! segment when it is queued on the socket (on loopback: during the sender's `write`), and
//! `recvmsg` hands the stamp over, so the log shows when the client sent, whatever the
//! mock's scheduling. Hand-written over `libc`: tokio exposes no ancillary data on reads.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Asks the kernel to stamp the segments received on `stream` (CLOCK_REALTIME).
pub fn enable(stream: &TcpStream) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: valid descriptor; the option value is a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A TCP stream whose reads record the kernel's receive stamp of the data they return
/// (ns of the system clock; 0 until a stamped read), for the handler to take.
pub struct StampedStream {
    inner: TcpStream,
    last_rx_ns: Arc<AtomicI64>,
}

impl StampedStream {
    pub fn new(inner: TcpStream) -> (Self, Arc<AtomicI64>) {
        let last_rx_ns = Arc::new(AtomicI64::new(0));
        let s = Self {
            inner,
            last_rx_ns: Arc::clone(&last_rx_ns),
        };
        (s, last_rx_ns)
    }
}

/// One `recvmsg` into the `len` bytes at `buf` (which need not be initialised: the kernel
/// only writes them); the byte count and the segment stamp, if the kernel gave one.
fn recv_stamped(fd: libc::c_int, buf: *mut u8, len: usize) -> io::Result<(usize, Option<i64>)> {
    let mut iov = libc::iovec {
        iov_base: buf.cast(),
        iov_len: len,
    };
    // Room for one timespec control message, 8-byte aligned.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header before the fields below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (over `buf`) and `control`, all alive for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, bounded by
    // msg_controllen; a SCM_TIMESTAMPNS message carries one timespec.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                stamp = Some(ts.tv_sec as i64 * 1_000_000_000 + ts.tv_nsec as i64);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, stamp))
}

impl AsyncRead for StampedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let fd = this.inner.as_raw_fd();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            // Not `initialize_unfilled`: zeroing hyper's whole read buffer before every read
            // was 3% of a busy lane's CPU (perf), and `recvmsg` only writes.
            // SAFETY: the slice is only handed to `recvmsg` as a destination.
            let unfilled = unsafe { buf.unfilled_mut() };
            let (ptr, len) = (unfilled.as_mut_ptr().cast::<u8>(), unfilled.len());
            match this
                .inner
                .try_io(Interest::READABLE, || recv_stamped(fd, ptr, len))
            {
                Ok((n, stamp)) => {
                    if let Some(ns) = stamp {
                        this.last_rx_ns.store(ns, Ordering::Relaxed);
                    }
                    // SAFETY: `recvmsg` wrote the first `n` bytes of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale; try_io cleared it, so the next poll waits.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for StampedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
