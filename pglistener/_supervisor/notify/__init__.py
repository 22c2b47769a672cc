"""The NOTIFY source: its shell (source.py, on the LISTEN connection) and its decoder
(decoder.pyx, PQnotifies on the dispatch core)."""
