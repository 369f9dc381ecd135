"""The OpenAI chat-completions wire format, both sides.

Server side, the rollout server answers `POST /v1/chat/completions` (text and images as
`data:` URLs) with its own engine: `chat_request_from_json` turns the messages into the token ids
and image files the engine takes, `chat_completion_json` the engine's result into the reply.
Client side, `image_data_url` encodes an image file for a message. Only what the synthesis
teacher and OpenAI-compatible tools need is supported: one choice (`n=1`), no streaming, no tools.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import mimetypes
import secrets
import time
from pathlib import Path
from typing import Any

from PIL import Image

from deepeyes.agent.chat import ChatEncoder
from deepeyes.rollout.api import BadRequest, GenerateRequest, GenerateResult, SamplingParams

DEFAULT_MAX_TOKENS = 1024
_ROLES = ("system", "user", "assistant")


@functools.lru_cache(maxsize=64)  # ~4 MB each for a 3 MP photo: bounded host memory
def _data_url(path: str, mtime_ns: int, size: int) -> str:
    kind = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{kind};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def image_data_url(path: Path) -> str:
    """The file as a `data:` URL, encoded once per file version (the k attempts of a question
    send the same image k times per turn)."""
    stat = Path(path).stat()
    return _data_url(str(path), stat.st_mtime_ns, stat.st_size)


def _image_file(url: Any, image_dir: Path) -> Path:
    """A `data:` URL saved as `<sha256>.<ext>` in `image_dir` (once per content)."""
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise BadRequest("image_url.url must be a data:<mime>;base64,<bytes> URL (the server fetches nothing)")
    header, payload = url[len("data:"):].split(";base64,", 1)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadRequest(f"image_url is not valid base64: {error}") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for broken files
        raise BadRequest(f"image_url ({header or 'no mime type'}) is not a readable image: {error}") from None
    path = image_dir / (hashlib.sha256(raw).hexdigest() + (mimetypes.guess_extension(header) or ".img"))
    if not path.exists():
        partial = path.with_suffix(".part" + secrets.token_hex(4))
        partial.write_bytes(raw)
        partial.replace(path)
    return path


def _message_ids(message: Any, index: int, encoder: ChatEncoder, image_dir: Path) -> tuple[list[int], list[Path]]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in _ROLES:
        raise BadRequest(f"{where} must be an object with role one of {', '.join(_ROLES)}")
    content = message.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise BadRequest(f"{where}.content must be a string or a list of parts")
    ids, images = encoder.header(message["role"]), []
    for number, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            ids += encoder.text(part["text"])  # a literal "<image>" in text stays text
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            images.append(_image_file(part["image_url"].get("url"), image_dir))
            ids += encoder.image(images[-1])
        else:
            raise BadRequest(f"{where}.content[{number}] must be a text or image_url part")
    return ids + [encoder.im_end] + encoder.newline, images


def chat_request_from_json(body: Any, encoder: ChatEncoder, image_dir: Path) -> GenerateRequest:
    """The generation a chat-completions body asks for: the Qwen2.5 chat template over its
    messages, ending where the assistant's reply begins. BadRequest names what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    if body.get("n", 1) != 1 or body.get("stream"):
        raise BadRequest("only n=1 without streaming is supported")
    ids: list[int] = []
    images: list[Path] = []
    for index, message in enumerate(messages):
        message_ids, message_images = _message_ids(message, index, encoder, image_dir)
        ids += message_ids
        images += message_images
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    seed = body.get("seed")
    try:
        sampling = SamplingParams(
            max_new_tokens=int(body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS),
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            stop=tuple(str(s) for s in stop),
            seed=secrets.randbits(31) if seed is None else int(seed),  # unseeded requests differ, as OpenAI's do
        )
    except (TypeError, ValueError) as error:
        raise BadRequest(f"sampling parameters are invalid: {error!r}") from None
    if sampling.max_new_tokens <= 0 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
        raise BadRequest(f"sampling parameters out of range: {sampling}")
    return GenerateRequest(ids + encoder.header("assistant"), images, sampling)


def error_json(message: str) -> dict[str, Any]:
    """An error body as OpenAI clients read it (they show `error.message`)."""
    return {"error": {"message": message, "type": "invalid_request_error"}}


def chat_completion_json(
    request: GenerateRequest, result: GenerateResult, encoder: ChatEncoder, model: str
) -> dict[str, Any]:
    """The reply, with OpenAI's semantics: the content ends before the stop string that ended it,
    and finish_reason is "stop" (end of turn or a stop string) or "length"."""
    text = encoder.decode(result.token_ids)
    if result.finish_reason == "stop":
        text = text[: min(text.find(s) for s in request.sampling.stop if s in text)]
    return {
        "id": "chatcmpl-" + secrets.token_hex(12),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length" if result.finish_reason == "length" else "stop",
            "logprobs": None,
        }],
        "usage": {
            "prompt_tokens": len(request.input_ids),
            "completion_tokens": len(result.token_ids),
            "total_tokens": len(request.input_ids) + len(result.token_ids),
        },
    }
