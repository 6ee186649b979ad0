"""Operator views: `tokenpools top` (terminal), the status page (GET / on the status server), `tokenpools plan`."""

from functools import cache
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "status.html"


@cache
def page_html() -> bytes:
    """The status page served at GET / (one static file, inline CSS and JS, no external resources)."""
    return PAGE.read_bytes()
