"""The WAL source: its shell (source.py; connection.py, the replication connection and the
slot's setup; tables.py, the table lookups of subscribe_changes) and its decoder (decoder.pyx,
pgoutput on the dispatch core)."""
