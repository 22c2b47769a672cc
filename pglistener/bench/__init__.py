"""python -m pglistener.bench: throughput of pglistener against other listeners."""
