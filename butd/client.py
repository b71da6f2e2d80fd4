"""Public import path of the Python client: ``from butd.client import Client``."""

from service.client import ButdError, Client, decode_record, to_record

__all__ = ["ButdError", "Client", "decode_record", "to_record"]
