"""The browser front-end (``web/``): the page at ``/``, its files at ``/static/<name>``.

The page's own links are relative (``style.css``, ``app.js``) so that the folder also works
served by any static server (``python -m http.server``); at ``/`` a ``<base href="/static/">``
makes the same links resolve here. Only the files present in ``web/`` at start-up are
served, by exact name, so no request path reaches the file system.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Response
from fastapi.responses import FileResponse, HTMLResponse

WEB_DIR = Path(__file__).resolve().parent / "web"
STATIC_PREFIX = "/static/"

# Module scripts must come with a JavaScript type; the platform's mimetypes table is not relied on.
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
# The files are small and change with the server: let browsers revalidate (ETag) rather than guess.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# A page of another origin may import the modules from here (docs/browser.md): a browser fetches a module, and an
# AudioWorklet's, in CORS mode, and refuses one served without this header. They are public, and no credentials
# are allowed with "*".
_STATIC_HEADERS = {**_HEADERS, "Access-Control-Allow-Origin": "*"}


def build_router(web_dir: Path = WEB_DIR) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    files = {path.name: path for path in sorted(web_dir.iterdir())
             if path.is_file() and path.suffix in _MEDIA_TYPES} if web_dir.is_dir() else {}
    index = files.get("index.html")
    index_html = None
    if index is not None:
        index_html = index.read_text(encoding="utf-8").replace(
            "<head>", f'<head>\n  <base href="{STATIC_PREFIX}">', 1)

    @router.api_route("/", methods=["GET", "HEAD"])
    async def page() -> Response:
        if index_html is None:
            raise HTTPException(404, "the browser front-end is not installed "
                                "(index.html missing from the package's web/ folder)")
        return HTMLResponse(index_html, headers=_HEADERS)

    @router.api_route(STATIC_PREFIX + "{name}", methods=["GET", "HEAD"])
    async def static_file(name: str) -> Response:
        path = files.get(name)
        if path is None:
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=_STATIC_HEADERS)

    return router


router = build_router()
