"""The search service: text search and image search behind one HTTP API and one client.

    python -m deepeyes.tools.search_service --port P --token-file F \
        --text-backend local --corpus corpus.jsonl \
        --image-backend local --image-index image_index.jsonl      # or: mmsearch_cache / serpapi

Backends (anything with `async search(query, k)` and `async image_search(image, k)`):

- `local` (default): BM25 over the bundled corpus, image lookup by sha256 (`deepeyes.tools.search`).
- `serpapi`: Google web search and Google Lens through SerpAPI; the key comes from the
  environment (`SERPAPI_API_KEY`), results are cached on disk first (a repeated query is never
  billed twice). Google Lens fetches the query image by URL, so images must be published under
  `--image-url-base`.
- `mmsearch_cache`: the MMSearch-R1 image-search cache DeepEyesV2 distributes
  (`{sample_id: {tool_returned_web_title, cached_images_path}}`), turned into a local image index
  at start by `deepeyes.data.converters.convert_image_search_cache` (it needs the RL records to
  know each sample's image).

The service answers from an in-memory cache first (the n rollouts of a prompt tend to ask the
same query; at most `--cache-mb` of queries and answers), runs at most `--max-concurrency`
backend calls at once and bounds each by `--timeout-s` (504). It reads a query image only under
its roots (the image index's directory and each `--image-root`), at most 64 MB of it, off the
event loop; an image store's file (named by its hash) is looked up by its name without being
read. `SearchClient` is the only code that speaks this wire format; `build_search` gives a job
that runs no service the same backends in its own process.

    POST /search        {query, k}  -> {results: [{title, link, snippet, date}]}
    POST /image_search  {image, k}  -> {results: [{title, image}]}     (image: a path on the shared filesystem)
    GET  /info, /health, /ready
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
from collections import Counter, OrderedDict
from dataclasses import asdict
from json import JSONDecodeError
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from deepeyes.agent.protocol import TextHit
from deepeyes.service import add_service_args, auth_headers, error_response, read_token, serve, service_app
from deepeyes.tools.search import STORED_NAME, LocalImageSearch, LocalTextSearch, content_key

log = logging.getLogger("deepeyes.tools.search_service")

ImageHit = tuple[str, Path]  # (title, image file)
MAX_QUERY_CHARS = 4096
MAX_QUERY_IMAGE_BYTES = 64 << 20


class SearchError(RuntimeError):
    """A search that could not be answered (backend down, timeout, no index); the model sees
    the protocol's 'Search error' observation and the tool call is counted as failed."""


class Search(Protocol):
    async def search(self, query: str, k: int) -> list[TextHit]: ...

    async def image_search(self, image: Path, k: int) -> list[ImageHit]: ...

    async def close(self) -> None:
        """Release what the calls of the running event loop opened (jobs run one loop per step)."""


