from fix_pg import conn, dsn  # noqa: F401 - fixtures
from fix_supervisor import supervisor, worker  # noqa: F401 - fixtures
