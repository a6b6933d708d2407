"""The technician's web UI, served by the hub on its HTTPS port at ``/`` (issue 13).

:mod:`gateway.ui.security` (admin file, sessions, CSRF, login rate limits: pure),
:mod:`gateway.ui.logbuf` (the in-memory ring of the hub's log records),
:mod:`gateway.ui.pages` (server-rendered HTML), :mod:`gateway.ui.server` (the aiohttp shell).
"""