class LoopSession:
    """An aiohttp session for the running event loop: jobs call asyncio.run once per step or
    batch, and a session cannot outlive the loop it was made in."""

    def __init__(self, **options: Any):
        self._options = options
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def current(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:
            self._session, self._loop = aiohttp.ClientSession(**self._options), loop
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = None


# ---- backends --------------------------------------------------------------------------------


class LocalSearch:
    """The local indexes, in process. Either may be missing: that search then raises SearchError."""

    def __init__(self, text: LocalTextSearch | None = None, image: LocalImageSearch | None = None):
        self.text = text
        self.image = image

    @classmethod
    def from_files(cls, corpus: Path | None, image_index: Path | None) -> LocalSearch:
        return cls(
            LocalTextSearch.from_jsonl(corpus) if corpus else None,
            LocalImageSearch.from_jsonl(image_index) if image_index else None,
        )

    async def search(self, query: str, k: int) -> list[TextHit]:
        if self.text is None:
            raise SearchError("no text-search corpus is configured")
        return await asyncio.to_thread(self.text.search, query, k)

    async def image_search(self, image: Path, k: int) -> list[ImageHit]:
        if self.image is None:
            raise SearchError("no image-search index is configured")
        return await asyncio.to_thread(self.image.search, image, k)

    async def close(self) -> None:
        pass  # nothing open: the indexes are in memory


def mmsearch_cache_search(cache: Path, cache_images: Path, records: Path, work_dir: Path) -> LocalSearch:
    """Image search over the MMSearch-R1 cache, converted to our index once per start (service or job)."""
    from deepeyes.data.converters import convert_image_search_cache

    work_dir.mkdir(parents=True, exist_ok=True)
    index = work_dir / "mmsearch_image_index.jsonl"
    conversion = convert_image_search_cache(cache, cache_images, records, index)
    log.info("mmsearch cache %s: %s", cache, conversion)
    return LocalSearch(image=LocalImageSearch.from_jsonl(index))


class SerpAPISearch:
    """Google search (`engine=google`) and Google Lens (`engine=google_lens`) through SerpAPI.

    Every answer is kept in `<cache_dir>/serpapi.jsonl` and looked up there first.
    """

    ENDPOINT = "https://serpapi.com/search.json"

    def __init__(self, cache_dir: Path, image_url_base: str | None = None, timeout_s: float = 20.0,
                 api_key_env: str = "SERPAPI_API_KEY"):
        self._key = os.environ.get(api_key_env, "")
        if not self._key:
            raise SearchError(f"the serpapi search backend needs an API key in the environment variable {api_key_env}")
        self._image_url_base = image_url_base.rstrip("/") if image_url_base else None
        self._cache_dir = Path(cache_dir)
        (self._cache_dir / "images").mkdir(parents=True, exist_ok=True)
        self._cache_file = self._cache_dir / "serpapi.jsonl"
        self._cache: dict[str, Any] = {}
        if self._cache_file.is_file():
            for line in self._cache_file.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self._cache[entry["key"]] = entry["reply"]
        self._http = LoopSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def search(self, query: str, k: int) -> list[TextHit]:
        reply = await self._get({"engine": "google", "q": query, "num": max(k, 10)})
        return [
            TextHit(r.get("title", ""), r.get("link", ""), r.get("snippet", ""), r.get("date", ""))
            for r in reply.get("organic_results", [])[:k]
        ]

    async def image_search(self, image: Path, k: int) -> list[ImageHit]:
        if self._image_url_base is None:
            raise SearchError("serpapi image search needs --image-url-base: Google Lens fetches the image by URL")
        reply = await self._get({"engine": "google_lens", "url": f"{self._image_url_base}/{Path(image).name}"})
        hits = []
        for match in reply.get("visual_matches", []):
            if len(hits) == k:
                break
            if match.get("thumbnail"):
                hits.append((match.get("title", ""), await self._download(match["thumbnail"])))
        return hits

    async def _get(self, params: dict[str, Any]) -> dict[str, Any]:
        key = json.dumps(params, sort_keys=True)
        if key in self._cache:
            return self._cache[key]
        try:
            async with self._http.current().get(self.ENDPOINT, params={**params, "api_key": self._key}) as response:
                reply = await response.json(content_type=None)
                if response.status != 200 or "error" in reply:
                    raise SearchError(f"serpapi {params.get('engine')} answered {response.status}: {reply.get('error')}")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise SearchError(f"serpapi unreachable: {type(error).__name__}: {error}") from None
        self._cache[key] = reply
        with open(self._cache_file, "a", encoding="utf-8") as out:
            out.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")
        return reply

    async def _download(self, url: str) -> Path:
        path = self._cache_dir / "images" / (hashlib.sha256(url.encode()).hexdigest() + ".jpg")
        if not path.is_file():
            async with self._http.current().get(url) as response:
                if response.status != 200:
                    raise SearchError(f"result image {url} answered {response.status}")
                partial = path.with_suffix(".partial")
                partial.write_bytes(await response.read())
                os.replace(partial, path)
        return path

    async def close(self) -> None:
        await self._http.close()


class CombinedSearch:
    """Text search from one backend, image search from another."""

    def __init__(self, text: Search, image: Search):
        self.text, self.image = text, image

    async def search(self, query: str, k: int) -> list[TextHit]:
        return await self.text.search(query, k)

    async def image_search(self, image: Path, k: int) -> list[ImageHit]:
        return await self.image.image_search(image, k)

    async def close(self) -> None:
        await self.text.close()
        if self.image is not self.text:
            await self.image.close()


# ---- the client ------------------------------------------------------------------------------


class SearchClient:
    """`Search` over HTTP; any failure is a SearchError."""

    def __init__(self, url: str, token: str, timeout_s: float = 30.0):
        self.url = url
        self._http = LoopSession(headers=auth_headers(token), timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def search(self, query: str, k: int) -> list[TextHit]:
        reply = await self._post("/search", {"query": query, "k": k})
        return [TextHit(r["title"], r["link"], r["snippet"], r["date"]) for r in reply["results"]]

    async def image_search(self, image: Path, k: int) -> list[ImageHit]:
        reply = await self._post("/image_search", {"image": str(image), "k": k})
        return [(r["title"], Path(r["image"])) for r in reply["results"]]

    async def _post(self, path: str, body: dict) -> dict:
        try:
            async with self._http.current().post(self.url + path, json=body) as response:
                reply = await response.json(content_type=None)
                if response.status != 200:
                    raise SearchError(f"search service {self.url}{path} answered {response.status}: {reply.get('error')}")
                return reply
        except (aiohttp.ClientError, TimeoutError, JSONDecodeError) as error:
            raise SearchError(f"search service {self.url}{path} failed: {type(error).__name__}: {error}") from None

    async def close(self) -> None:
        await self._http.close()


# ---- the server ------------------------------------------------------------------------------


class SearchServer:
    def __init__(self, backend: Search, token: str, max_concurrency: int = 16, timeout_s: float = 20.0,
                 cache_bytes: int = 64 << 20, image_roots: tuple[Path, ...] = ()):
        self.backend = backend
        self.timeout_s = timeout_s
        self.image_roots = tuple(Path(os.path.realpath(root)) for root in image_roots)
        self.counts: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(max_concurrency)
        self._cache: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()  # key -> (results, bytes)
        self._cache_bytes = cache_bytes
        self.cached_bytes = 0
        self.app = service_app(token)
        self.app.router.add_post("/search", self.text)
        self.app.router.add_post("/image_search", self.image)
        self.app.router.add_get("/info", self.info)

    async def text(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        query, k = body.get("query"), body.get("k", 5)
        if not isinstance(query, str) or not isinstance(k, int) or k <= 0:
            return error_response(400, "bad /search request: expected {query: str, k: int > 0}")
        if len(query) > MAX_QUERY_CHARS:
            return error_response(400, f"bad /search request: the query has {len(query)} characters, at most {MAX_QUERY_CHARS}")
        return await self._answer(("text", query, k), lambda: self.backend.search(query, k),
                                  lambda hits: [asdict(hit) for hit in hits])

    async def image(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        image, k = body.get("image"), body.get("k", 5)
        if not isinstance(image, str) or not isinstance(k, int) or k <= 0:
            return error_response(400, "bad /image_search request: expected {image: path, k: int > 0}")
        if STORED_NAME.fullmatch(Path(image).name):
            key = content_key(image)  # the name says it: nothing is read
        else:
            resolved = Path(os.path.realpath(image))
            if not any(resolved == root or root in resolved.parents for root in self.image_roots):
                return error_response(400, f"query image {image} is outside the search service's image roots "
                                           f"({', '.join(map(str, self.image_roots))})")
            try:
                key = await asyncio.to_thread(content_key, resolved, MAX_QUERY_IMAGE_BYTES)
            except (OSError, ValueError) as error:
                return error_response(400, f"query image {image} cannot be read: {error}")
        return await self._answer(("image", key, k), lambda: self.backend.image_search(Path(image), k),
                                  lambda hits: [{"title": title, "image": str(path)} for title, path in hits])

    async def _answer(self, key: tuple, call, to_json) -> web.Response:
        if key in self._cache:
            self._cache.move_to_end(key)
            self.counts["cache_hits"] += 1
            return web.json_response({"results": self._cache[key][0]})
        try:
            async with self._slots:
                results = to_json(await asyncio.wait_for(call(), self.timeout_s))
        except TimeoutError:
            self.counts["timeouts"] += 1
            return error_response(504, f"search backend took longer than {self.timeout_s}s")
        except SearchError as error:
            self.counts["errors"] += 1
            return error_response(502, str(error))
        self.counts["backend_calls"] += 1
        self._remember(key, results)
        return web.json_response({"results": results})

    def _remember(self, key: tuple, results: Any) -> None:
        """Cache an answer within the byte budget (query and answer both count), oldest out first."""
        size = len(json.dumps([key, results])) + sys.getsizeof(key)
        if size > self._cache_bytes // 8:
            return  # one huge entry would push out everything else
        self._cache[key] = (results, size)
        self.cached_bytes += size
        while self.cached_bytes > self._cache_bytes:
            _, (_, dropped) = self._cache.popitem(last=False)
            self.cached_bytes -= dropped

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({**self.counts, "cached_bytes": self.cached_bytes, "cached_entries": len(self._cache)})


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except JSONDecodeError:
        raise web.HTTPBadRequest(text="body is not JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


TEXT_BACKENDS = ("local", "serpapi")
IMAGE_BACKENDS = ("local", "serpapi", "mmsearch_cache")


def build_search(
    text_backend: str, image_backend: str, work_dir: Path, *, corpus: Path | None = None,
    image_index: Path | None = None, timeout_s: float = 20.0, image_url_base: str | None = None,
    mmsearch_cache: Path | None = None, mmsearch_images: Path | None = None, records: Path | None = None,
) -> Search:
    """The named backends: what this service answers with, and what a job searches with in its own
    process (evaluation, the difficulty filter, synthesis, an RL job without services). `work_dir`
    holds the serpapi cache and the converted MMSearch index."""
    local = LocalSearch.from_files(corpus if text_backend == "local" else None,
                                   image_index if image_backend == "local" else None)
    serpapi = SerpAPISearch(work_dir, image_url_base, timeout_s) if "serpapi" in (text_backend, image_backend) else None
    text = serpapi if text_backend == "serpapi" else local
    if image_backend == "mmsearch_cache":
        if not (mmsearch_cache and mmsearch_images and records):
            raise ValueError("the mmsearch_cache image backend needs the cache JSON, the folder of its images and the "
                             "RL records (tools.search_cache, tools.search_cache_images, tools.search_cache_records or "
                             "data.train; the service's --mmsearch-cache, --mmsearch-images, --records)")
        image: Search = mmsearch_cache_search(mmsearch_cache, mmsearch_images, records, work_dir)
    else:
        image = serpapi if image_backend == "serpapi" else local
    return CombinedSearch(text, image)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-backend", choices=TEXT_BACKENDS, default="local")
    parser.add_argument("--image-backend", choices=IMAGE_BACKENDS, default="local")
    parser.add_argument("--corpus", type=Path, help="local text backend: corpus.jsonl")
    parser.add_argument("--image-index", type=Path, help="local image backend: image_index.jsonl")
    parser.add_argument("--mmsearch-cache", type=Path, help="mmsearch_cache backend: the cache JSON")
    parser.add_argument("--mmsearch-images", type=Path, help="the folder its cached_images_path are relative to")
    parser.add_argument("--records", type=Path, help="the RL records the cache's sample ids refer to")
    parser.add_argument("--cache-dir", type=Path, default=Path("search_cache"), help="serpapi / converted caches")
    parser.add_argument("--image-url-base", help="serpapi image backend: public URL prefix of query images")
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=20.0)
    parser.add_argument("--cache-mb", type=int, default=64, help="queries and answers kept in memory")
    parser.add_argument("--image-root", type=Path, action="append", default=[],
                        help="query images may be read under it (beside the image index's directory)")
    add_service_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    roots = [*args.image_root, *([args.image_index.parent] if args.image_index else []),
             *([args.mmsearch_images] if args.mmsearch_images else [])]
    backend = build_search(
        args.text_backend, args.image_backend, args.cache_dir, corpus=args.corpus, image_index=args.image_index,
        timeout_s=args.timeout_s, image_url_base=args.image_url_base, mmsearch_cache=args.mmsearch_cache,
        mmsearch_images=args.mmsearch_images, records=args.records,
    )
    server = SearchServer(backend, read_token(args.token_file), args.max_concurrency, args.timeout_s,
                          args.cache_mb << 20, tuple(roots))
    serve(server.app, args)


if __name__ == "__main__":
    main()
