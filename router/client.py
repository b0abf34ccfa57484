"""The Python client moved to :mod:`lookalike.client` (``from lookalike import Client``); this name stays for code
written against it."""

from lookalike.client import *  # noqa: F401,F403
from lookalike.client import Client  # noqa: F401
