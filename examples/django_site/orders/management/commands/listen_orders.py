"""A Django management command that handles notifications, started on its own beside the
web server (as Celery or Django workers are) and sharing its supervisor:

    python -m pglistener supervise --dsn "dbname=app" -- \\
        python -m django listen_orders --settings=examples.django_site.settings

SIGTERM (forwarded by supervise) unsubscribes, which ends the loop after the item in hand.
"""

from __future__ import annotations

import signal
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from pglistener import Gap, Worker


class Command(BaseCommand):
    help = "Handle notifications on a channel through the pglistener supervisor."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("channel", nargs="?", default="orders")

    def handle(self, *args: Any, **options: Any) -> None:
        with Worker.from_env().subscribe(options["channel"], timeout=30) as sub:
            signal.signal(signal.SIGTERM, lambda *_: sub.unsubscribe())
            self.stdout.write("listening")
            self.stdout.flush()
            for item in sub:
                if isinstance(item, Gap):
                    self.stdout.write(f"notifications may be missing ({item.reason}): resync")
                else:
                    self.stdout.write(f"order {item.payload}")
                self.stdout.flush()
        self.stdout.write("stopped")
