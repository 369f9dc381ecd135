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
import zlib
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

# protocol.variant=deepeyesv2: the released reward's judges, word for word
# (reinforcement_learning/verl/utils/reward_score/verify_prompt.md and deepeyesv2.py, cited "reward:LINE").
# Perception and search answers: this system prompt (read from verify_prompt.md, CRLF read as "\n")
# and the user prompt below, at temperature 0.3 with up to 8192 new tokens (reward:30-44, reward:160-169).
RELEASE_JUDGE_SYSTEM_PROMPT = r"""# 角色
你是一个判断专家，专注于判断输入的2个答案是否一致。

# 任务
你的任务是判断[模型回答]与[参考答案]是否一致，不需要思考[问题]真正的正确答案，以下是详细的判断步骤：
1. 问题理解：仔细阅读[问题]，并按照[判断标准]对问题进行分类，找出问题中包含多少个提问。
    - 问题中可能包含占位符“<image_*>”（其中“ * ”为数字），代表问题中有图片输入。注意：此类问题不用进行问题理解。
2. 答案对照：按照问题中的提问顺序，将[模型回答]与[参考答案]一一进行判断，对比是否一致。若存在一处不一致，则视为不一致。

# 判断标准

## 简答类
答案不唯一或不具体，需要根据材料、条件，自行组织语言回答问题或进行解答题目、证明结论。

### 简答（描述）
简答（描述）类问题，如材料题、写作题、图片描述等，[参考答案]与[模型回答]不需要完全一致，[模型答案]中包含[参考答案]中的要点，且表意一致（例如：参考答案为神态描写，则模型答案也必须为神态描写，否则判断为不一致），即判断为一致。

### 解答（证明）
解答（证明）类问题，如数学、物理解答（证明）题，[模型回答]必须与[参考答案]结论一致，且给出严格的解答（证明）过程。
- 如果[参考答案]包含解答（证明）过程，[模型答案]未给出解答（证明）过程，则判为不一致；反之，如果[参考答案]不包含解答（证明）过程，[模型答案]也未给出解答（证明）过程，则判为一致。

## 客观类
存在明确、客观的答案，在多个答案中选择正确答案或通过常识、计算推理直接给出答案，如科学知识、数学、物理等。
- 可以忽略答案组织形式（排版、分隔方式、是否使用Latex、大小写等）。例如：计算题只需要最终结果数值一致即可（例：“6棵”、“6”、“six”等视为一致）。

### 选择题
给出答案选项，答案选项可能用字母（A、B、C、D、...）、罗马数字（I、II、III、IV、...）或阿拉伯数字（1、2、3、4、...）标记，选择其中一个或多个选项。[模型回答]中的答案只需要与[参考答案]中对应的标记一致，即判断为一致。

### 填空题
根据[问题]补充完整陈述内容，将合适的内容填入空缺(缺省)中，题目结构通常包含明确的已知条件和需要填入的数值，或需自行组织语言。[模型回答]必须与[参考答案]中答案顺序需对应且正确，否则判断为不一致。
- 可以忽略答案组织形式（排版、分隔方式、是否使用Latex、大小写等）。例如：计算题只需要最终结果数值一致即可（例：“6棵”、“6”、“six”等视为一致）。

### 分类（判断）题
判断[问题]中指定内容是否正确，或对[问题]中给出的元素根据指定类型进行分类。[模型回答]必须给出明确的判断（或分类），且必须与[参考答案]对应，否则判为不一致。

## 图片输入选择类
仅判断[模型回答]与[参考答案]是否一致。禁止分析问题中的图片序号。
- 可以忽略答案组织形式（如排版、分隔方式、是否使用Latex等）。

# 输出
1. 在<think></think>标签中输出你的思考过程。
2. 结论输出：用一个词（是或否）在最后得出结论，格式为 \boxed{Yes} 或 \boxed{No}。
3. 注意：你输出的结论必须与思考过程中得到的结论一致。思考过程结论为：一致/yes，则最终结论输出：\boxed{Yes}。

## 输出示例
<最终结果>
\boxed{Yes/No}
<\最终结果>


以下是输入内容："""
RELEASE_JUDGE_USER_PROMPT = "\n    [问题]:{question}\n    [参考答案]:{answer}\n    [模型回答]:{prediction}\n    "
RELEASE_JUDGE_TEMPERATURE = 0.3
# Math answers the rules did not confirm: this user prompt alone, at temperature 0.5 (reward:78-107, reward:209-243).
RELEASE_MATH_VERIFY_PROMPT = "\n".join((
    '# CONTEXT #',
    "I am a teacher, and I have some high-level math problems. I am tasked with evaluating the correctness of a student's answer. ",
    "Below, I am provided with a problem and a reference answer. Additionally, a student's answer is provided. My job is to assess whether the student's answer captures the same meaning as the reference answer, even when expressed with different wording or format.",
    '',
    '# OBJECTIVE #',
    "I need you to judge whether the student's answer is correct given the ground truth answer.",
    '',
    'Your tasks include:',
    '1. Identify Mathematical or Notational Equivalence: Pay special attention to any LaTeX expressions in both answers. Confirm that the mathematical relationships, variables, and operations conveyed are equivalent.',
    '',
    '# TONE #',
    'Professional, scientific.',
    '',
    '# RESPONSE: MARKDOWN REPORT #',
    '## Equivalence Judgement',
    "[Whether the student's answer share the same meaning with the reference answer. (TRUE or FALSE)]",
    '',
    '# ATTENTION #',
    ' - The reference answer is ALWAYS correct. You should carefully judge whether the student gives the same answer as reference answer.',
    " - The Equivalence Judgement is only TRUE or FALSE. The answer is FALSE even if the student's final answer almost correct with a minor mistakes.",
    " - Don't give extra explanation.",
    '',
    '**Question**:',
    '{query}',
    '',
    '**Reference Answer**',
    '{gold_ans}',
    '',
    '## Student Final Answer',
    '{pred_ans}',
))
RELEASE_MATH_TEMPERATURE = 0.5


