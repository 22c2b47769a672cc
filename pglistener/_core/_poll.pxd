# poll(2) and the monotonic clock, for the loops that wait on a libpq socket or an eventfd
# without the GIL.
from libc.stdint cimport uint64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    int ppoll(pollfd *fds, unsigned long nfds, const timespec *timeout, const void *sigmask)
    const short POLLIN
    const short POLLOUT
    const short POLLHUP
    const short POLLERR
    const short POLLNVAL


cdef extern from *:
    # POLLRDHUP needs _GNU_SOURCE in <poll.h>; its value is fixed by the Linux ABI.
    """
    #define PGL_POLLRDHUP 0x2000
    """
    const short PGL_POLLRDHUP


# Monotonic nanoseconds.
cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec
