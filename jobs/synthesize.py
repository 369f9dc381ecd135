"""Cold-start trajectory synthesis: a teacher model answers each question k times with our tools;
verified, well-formed trajectories become SFT records.

    python jobs/synthesize.py                          # embedded default: the tiny model as a local teacher
    OPENAI_API_KEY=... python jobs/synthesize.py teacher=openai teacher.model=gpt-4o synth.input=cold_start.jsonl
    python jobs/synthesize.py teacher.base_url=http://node12:8000/v1 teacher.model=Qwen2.5-VL-72B-Instruct \\
        teacher.api_key_env=VLLM_API_KEY synth.k=8 synth.require_tool=true
    python jobs/synthesize.py hydra.run.dir=outputs/synthesize/<run>    # resume an interrupted run

Writes trajectories.jsonl (SFT records; train with `python jobs/sft.py data.sft=<it>`),
attempts.jsonl and summary.json.
"""

import hydra
from omegaconf import DictConfig

from deepeyes.config import register_configs, to_object

register_configs()


@hydra.main(config_path="../conf", config_name="synthesize", version_base=None)
def main(cfg: DictConfig) -> None:
    from deepeyes.synth import run_synthesis

    run_synthesis(to_object(cfg))


if __name__ == "__main__":
    main()