def release_verdict(reply: str) -> bool:
    """The released judge's verdict (reward:170-182): "Yes" anywhere in the final result, which is
    what follows the last "<最终结果>" up to "<\\最终结果>", then inside the last "boxed{" up to "}"."""
    reply = reply.strip()
    if "<最终结果>" in reply:
        reply = reply.split("<最终结果>")[-1].strip().split("<\\最终结果>")[0].strip()
    if "boxed" in reply:
        reply = reply.split("boxed{")[-1].strip().split("}")[0].strip()
    return "Yes" in reply


def release_math_verdict(reply: str) -> bool | None:
    """The released math verifier's verdict (reward:237-243): after "## Equivalence Judgement",
    "true" without "false" is True, the reverse False, anything else None (scored 0)."""
    judgement = reply.split("## Equivalence Judgement")[-1].lower()
    if "true" in judgement and "false" not in judgement:
        return True
    if "false" in judgement and "true" not in judgement:
        return False
    return None


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

    def prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}
        ]
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    async def ask(self, prompt: str, system: str | None = None, temperature: float = 0.0) -> str:
        """The judge's reply to one user message (greedy unless `temperature`, then seeded by the
        prompt, so a rerun asks the same); RolloutUnavailable when no server answers."""
        ids = self.prompt_ids(prompt, system)
        sampling = SamplingParams(self.max_new_tokens, temperature=temperature, stop=(), seed=zlib.crc32(str(ids).encode()))
        result = await self.client.generate(GenerateRequest(ids, [], sampling))
        return self.tokenizer.decode(result.token_ids, skip_special_tokens=True)

    async def release_grade(self, question: str, prediction: str, ground_truth: str) -> float | None:
        """The released judge's grade of a perception or search answer, 1.0 or 0.0; None when the
        judge gives no reply in time (counted; the caller grades by rule)."""
        prompt = RELEASE_JUDGE_USER_PROMPT.format(question=question, answer=ground_truth, prediction=prediction)
        reply = await self._reply(prompt, RELEASE_JUDGE_SYSTEM_PROMPT, RELEASE_JUDGE_TEMPERATURE)
        if reply is None:
            return None
        self.stats["judged"] += 1
        return float(release_verdict(reply))

    async def release_math_grade(self, question: str, prediction: str, ground_truth: str) -> float | None:
        """The released generative verify of a (normalized) math answer: 1.0, 0.0 (also for a reply
        with no clear verdict, as the release scores it); None when there is no reply in time."""
        prompt = RELEASE_MATH_VERIFY_PROMPT.format(query=question, gold_ans=ground_truth, pred_ans=prediction)
        reply = await self._reply(prompt, None, RELEASE_MATH_TEMPERATURE)
        if reply is None:
            return None
        verdict = release_math_verdict(reply)
        self.stats["judged" if verdict is not None else "unparsed"] += 1
        return float(bool(verdict))

    async def _reply(self, prompt: str, system: str | None, temperature: float) -> str | None:
        try:
            return await asyncio.wait_for(self.ask(prompt, system, temperature), self.timeout_s)
        except TimeoutError:
            self.stats["fallback_timeout"] += 1
        except RolloutUnavailable:
            self.stats["fallback_unavailable"] += 1
        return None

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
