"""The worker side: the control connection to the supervisor (control.py) and the opening of
a subscription's stream (stream.py), under the public worker.py and aio.py.

It may import the compiled core's reader (pglistener._core.reader), the protocol and the
shared checks at the package's top (_protocol, _checks, _sizes), channels and errors; never
the supervisor's side (pglistener._supervisor, supervisor). tests/test_layout.py reads the
imports.
"""
