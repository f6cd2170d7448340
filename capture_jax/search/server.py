"""The search page and its JSON API: FastAPI on uvicorn.

  GET  /                              the page: pick a picture, type a title, see the top items
  POST /api/search                    multipart form: image (file), title, k (10), boxes
                                      ("x1,y1,x2,y2;..."), kind -> {"results": [...], ...}
  GET  /api/items/{row}/thumbnail     an item's JPEG thumbnail
  GET  /api/info                      the index's manifest and how requests were batched

A bad request gets HTTP 400, 413 or 422 with {"detail": "<one sentence>"}, and the server goes
on serving. The model was compiled before the server starts (`Searcher`); requests that arrive
together are embedded and ranked together (`Batcher`): the first waits up to `wait_ms` for
others, up to `max_rows` query rows (a query with boxes has one row per box).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import html
import time

import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from capture_jax.search import inputs
from capture_jax.search.inputs import QueryError


class Batcher:
    """Collects concurrent queries and runs them through the searcher together, one batch at a
    time (the model and the ranker use every core already)."""

    def __init__(self, searcher, max_rows: int, wait_ms: float):
        self.searcher, self.max_rows, self.wait_s = searcher, max_rows, wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batch_sizes: collections.Counter = collections.Counter()  # requests per batch

    async def submit(self, query, k: int, kind: str) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((query, k, kind, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self.queue.get()]
            rows, deadline = len(group[0][0].rows["text_ids"]), loop.time() + self.wait_s
            while rows < self.max_rows and (left := deadline - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    break
                group.append(item)
                rows += len(item[0].rows["text_ids"])
            self.batch_sizes[len(group)] += 1
            by_kind = collections.defaultdict(list)
            for item in group:
                by_kind[item[2]].append(item)
            for kind, items in by_kind.items():
                k = max(item[1] for item in items)
                try:
                    results = await asyncio.to_thread(self.searcher.search,
                                                      [item[0] for item in items], k, kind)
                except Exception as e:  # Handed to each request; the loop goes on.
                    for item in items:
                        if not item[3].done():
                            item[3].set_exception(e)
                    continue
                for item, hits in zip(items, results):
                    if not item[3].done():
                        item[3].set_result(hits[:item[1]])


def create_app(searcher, max_rows: int = 8, default_kind: str | None = None,
               wait_ms: float = 5.0) -> FastAPI:
    """The application around a ready `Searcher`."""
    batcher = Batcher(searcher, max_rows, wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="CAPTURE search", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(QueryError)
    async def bad_query(request: Request, error: QueryError):
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def bad_form(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or "the request"
        return JSONResponse({"detail": f"The form field {field!r} is wrong: {first['msg']}; "
                                       "send image (a file), title, and optionally k, boxes, "
                                       "kind."}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return _page(searcher, default_kind)

    @app.get("/api/info")
    async def info() -> dict:
        return {"index": searcher.index.manifest, "kinds": searcher.kinds,
                "batches": {str(k): v for k, v in sorted(batcher.batch_sizes.items())}}

    @app.get("/api/items/{row}/thumbnail")
    async def item_thumbnail(row: int) -> Response:
        if not 0 <= row < len(searcher.index.ids):
            raise QueryError(f"There is no item {row}: the index has {len(searcher.index.ids)}.",
                             404)
        data = searcher.index.thumbnail(row)
        if not data:
            raise QueryError(f"Item {row} has no thumbnail (its image could not be read).", 404)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=86400"})

    @app.post("/api/search")
    async def search(image: UploadFile | None = File(None), title: str = Form(""),
                     k: int = Form(10), boxes: str = Form(""),
                     kind: str = Form("")) -> dict:
        start = time.perf_counter()
        if image is None:
            raise QueryError("No picture was sent: add the form field 'image' with a photo of "
                             "the product.")
        data = await image.read(inputs.MAX_IMAGE_BYTES + 1)
        kind = searcher.check_kind(kind or default_kind)
        if not 1 <= k <= 100:
            raise QueryError(f"k={k} is not between 1 and 100: ask for fewer items.")
        query = await asyncio.to_thread(searcher.prepare, data, title, boxes)
        hits = await batcher.submit(query, k, kind)
        for hit in hits:
            hit["thumbnail"] = f"/api/items/{hit['row']}/thumbnail"
        return {"results": hits, "kind": kind, "title": query.title,
                "boxes": [list(b) for b in query.boxes],
                "model": {key: searcher.index.manifest[key] for key in
                          ("variant", "step", "config_hash")},
                "took_ms": round(1000 * (time.perf_counter() - start), 1)}

    return app


def serve(searcher, host: str, port: int, max_rows: int, default_kind: str | None = None,
          wait_ms: float = 5.0) -> None:
    """Serves until interrupted."""
    uvicorn.run(create_app(searcher, max_rows, default_kind, wait_ms), host=host, port=port,
                log_level="info")


def _page(searcher, default_kind: str | None) -> str:
    m, e = searcher.index.manifest, html.escape
    kinds = "".join(f'<option{" selected" if k == (default_kind or searcher.kinds[0]) else ""}>'
                    f"{e(k)}</option>" for k in searcher.kinds)
    about = (f"{m['count']:,} items of {e(str(m['source'].get('split', '')))} · model "
             f"{e(str(m['variant']))} step {m['step']} · {e(m['config_hash'])}")
    return _PAGE.replace("{{about}}", about).replace("{{kinds}}", kinds)


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>CAPTURE search</title>
<style>body{font-family:sans-serif;margin:16px;color:#222}form{display:grid;
grid-template-columns:max-content 28em;gap:6px 10px;align-items:center;background:#eef3fb;
padding:10px;width:max-content}#preview{max-width:160px;max-height:160px;margin:8px 0}
#error{color:#b00020;font-weight:bold;margin:8px 0}.hits{display:grid;
grid-template-columns:repeat(5,160px);gap:10px}.hit{border:2px solid #1a5fb4;padding:4px;
font-size:12px}.hit img{width:128px;height:128px;object-fit:contain;background:#ddd;
display:block}.score{font-weight:bold;color:#1a5fb4}.t{max-height:3.6em;overflow:hidden}
.about{color:#555}</style></head><body><h1>CAPTURE search</h1><p class=about>{{about}}</p>
<form id=f><label for=image>picture</label><input id=image name=image type=file accept=image/*>
<label for=title>title</label><input id=title name=title placeholder="the product's title">
<label for=boxes>boxes</label><input id=boxes name=boxes placeholder="x1,y1,x2,y2;... (optional)">
<label for=k>items</label><input id=k name=k type=number value=10 min=1 max=100>
<label for=kind>feature kind</label><select id=kind name=kind>{{kinds}}</select>
<span></span><button id=go type=submit>Search</button></form>
<img id=preview alt=""><div id=error></div><div id=status></div><div id=hits class=hits></div>
<script>
const $ = id => document.getElementById(id);
$('image').onchange = () => { const f = $('image').files[0];
  if (f) $('preview').src = URL.createObjectURL(f); };
function esc(s) { const d = document.createElement('div'); d.textContent = s; return d.innerHTML; }
$('f').onsubmit = async ev => {
  ev.preventDefault(); $('error').textContent = ''; $('status').textContent = 'searching...';
  const r = await fetch('/api/search', {method: 'POST', body: new FormData($('f'))});
  const body = await r.json(); $('status').textContent = '';
  if (!r.ok) { $('error').textContent = body.detail; $('hits').innerHTML = ''; return; }
  $('status').textContent = body.results.length + ' items in ' + body.took_ms + ' ms';
  $('hits').innerHTML = body.results.map(h => '<div class=hit><img src="' + h.thumbnail +
    '" alt=""><div>#' + h.rank + ' <span class=score>' + h.score.toFixed(4) + '</span>' +
    (h.box ? ' (box ' + h.box + ')' : '') + '</div><div>' + esc(h.id) +
    '</div><div class=t>' + esc(h.title) + '</div></div>').join('');
  document.body.dataset.done = '1';
};
</script></body></html>"""
