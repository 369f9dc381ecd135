"""How long the agent loop takes to parse one long model turn, unclosed tags against closed ones.

    python bench/parse.py [--tokens 16384] [--repeat 20] [--smoke]

Turns of `--tokens` tokens of the real Qwen2.5 vocabulary, parsed (the median of `--repeat`
runs) by `protocol.parse_action` under both variants, by the released reward's checks
(`reward.release.check_response`) and by its math normalization (`normalize_final_answer`,
which reads an answer of any length):

- unclosed: the worst cases for a regex with a lazy `(.*?)` before a closing tag: the turn is
  nothing but opening tags (`<tool_call>` is one token; `<answer>`, `<code>` and a python fence
  in a <code> are a few), so an unbounded `findall` rescans the rest of the turn from each one;
- closed: a turn of the same length whose tags all close (thinking, then a tool call).

The baseline is the plain regex `findall` (what parsing did before) on an unclosed turn of
`--baseline-tokens` tokens (it is quadratic: 8192 tokens took 7.7 s), measured in the same run.
Last line: `RESULT {json}`; target: `unclosed_ms` < 50 at 16384 tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from deepeyes.agent import protocol
from deepeyes.model import ensure_tiny_model, load_processor
from deepeyes.reward import release

TARGET_MS = 50.0


def turn_of(tokenizer, unit: str, tokens: int, head: str = "", tail: str = "") -> str:
    """`head` + `unit` repeated + `tail`, cut to exactly `tokens` tokens (decoded back to text)."""
    body = tokenizer(head + unit * tokens + tail, add_special_tokens=False)["input_ids"]
    end = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    ids = body[: tokens - len(end)] + end
    return tokenizer.decode(ids)


def median_ms(parse, turn: str, repeat: int) -> float:
    """The median over `repeat` runs: this box is shared, and a single run can catch a pause."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        parse(turn)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def parsers():
    return {
        f"parse_action[{variant}]": (lambda turn, v=variant: protocol.parse_action(turn, v))
        for variant in protocol.VARIANTS
    } | {f"release_reward[{rule}]": (lambda turn, r=rule: release.check_response(turn, r)) for rule in (
        release.PERCEPTION, release.MATH, release.SEARCH)} | {"normalize_final_answer": release.normalize_final_answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--baseline-tokens", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="5 repeats, a 1024-token baseline")
    args = parser.parse_args()
    if args.smoke:
        args.repeat, args.baseline_tokens = 5, 1024
    tokenizer = load_processor(ensure_tiny_model()).tokenizer

    unclosed = {
        "tool_call": turn_of(tokenizer, "<tool_call>", args.tokens),
        "answer": turn_of(tokenizer, "<answer>", args.tokens),
        "code": turn_of(tokenizer, "<code>", args.tokens),
        "python_fence": turn_of(tokenizer, "```python\n", args.tokens, head="<code>", tail="</code>"),
    }
    closed = turn_of(tokenizer, "I look again at the image. ", args.tokens, head="<think>",
                     tail='</think>\n<tool_call>\n{"name": "search", "arguments": {"query": "flag"}}\n</tool_call>')
    for turn in [closed, *unclosed.values()]:
        assert len(tokenizer(turn, add_special_tokens=False)["input_ids"]) == args.tokens

    timings: dict[str, float] = {}
    for name, parse in parsers().items():
        for shape, turn in unclosed.items():
            timings[f"{name} unclosed {shape}"] = median_ms(parse, turn, args.repeat)
        timings[f"{name} closed"] = median_ms(parse, closed, args.repeat)
    for line, ms in timings.items():
        print(f"{line:55s} {ms:8.2f} ms")

    baseline_turn = turn_of(tokenizer, "<tool_call>", args.baseline_tokens)
    baseline_ms = median_ms(protocol._TOOL_CALL.findall, baseline_turn, 1)
    bounded_ms = median_ms(lambda t: protocol.find_all(protocol._TOOL_CALL, t), baseline_turn, args.repeat)
    print(f"unbounded regex findall on {args.baseline_tokens} unclosed <tool_call> tokens: {baseline_ms:.1f} ms "
          f"(bounded: {bounded_ms:.2f} ms)")

    parsing = {key: ms for key, ms in timings.items() if not key.startswith("normalize_final_answer")}
    unclosed_ms = max(ms for key, ms in parsing.items() if " unclosed " in key)
    closed_ms = max(ms for key, ms in parsing.items() if key.endswith(" closed"))
    normalize_ms = max(ms for key, ms in timings.items() if key.startswith("normalize_final_answer"))
    print("RESULT " + json.dumps({
        "tokens": args.tokens,
        "unclosed_ms": round(unclosed_ms, 3),
        "closed_ms": round(closed_ms, 3),
        "unclosed_over_closed": round(unclosed_ms / closed_ms, 3),
        "math_normalize_ms": round(normalize_ms, 3),  # a whole turn as one answer: the reward's worst case
        "baseline_tokens": args.baseline_tokens,
        "baseline_regex_ms": round(baseline_ms, 3),
        "bounded_ms_at_baseline_tokens": round(bounded_ms, 3),
        "target_ms": TARGET_MS,
        "ok": unclosed_ms < TARGET_MS,
    }))


if __name__ == "__main__":
    main()
