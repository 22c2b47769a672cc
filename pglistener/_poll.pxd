# poll(2), for the loops that wait on a libpq socket or an eventfd without the GIL.

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    const short POLLIN
    const short POLLOUT
    const short POLLHUP
    const short POLLERR
    const short POLLNVAL
