"""A conversation with the server as one generator: it yields each command and receives its
answer, and returns what it found or raises what went wrong (psycopg's generators.py, whose
waiting.py drives them). No I/O: drive() runs one on a connection's queue of commands (the
supervisor's loop never blocks on it), and a test drives one with canned answers.

Each step's order reads top to bottom, where callbacks had to be followed one into the next.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

from .listen import Done

T = TypeVar("T")
Row = tuple[bytes | None, ...]


@dataclass(frozen=True)
class Command:
    """One command to send. `nudge`: its answer waits on the primary (a standby making a
    slot waits for a snapshot the primary logs), so the driver asks the primary for one."""

    sql: bytes
    nudge: bool = False


@dataclass(frozen=True)
class Answer:
    """A command's answer: each statement's rows, or the server's error. `copy_both`: the
    connection streams now (START_REPLICATION's answer)."""

    results: list[list[Row]]
    error: str | None = None
    copy_both: bool = False

    def rows(self) -> list[Row]:
        """The last statement's rows (none when there were no results)."""
        return self.results[-1] if self.results else []


#: A conversation: yields Commands, is sent their Answers, returns its finding.
Conversation = Generator[Command, Answer, T]


def drive(conversation: Conversation[T], query: Callable[[bytes, Done], None],
          done: Callable[[T | None, BaseException | None], None],
          errors: tuple[type[BaseException], ...] = (),
          answer: Callable[[list[list[Row]], str | None], Answer] = Answer,
          sent: Callable[[Command], None] = lambda command: None) -> None:
    """Run `conversation` on a connection whose query(sql, done) queues a command and calls
    done(results, error) once it is answered (never, when the connection goes first: the
    conversation is dropped with it). done(finding, None) when it returns; done(None, error)
    when it raises one of `errors` (anything else is a bug, and raised). `answer` makes the
    Answer a command's result is sent as; `sent(command)` is called once it is queued."""

    def step(got: Answer | None) -> None:
        try:
            command = next(conversation) if got is None else conversation.send(got)
        except StopIteration as stop:
            done(stop.value, None)
            return
        except errors as error:
            done(None, error)
            return
        query(command.sql, lambda results, error: step(answer(results, error)))
        sent(command)

    step(None)
