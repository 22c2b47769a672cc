# Raw libpq declarations, only what the dispatch loop calls (see libpq-fe.h). Every function
# here is called without the GIL on the PGconn* that psycopg owns (conn.pgconn.pgconn_ptr).

cdef extern from "libpq-fe.h" nogil:
    ctypedef struct PGconn:
        pass

    ctypedef struct PGnotify:
        char *relname
        int be_pid
        char *extra

    # 34.2 Connection status
    int PQsocket(const PGconn *conn)
    int PQlibVersion()

    # 34.4 Asynchronous command processing
    int PQisBusy(PGconn *conn)
    int PQflush(PGconn *conn)

    # 34.9 Asynchronous notification
    int PQconsumeInput(PGconn *conn)
    PGnotify *PQnotifies(PGconn *conn)
    void PQfreemem(void *ptr)


cdef extern from *:
    # Set by setup.py from `pg_config --version`: the libpq whose headers we compiled against.
    const int PGL_BUILT_LIBPQ_VERSION
