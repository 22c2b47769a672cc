# Raw libpq declarations, only what the producer side calls (see libpq-fe.h), grouped by the
# libpq manual's sections. The connection is our own (dispatch.PGConnection): nothing here
# touches a connection of psycopg's, so any psycopg implementation can sit beside us.

cdef extern from "libpq-fe.h" nogil:
    ctypedef struct PGconn:
        pass

    ctypedef struct PGresult:
        pass

    ctypedef struct PGnotify:
        char *relname
        int be_pid
        char *extra

    ctypedef enum ConnStatusType:
        CONNECTION_OK
        CONNECTION_BAD

    ctypedef enum PostgresPollingStatusType:
        PGRES_POLLING_FAILED
        PGRES_POLLING_READING
        PGRES_POLLING_WRITING
        PGRES_POLLING_OK

    ctypedef enum ExecStatusType:
        PGRES_EMPTY_QUERY
        PGRES_COMMAND_OK
        PGRES_TUPLES_OK
        PGRES_COPY_OUT
        PGRES_COPY_IN
        PGRES_BAD_RESPONSE
        PGRES_NONFATAL_ERROR
        PGRES_FATAL_ERROR
        PGRES_COPY_BOTH

    # 34.1 Database connection control
    PGconn *PQconnectdb(const char *conninfo)
    PGconn *PQconnectStart(const char *conninfo)
    PostgresPollingStatusType PQconnectPoll(PGconn *conn)
    void PQfinish(PGconn *conn)

    # 34.2 Connection status
    ConnStatusType PQstatus(const PGconn *conn)
    char *PQerrorMessage(const PGconn *conn)
    int PQsocket(const PGconn *conn)
    int PQbackendPID(const PGconn *conn)
    int PQserverVersion(const PGconn *conn)
    int PQlibVersion()

    # 34.3 Command execution
    PGresult *PQexec(PGconn *conn, const char *command)
    ExecStatusType PQresultStatus(const PGresult *res)
    char *PQresultErrorMessage(const PGresult *res)
    int PQntuples(const PGresult *res)
    int PQnfields(const PGresult *res)
    char *PQgetvalue(const PGresult *res, int row, int col)
    int PQgetlength(const PGresult *res, int row, int col)
    int PQgetisnull(const PGresult *res, int row, int col)
    void PQclear(PGresult *res)

    # 34.4 Asynchronous command processing
    int PQsendQuery(PGconn *conn, const char *command)
    PGresult *PQgetResult(PGconn *conn)
    int PQconsumeInput(PGconn *conn)
    int PQisBusy(PGconn *conn)
    int PQsetnonblocking(PGconn *conn, int arg)
    int PQflush(PGconn *conn)

    # 34.10 COPY (the replication stream is COPY BOTH)
    int PQputCopyData(PGconn *conn, const char *buffer, int nbytes)
    int PQgetCopyData(PGconn *conn, char **buffer, int async)

    # 34.13 Notice processing
    ctypedef void (*PQnoticeReceiver)(void *arg, const PGresult *res)
    PQnoticeReceiver PQsetNoticeReceiver(PGconn *conn, PQnoticeReceiver proc, void *arg)
    char *PQresultErrorField(const PGresult *res, int fieldcode)
    const int PG_DIAG_SQLSTATE
    const int PG_DIAG_MESSAGE_PRIMARY
    const int PG_DIAG_SEVERITY_NONLOCALIZED

    # 34.9 Asynchronous notification
    PGnotify *PQnotifies(PGconn *conn)
    void PQfreemem(void *ptr)


cdef extern from *:
    # Set by setup.py from `pg_config --version`: the libpq whose headers we compiled against.
    const int PGL_BUILT_LIBPQ_VERSION
