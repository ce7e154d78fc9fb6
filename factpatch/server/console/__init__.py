"""The web console: one static page (HTML, CSS, JavaScript; no build step, nothing fetched from
elsewhere) served at ``/console`` on the HTTP port.  It calls the JSON API
(:mod:`factpatch.server.gateway`) with the user's bearer token, which enforces every scope."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

HERE = Path(__file__).parent

#: The page may load only what this server serves (and draw the traces' PNGs from data: URLs).
POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HEADERS = {"content-security-policy": POLICY, "x-content-type-options": "nosniff"}


def add_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/console")

    @app.get("/console", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(HERE / "index.html", headers=HEADERS)

    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console")
