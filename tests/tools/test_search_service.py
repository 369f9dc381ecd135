"""The search service: a real process on loopback behind SearchClient, and its cache, bounds and
backends."""

import asyncio
import json
import urllib.error
import urllib.request

import pytest
from aiohttp import web

from deepeyes.agent import protocol
from deepeyes.agent.runtime import build_toolbox
from deepeyes.agent.tool_session import Toolbox
from deepeyes.config import CodeToolConfig, ToolsConfig
from deepeyes.service import (
    LocalService, free_port, local_services, new_token_file, python_module, read_token,
)
from deepeyes.tools import LocalImageSearch, LocalTextSearch, SandboxClient
from deepeyes.tools.search_service import (
    LocalSearch, SearchClient, SearchError, SearchServer, SerpAPISearch,
)


@pytest.fixture(scope="module")
def service(sample_data, tmp_path_factory):
    logs = tmp_path_factory.mktemp("search")
    token_file = new_token_file(logs)
    port = free_port()
    argv = python_module(
        "deepeyes.tools.search_service", "--port", port, "--token-file", token_file,
        "--corpus", sample_data.corpus, "--image-index", sample_data.image_index,
    )
    search = LocalService("search", argv, port, read_token(token_file), logs / "search.log")
    with local_services([search], ready_timeout_s=60):
        yield search


def run(coroutine_fn):
    return asyncio.run(coroutine_fn())


@pytest.mark.slow
def test_the_service_answers_as_the_local_indexes_do(service, sample_data):
    text = LocalTextSearch.from_jsonl(sample_data.corpus)
    images = LocalImageSearch.from_jsonl(sample_data.image_index)
    query_image = next(p for p in (sample_data.root / "images").rglob("*.png") if images.search(p))
    client = SearchClient(service.url, service.token)

    async def both():
        try:
            return await client.search("flag of the country", 5), await client.image_search(query_image, 3)
        finally:
            await client.close()

    hits, image_hits = run(both)
    assert hits == text.search("flag of the country", 5) and hits
    assert image_hits == images.search(query_image, 3) and image_hits


@pytest.mark.slow
def test_requests_without_the_job_token_are_refused(service):
    for path, data in (("/health", None), ("/search", b'{"query": "x", "k": 1}')):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(service.url + path, data=data), timeout=10)
        assert refused.value.code == 401


@pytest.mark.slow
def test_repeated_queries_are_answered_from_the_cache(service):
    client = SearchClient(service.url, service.token)

    async def three():
        try:
            return [await client.search("capital city", 5) for _ in range(3)]
        finally:
            await client.close()

    first, *again = run(three)
    assert all(hits == first for hits in again)
    info = urllib.request.Request(service.url + "/info", headers={"Authorization": f"Bearer {service.token}"})
    with urllib.request.urlopen(info, timeout=10) as reply:
        assert json.load(reply)["cache_hits"] >= 2


@pytest.mark.slow
def test_a_tool_session_searches_through_the_client(service, sample_data, tmp_path):
    no_code = SandboxClient(f"http://127.0.0.1:{free_port()}", "unused")  # these sessions only search
    remote = Toolbox(SearchClient(service.url, service.token), no_code, tmp_path)
    local = Toolbox(LocalSearch.from_files(sample_data.corpus, sample_data.image_index), no_code, tmp_path)
    down = Toolbox(SearchClient(f"http://127.0.0.1:{free_port()}", service.token), no_code, tmp_path)

    async def observe(toolbox):
        session = toolbox.session("s", [])
        try:
            return await session.execute(protocol.SearchCall("flag colors"))
        finally:
            await session.close()
            if isinstance(toolbox.search, SearchClient):
                await toolbox.search.close()

    assert run(lambda: observe(remote)).text == run(lambda: observe(local)).text
    failed = run(lambda: observe(down))
    assert (failed.text, failed.call.ok) == (protocol.SEARCH_ERROR, False)


class SlowSearch:
    """A backend that takes `delay_s` per call and records how many calls overlap."""

    def __init__(self, delay_s):
        self.delay_s, self.active, self.most_active = delay_s, 0, 0

    async def search(self, query, k):
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await asyncio.sleep(self.delay_s)
            return [protocol.TextHit(query, "https://example.org")]
        finally:
            self.active -= 1

    async def image_search(self, image, k):
        raise SearchError("no image search here")


async def serve_in_process(server):
    runner = web.AppRunner(server.app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def test_backend_calls_are_bounded_in_number_and_time(tmp_path):
    token = read_token(new_token_file(tmp_path))

    async def scenario():
        bounded, slow = SlowSearch(0.05), SlowSearch(5.0)
        runner, url = await serve_in_process(SearchServer(bounded, token, max_concurrency=2, timeout_s=2))
        slow_runner, slow_url = await serve_in_process(SearchServer(slow, token, max_concurrency=2, timeout_s=0.1))
        client, slow_client = SearchClient(url, token), SearchClient(slow_url, token)
        try:
            await asyncio.gather(*(client.search(f"q{i}", 1) for i in range(6)))
            with pytest.raises(SearchError, match="504"):
                await slow_client.search("anything", 1)
            return bounded.most_active
        finally:
            await client.close(), await slow_client.close()
            await runner.cleanup(), await slow_runner.cleanup()

    assert run(scenario) == 2


def test_a_job_searching_in_process_uses_its_configured_backends(tmp_path, sample_data):
    """Evaluation, the filter and synthesis search in their own process (`build_toolbox` without a
    service): tools.image_search_backend=mmsearch_cache answers images from the MMSearch cache,
    keyed by the job's records, while the text search stays on the local corpus."""
    records = [json.loads(line) for line in sample_data.rl_train.read_text().splitlines()][:2]
    for i, record in enumerate(records):
        record["metadata"]["index"] = f"fvqa_{i}"
        record["images"] = [str(sample_data.rl_train.parent / image) for image in record["images"]]
    rl = tmp_path / "rl.jsonl"
    rl.write_text("".join(json.dumps(r) + "\n" for r in records))
    cached = sorted((sample_data.root / "images").rglob("*.png"))[-2:]
    cache = tmp_path / "cache.json"
    cache.write_text(json.dumps({
        "fvqa_0": {"tool_returned_web_title": ["first", "gone"], "cached_images_path": [str(cached[0]), None]},
        "fvqa_1": {"tool_returned_web_title": ["second"], "cached_images_path": [str(cached[1])]},
    }))
    token_file = new_token_file(tmp_path)  # a sandbox pool that is never called: this test searches only
    tools = ToolsConfig(CodeToolConfig(urls=["http://127.0.0.1:9"], token_file=str(token_file)),
                        image_search_backend="mmsearch_cache", search_cache=str(cache),
                        search_cache_images=str(sample_data.root))
    toolbox = build_toolbox(tools, sample_data.corpus, sample_data.image_index, tmp_path / "scratch", records=rl)
    hits = run(lambda: toolbox.search.image_search(records[1]["images"][0], 5))
    assert [(title, path.resolve()) for title, path in hits] == [("second", cached[1].resolve())]
    assert run(lambda: toolbox.search.search("capital", 3))  # the corpus, not the cache
    with pytest.raises(ValueError, match="tools.search_cache"):
        build_toolbox(ToolsConfig(tools.code, image_search_backend="mmsearch_cache"), sample_data.corpus, None,
                      tmp_path / "scratch", records=rl)


def test_serpapi_needs_its_key_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SERPAPI_API_KEY", raising=False)
    with pytest.raises(SearchError, match="SERPAPI_API_KEY"):
        SerpAPISearch(tmp_path)
