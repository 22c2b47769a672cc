"""The WAL source: its shell (source.py; connection.py, the replication connection; setup.py,
the slot's setup; tables.py, the table lookups of subscribe_changes; failover.py, whether a
failover keeps the slot) and its decoder (decoder.pyx, pgoutput on the dispatch core)."""
