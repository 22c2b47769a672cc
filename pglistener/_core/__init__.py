"""The compiled core, shared by both sides of the seam: the ring's layout (_ring.h, _ring.pxd,
drawn there), pgoutput's messages (_pgoutput.h, the one codec both sides read them by), the
ring's writing end and the supervisor's loop (dispatch.pyx: the libpq connection, the rings'
producer, routing, the poll loop), and its reading end with the stream core every way of
reading is built on (reader.pyx, which does not link libpq). The supervisor imports
dispatch, the worker side reader; they share only the ring's layout and the codec, and never
call each other. It imports nothing of pglistener but errors.
"""
