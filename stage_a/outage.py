"""Which errors are a service's fault (the database or the broker is down, full or busy), never a message's.

A message that met such an error is delivered again later; only a message-specific error makes it a
dead letter. The store's own retry (store.engine.retrying) re-raises the database's last error when
it gives up, so that is recognised here too.
"""

from __future__ import annotations


def is_database_error(exc: BaseException) -> bool:
    """An error of the database or of the connection to it (SQLAlchemy's DBAPIError and its kinds:
    OperationalError, InterfaceError, ...; a pool that timed out waiting for a connection)."""
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    return isinstance(exc, DBAPIError | PoolTimeout)


def is_broker_error(exc: BaseException) -> bool:
    """An error talking to the broker: unreachable, timed out, full (Redis OOM), or kombu's view of it."""
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import OutOfMemoryError, ReadOnlyError
    from redis.exceptions import TimeoutError as RedisTimeout

    return isinstance(exc, KombuOperationalError | RedisConnectionError | RedisTimeout | OutOfMemoryError
                      | ReadOnlyError | ConnectionError | TimeoutError)


def is_outage(exc: BaseException) -> bool:
    """The database's or the broker's fault: whatever was being done is tried again, nothing is blamed."""
    return is_database_error(exc) or is_broker_error(exc)
