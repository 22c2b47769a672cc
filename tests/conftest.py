from fix_cluster import cluster, logical_cluster, replica15  # noqa: F401 - fixtures
from fix_proxy import proxy  # noqa: F401 - fixtures

from fix_pg import conn, dsn  # noqa: F401 - fixtures
from fix_supervisor import supervisor, worker  # noqa: F401 - fixtures
