"""The LLM judge: a rollout server serving a judge model, asked whether an answer is right.

DeepEyesV2 grades open-ended answers with an LLM judge. `JudgeClient.grade` asks a judge server
(the same `deepeyes.rollout.server`, started with the judge model) through a `RolloutClient`,
greedy, under a deadline. When the judge is slow, down, or answers something that is not a
verdict, the rule-based `deepeyes.reward.accuracy` (normalized match, then math-verify) grades
instead, and the fallback is counted by reason, so a run shows how much of its reward the judge
actually gave.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter

from deepeyes.reward import Grader, accuracy
from deepeyes.rollout.api import GenerateRequest, SamplingParams
from deepeyes.rollout.client import RolloutClient, RolloutRequestFailed, RolloutUnavailable

log = logging.getLogger(__name__)

JUDGE_PROMPT = """You are grading the final answer of a visual question answering model.
Compare the model's answer with the reference answer. Minor differences in wording, formatting,
units or letter case do not matter; the answer is correct only if it means the same as the reference.

Question: {question}
Reference answer: {ground_truth}
Model answer: {prediction}

Reply with exactly one line: "Judgement: 1" if the model answer is correct, "Judgement: 0" if not."""

_VERDICT = re.compile(r"judgement\s*:\s*([01])", re.IGNORECASE)


class JudgeClient:
    """Asynchronous, time-bounded judge with a counted rule-based fallback.

    `stats` counts "judged" (the judge's verdict was used) and "fallback_timeout",
    "fallback_unavailable", "fallback_unparsed" (the rule-based grade was used instead).
    """

    def __init__(
        self, client: RolloutClient, tokenizer, timeout_s: float, max_new_tokens: int = 16,
        fallback: Grader = accuracy,
    ):
        self.client = client
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self.max_new_tokens = max_new_tokens
        self.fallback = fallback
        self.stats: Counter[str] = Counter()

    def prompt_ids(self, prompt: str) -> list[int]:
        messages = [{"role": "user", "content": prompt}]
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    async def ask(self, prompt: str) -> str:
        """The judge's reply to one user message (greedy); RolloutUnavailable when no server answers."""
        request = GenerateRequest(self.prompt_ids(prompt), [], SamplingParams(self.max_new_tokens, temperature=0.0, stop=()))
        result = await self.client.generate(request)
        return self.tokenizer.decode(result.token_ids, skip_special_tokens=True)

    async def grade(self, question: str, prediction: str, ground_truth: str) -> float:
        """1.0 or 0.0 from the judge; the fallback's grade when the judge gives none in time."""
        prompt = JUDGE_PROMPT.format(question=question, ground_truth=ground_truth, prediction=prediction)
        try:
            reply = await asyncio.wait_for(self.ask(prompt), self.timeout_s)
        except TimeoutError:
            return self._fall_back("timeout", prediction, ground_truth)
        except RolloutUnavailable:
            return self._fall_back("unavailable", prediction, ground_truth)
        except RolloutRequestFailed as error:  # the judge server refused or failed this very prompt
            return self._fall_back(error.kind, prediction, ground_truth)
        verdict = _VERDICT.search(reply)
        if verdict is None:
            return self._fall_back("unparsed", prediction, ground_truth)
        self.stats["judged"] += 1
        return float(verdict.group(1))

    def _fall_back(self, reason: str, prediction: str, ground_truth: str) -> float:
        self.stats[f"fallback_{reason}"] += 1
        log.debug("judge %s: rule-based accuracy grades %r", reason, prediction)
        return self.fallback(prediction, ground_truth)

    async def close(self) -> None:
        await self.client.close()
