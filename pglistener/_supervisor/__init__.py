"""The supervisor process: the one loop (server.py) that owns the database connections and
serves the workers' control socket (control_server.py), the subscriptions' bookkeeping
(registry.py), the connection machine that retries with backoff (connection.py, resolve.py),
the plain connection's shell (listen.py), conversations with the server as generators
(conversation.py), and each source in a folder of its own, its Python shell and its decoder
side by side (source.py says what a source is; sources.py names them, the one place that
does; notify/, wal/).

It may import the compiled core (pglistener._core), the protocol and the shared checks at the
package's top (_protocol, _checks, _sizes, _dsn, _backoff), channels, errors and stats; never
the worker side (pglistener._worker, worker, aio, pool). tests/test_layout.py reads the imports.
"""
