"""``pgaccess dashboard``: the queue in a browser, served by the standard library.

- ``server.py``: :class:`DashboardServer`, the HTTP server and its routes;
- ``auth.py``: the token, sessions, CSRF and origin checks of the actions;
- ``views.py``: one consistent read of the queue, rendered as HTML;
- ``chart.py``: the throughput chart as inline SVG;
- ``page.html``, ``message.html``, ``page.css``: the page, shipped in the package.
"""

from .server import DashboardServer

__all__ = ["DashboardServer"]
