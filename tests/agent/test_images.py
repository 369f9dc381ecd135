"""Images by reference through the agent loop: one stored copy per prompt and per returned image,
pixels decoded where they are consumed, nothing left after the step, the pixel budget kept.

A scripted policy stands in for the model (a random tiny model writes no code); it consumes each
request's images exactly as the hf engine does (`request_inputs`). The sandbox is the real daemon.
"""

import asyncio
import os

import numpy as np
import psutil
import pytest
from PIL import Image

from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.loop import EpisodeLimits, rollout
from deepeyes.agent.tool_session import Toolbox, clear_scratch
from deepeyes.data.schema import Record
from deepeyes.model import load_processor
from deepeyes.model.pixels import PixelCache
from deepeyes.rollout.api import GenerateResult
from deepeyes.rollout.hf_engine import request_inputs
from deepeyes.tools import LocalSandbox, SandboxLimits
from deepeyes.tools.search_service import LocalSearch
from deepeyes.train.forward import TokenSequence, sequence_inputs

LIMITS = EpisodeLimits(max_turns=3, max_turn_tokens=256, max_response_tokens=4096)


class CropPolicy:
    """Turn 1 crops `box(seed)` out of image_1 and shows it; turn 2 answers."""

    def __init__(self, encoder: ChatEncoder, pixels: PixelCache, pad_id: int, box=lambda seed: (0, 0, 200, 150)):
        self._encoder, self._pixels, self._pad_id, self._box = encoder, pixels, pad_id, box

    async def generate(self, request) -> GenerateResult:
        request_inputs([request], self._pixels, self._pad_id)  # decoded where consumed, as the engine does
        if request.input_ids.count(self._encoder.im_start) == 3:  # system, user, assistant: the first turn
            code = f"display(image_1.crop({self._box(request.sampling.seed)}))"
            ids = self._encoder.content(f"<think>zoom</think>\n<code>\n```python\n{code}\n```\n</code>", [])
            return GenerateResult(ids, [-0.5] * len(ids), "stop", 0)
        ids = self._encoder.content("<think>done</think>\n<answer>7</answer>", []) + [self._encoder.im_end]
        return GenerateResult(ids, [-0.5] * len(ids), "eos", 0)

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def parts(tiny_dir, sample_data, tmp_path_factory):
    processor = load_processor(tiny_dir)
    sandbox = LocalSandbox(tmp_path_factory.mktemp("sandbox"), SandboxLimits(timeout_s=20))
    search = LocalSearch.from_files(sample_data.corpus, sample_data.image_index)
    yield processor, sandbox, search
    sandbox.close()


@pytest.fixture
def setup(parts, tmp_path):
    processor, sandbox, search = parts
    pixels = PixelCache(processor.image_processor, 3136, 50176)
    encoder = ChatEncoder(processor.tokenizer, pixels.tokens)
    toolbox = Toolbox(search, sandbox, tmp_path / "store", image_pixels=pixels.pixels, max_trajectory_pixels=802816)
    photo = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(photo, quality=90)
    record = Record("r0", "What is shown?", (photo,), "7", "perception")
    return pixels, encoder, toolbox, record, processor.tokenizer.pad_token_id


def test_two_rollouts_of_one_prompt_share_one_stored_image(setup):
    pixels, encoder, toolbox, record, pad_id = setup
    policy = CropPolicy(encoder, pixels, pad_id)
    first, second = asyncio.run(rollout([record], 2, 0, 0, policy, encoder, toolbox, LIMITS, progress=False))

    assert first.finish == second.finish == "answer" and len(first.images) == len(second.images) == 2
    assert first.images[0] == second.images[0] and first.images[1] == second.images[1]
    stored = toolbox.store.files()
    assert sorted(stored) == sorted(first.images)  # the prompt image and the one crop both returned
    assert os.stat(first.images[0]).st_ino == os.stat(record.images[0]).st_ino  # a link: no second copy
    assert pixels.processed == 2  # four requests, two distinct images, each decoded once


def test_images_over_the_trajectory_budget_are_counted_not_shown(setup):
    pixels, encoder, toolbox, record, pad_id = setup
    toolbox.max_trajectory_pixels = pixels.pixels(record.images[0]) + 1000  # the prompt fits, the crop does not
    (trajectory,) = asyncio.run(rollout([record], 1, 0, 0, CropPolicy(encoder, pixels, pad_id), encoder, toolbox,
                                        LIMITS, progress=False))
    assert trajectory.images_dropped == 1 and len(trajectory.images) == 1
    assert "1 image(s) not shown" in encoder.decode(trajectory.response_ids)

    toolbox.max_trajectory_pixels = pixels.pixels(record.images[0]) - 1
    with pytest.raises(ValueError, match="model.max_trajectory_pixels"):
        asyncio.run(rollout([record], 1, 0, 0, CropPolicy(encoder, pixels, pad_id), encoder, toolbox, LIMITS,
                            progress=False))


def test_images_are_released_after_every_step_no_growth_over_20_steps(setup):
    pixels, encoder, toolbox, record, pad_id = setup
    # Every step crops elsewhere: new images each step, as training brings.
    policy = CropPolicy(encoder, pixels, pad_id, box=lambda seed: (seed % 400, seed % 300, seed % 400 + 500, seed % 300 + 400))
    process = psutil.Process()
    rss = []
    for step in range(20):
        trajectories = asyncio.run(rollout([record], 2, step, 0, policy, encoder, toolbox, LIMITS, progress=False))
        assert len(toolbox.store.files()) == 3  # the prompt image and two distinct crops
        sequence_inputs(pixels, [TokenSequence(t.input_ids, t.images, [0] * len(t.input_ids)) for t in trajectories],
                        pad_id)  # the update consumes them once more
        del trajectories
        pixels.release()
        clear_scratch(toolbox.scratch_root)
        assert toolbox.store.files() == [] and len(pixels) == pixels.bytes == 0
        rss.append(process.memory_info().rss)
    # Kept per step, the decoded 1024 x 768 prompt and its processed pixels would add > 3 MB a step.
    assert rss[-1] - rss[4] < 16 << 20, [round(r / 2**20) for r in rss]
