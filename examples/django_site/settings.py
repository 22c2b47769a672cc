"""The least Django needs to run the orders app's management command (no database: the
command listens through pglistener's supervisor)."""

SECRET_KEY = "example only"
INSTALLED_APPS = ["examples.django_site.orders"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
